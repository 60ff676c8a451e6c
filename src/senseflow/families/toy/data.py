"""Rendered (image, prompt) batches from one split of the shapes world.

Batch ``i`` is a pure function of ``(seed, i)``, so a stream's whole state is one integer: a
resumed run sees exactly the batches an uninterrupted run would. :class:`ShapesStream` is the
distillation data kind ``toy``: each rank renders only its own slice of an iteration's global batch.
:class:`ShapesBatches` is the teacher-training stream (whole batches in sequence).
"""

from __future__ import annotations

import numpy as np
import torch

from senseflow.config.schema import DistillConfig
from senseflow.families.toy.render import IMAGE_SIZE, render
from senseflow.families.toy.world import SceneSpec, scenes_in_split
from senseflow.models.batch import Batch


def images_to_model_space(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 -> NCHW float32 in [-1, 1] (the toy world's identity "autoencoder" input)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class ScenePool:
    """The scenes of one split, drawn with a share of one-object scenes (they are few: 36 of 2,733)."""

    def __init__(self, split: str, single_object_fraction: float = 0.2):
        scenes = scenes_in_split(split)
        self.singles = [s for s in scenes if s.relation is None]
        self.pairs = [s for s in scenes if s.relation is not None]
        if not self.singles or not self.pairs:
            single_object_fraction = 1.0 if self.singles else 0.0
        self.single_object_fraction = single_object_fraction

    def prompts(self) -> list[str]:
        """Every prompt :meth:`draw` can return (each once): the one-object scenes' unless their
        share is 0, then the two-object scenes' unless it is 1."""
        scenes = (self.singles if self.single_object_fraction > 0 else []) + (
            self.pairs if self.single_object_fraction < 1 else []
        )
        return list(dict.fromkeys(s.prompt for s in scenes))

    def draw(self, rng: np.random.Generator) -> SceneSpec:
        pool = self.singles if rng.random() < self.single_object_fraction else self.pairs
        return pool[int(rng.integers(len(pool)))]


class ShapesBatches:
    def __init__(
        self,
        split: str,
        batch_size: int,
        seed: int = 0,
        single_object_fraction: float = 0.2,
        position: int = 0,
        image_size: int = IMAGE_SIZE,
    ):
        self.scenes = ScenePool(split, single_object_fraction)
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.position = position
        self.image_size = image_size

    def batch(self, index: int) -> tuple[torch.Tensor, list[str]]:
        rng = np.random.default_rng([self.seed, index])
        chosen = [self.scenes.draw(rng) for _ in range(self.batch_size)]
        images = np.stack([render(s, rng, self.image_size)[0] for s in chosen])
        return images_to_model_space(images), [s.prompt for s in chosen]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, list[str]]:
        out = self.batch(self.position)
        self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class ShapesStream:
    """This rank's share of iteration ``i``'s global batch: samples ``rank * B .. (rank + 1) * B``.

    Sample ``j`` of the global batch is drawn from its own generator, seeded by (seed, i, j), so a
    rank renders only its own samples and every world size sees the same global batch.
    """

    identity = "shapes/per-sample-seed/1"  # recorded in checkpoints; change it when the samples change

    def __init__(
        self,
        split: str,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        single_object_fraction: float = 0.2,
        image_size: int = IMAGE_SIZE,
    ):
        self.scenes = ScenePool(split, single_object_fraction)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.image_size = image_size

    def _sample(self, index: int, j: int) -> tuple[np.ndarray, SceneSpec]:
        rng = np.random.default_rng([self.seed, index, j])
        scene = self.scenes.draw(rng)
        return render(scene, rng, self.image_size)[0], scene

    def prompts(self) -> list[str]:
        """The finite pool of prompts the stream draws from (what ``senseflow cache-text`` encodes)."""
        return self.scenes.prompts()

    def batch(self, index: int) -> Batch:
        start = self.rank * self.batch_size
        drawn = [self._sample(index, j) for j in range(start, start + self.batch_size)]
        images = np.stack([image for image, _ in drawn])
        return Batch(prompts=[scene.prompt for _, scene in drawn], images=images_to_model_space(images))


def build_toy_stream(cfg: DistillConfig, rank: int, world: int) -> ShapesStream:
    """The registry's builder for ``data.kind: toy``: the train split at ``data.resolution``."""
    return ShapesStream("train", cfg.data.batch_size, cfg.seed, rank, world, image_size=cfg.data.resolution)
