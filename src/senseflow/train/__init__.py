"""Training: the generic distillation loop and its separate steps (checkpointing, parallelism)."""
