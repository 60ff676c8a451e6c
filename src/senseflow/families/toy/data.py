"""An endless, resumable stream of rendered (image, prompt) batches from one split.

Batch ``i`` is a pure function of ``(seed, i)``, so the stream's whole state is one integer: a
resumed run that restores ``position`` sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import numpy as np
import torch

from senseflow.toy.render import IMAGE_SIZE, render
from senseflow.toy.world import scenes_in_split


def images_to_model_space(images: np.ndarray) -> torch.Tensor:
    """NHWC uint8 -> NCHW float32 in [-1, 1] (the toy world's identity "autoencoder" input)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


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
        scenes = scenes_in_split(split)
        self.singles = [s for s in scenes if s.relation is None]
        self.pairs = [s for s in scenes if s.relation is not None]
        if not self.singles or not self.pairs:
            single_object_fraction = 1.0 if self.singles else 0.0
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.single_object_fraction = single_object_fraction
        self.position = position
        self.image_size = image_size

    def batch(self, index: int) -> tuple[torch.Tensor, list[str]]:
        rng = np.random.default_rng([self.seed, index])
        chosen = []
        for _ in range(self.batch_size):
            pool = self.singles if rng.random() < self.single_object_fraction else self.pairs
            chosen.append(pool[int(rng.integers(len(pool)))])
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
