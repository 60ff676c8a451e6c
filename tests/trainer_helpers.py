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


def straight_and_resumed(teacher, root: Path, total: int, *extra: str, checkpoint_every: int = 3):
    """Train ``total`` iterations in ``root/straight``; in ``root/split`` train ``total // 2``, then
    resume to ``total`` in a new Distiller. Returns both run folders and the resumed Distiller."""
    from senseflow.train.trainer import Distiller

    def cfg(out, iterations, *more):
        return toy_cfg(
            teacher,
            out,
            f"schedule.iterations={iterations}",
            *more,
            *extra,
            checkpoint_every=checkpoint_every,
        )

    straight, split = root / "straight", root / "split"
    Distiller(cfg(straight, total), progress=False).run()
    Distiller(cfg(split, total // 2), progress=False).run()
    resumed = Distiller(cfg(split, total, "checkpoint.resume=latest"), progress=False)
    resumed.run()
    return straight, split, resumed
