"""The toy distillation recipe as the trainer tests use it: tiny batches, every iteration logged."""

from pathlib import Path

from senseflow.config import load_config

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "toy" / "distill.yaml"


def toy_cfg(teacher, out, *extra: str, checkpoint_every: int = 3):
    """``configs/toy/distill.yaml`` on ``teacher`` writing to ``out``, batch 2, no sample grids."""
    return load_config(
        RECIPE,
        [
            f"model.teacher={teacher}",
            f"output_dir={out}",
            "data.batch_size=2",
            "logging.every=1",
            "logging.sample_every=null",
            f"checkpoint.every={checkpoint_every}",
            *extra,
        ],
    )
