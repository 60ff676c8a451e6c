"""Experiments built on the trainer: teacher training, ablations, reports and demos."""
