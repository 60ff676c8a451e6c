"""Measuring a toy-world image generator: compositional accuracy per split and FID to references.

The measurement only needs a function ``generate(prompts, seeds) -> NHWC uint8``, so the teacher
at any step count, a distilled student and a rendered-image "oracle" are all judged by the same
code. FIDs use the toy feature network; the render-vs-render FID of two independent image sets of
the same prompts is reported as the floor (the FID's own sampling noise at this N).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from senseflow.families.toy.render import render_batch
from senseflow.families.toy.world import parse_prompt, scenes_in_split
from senseflow.metrics.frechet import fid_from_features
from senseflow.metrics.shapes.evaluator import evaluate
from senseflow.metrics.shapes.features import extract_features

Generator = Callable[[list[str], list[int]], np.ndarray]


@dataclass(frozen=True)
class PromptSet:
    """Prompts sampled from several splits, each with a fixed seed (seed = base + index)."""

    prompts: list[str]
    splits: list[str]
    seeds: list[int]

    @classmethod
    def sample(cls, splits: Sequence[str], per_split: int, seed: int = 0, seed_base: int = 0) -> PromptSet:
        rng = np.random.default_rng(seed)
        prompts, names = [], []
        for split in splits:
            scenes = scenes_in_split(split)
            idx = rng.choice(len(scenes), size=per_split, replace=per_split > len(scenes))
            prompts += [scenes[i].prompt for i in idx]
            names += [split] * per_split
        return cls(prompts, names, [seed_base + i for i in range(len(prompts))])


def render_reference(prompts: Sequence[str], seed: int) -> np.ndarray:
    """Ground-truth renders of the prompts (the data distribution the teacher was trained on)."""
    return render_batch([parse_prompt(p) for p in prompts], np.random.default_rng(seed))


@dataclass
class QualityReport:
    name: str
    seconds: float
    accuracy: dict[str, dict]  # "all" and each split -> senseflow.metrics.shapes.evaluator.evaluate() output
    fid: dict[str, float] = field(default_factory=dict)  # reference name -> FID

    def row(self) -> dict:
        out = {"name": self.name, "seconds": round(self.seconds, 1)}
        for split, acc in self.accuracy.items():
            out[f"{split}_all"] = acc["overall"]["all"]
        out.update({f"fid_{k}": v for k, v in self.fid.items()})
        return out


def measure(
    name: str,
    generate: Generator,
    prompt_set: PromptSet,
    reference_features: dict[str, np.ndarray],
    batch_size: int = 64,
) -> tuple[QualityReport, np.ndarray]:
    """Generate every prompt of the set, score it per split, and FID it against each reference.

    ``reference_features`` maps a reference name to its features (``extract_features`` output).
    """
    start = time.perf_counter()
    images = np.concatenate(
        [
            generate(prompt_set.prompts[i : i + batch_size], prompt_set.seeds[i : i + batch_size])
            for i in range(0, len(prompt_set.prompts), batch_size)
        ]
    )
    seconds = time.perf_counter() - start
    accuracy = {"all": evaluate(images, prompt_set.prompts)}
    splits = np.asarray(prompt_set.splits)
    for split in dict.fromkeys(prompt_set.splits):
        mask = splits == split
        accuracy[split] = evaluate(
            images[mask], [p for p, m in zip(prompt_set.prompts, mask, strict=True) if m]
        )
    features = extract_features(images)
    fid = {ref: float(fid_from_features(features, feats)) for ref, feats in reference_features.items()}
    return QualityReport(name, seconds, accuracy, fid), images


class Comparison:
    """Several generators measured on one prompt set against renders and the teacher's reference.

    ``add_reference_rows`` measures the floors first: a second render set (floor of the FID to
    renders), then the teacher at its reference setting on an independent seed set, which becomes
    the FID-T reference, and on the common seeds that every other row uses (FID-T's floor). No row
    shares its seeds with the reference, so a deterministic sampler gains nothing from pairing.
    """

    def __init__(self, splits: Sequence[str], per_split: int, seed: int = 0):
        self.prompt_set = PromptSet.sample(splits, per_split, seed=seed)
        self.per_split, self.seed = per_split, seed
        self.references = {
            "renders": extract_features(render_reference(self.prompt_set.prompts, seed=seed + 1))
        }
        self.reports: list[QualityReport] = []
        self.images: dict[str, np.ndarray] = {}

    def add(self, name: str, generate: Generator) -> QualityReport:
        report, images = measure(name, generate, self.prompt_set, self.references)
        self.reports.append(report)
        self.images[name] = images
        acc = report.accuracy["all"]["overall"]["all"]
        print(f"{name}: compositional accuracy {100 * acc:.1f}%, FID {report.fid}", flush=True)
        return report

    def add_reference_rows(self, teacher_generator: Callable[[int], Generator], reference_name: str) -> None:
        """``teacher_generator(seed_offset)`` returns the teacher's reference sampler."""
        self.add("rendered images (other placements)", lambda p, s: render_reference(p, self.seed + 2 + s[0]))
        reference_set = f"{reference_name} ({REFERENCE_SET_LABEL})"
        self.add(reference_set, teacher_generator(SECOND_SEED_SET))
        self.references["teacher"] = extract_features(self.images[reference_set])
        self.add(reference_name, teacher_generator(0))

    def payload(self) -> list[dict]:
        return [
            {"name": r.name, "seconds": r.seconds, "accuracy": r.accuracy, "fid": r.fid} for r in self.reports
        ]


SECOND_SEED_SET = 1_000_000  # seed offset of the teacher's FID-T reference set
REFERENCE_SET_LABEL = "FID-T reference set"
