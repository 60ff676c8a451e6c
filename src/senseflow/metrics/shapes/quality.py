"""Measuring a toy-world image generator: compositional accuracy per split and FID to references.

The measurement only needs a function ``generate(prompts, seeds) -> NHWC uint8``, so the teacher
at any step count, a distilled student and a rendered-image "oracle" are all judged by the same
code. FIDs use the toy feature network; the render-vs-render FID of two independent image sets of
the same prompts is reported as the floor (the FID's own sampling noise at this N).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from senseflow.families.toy.render import render_batch
from senseflow.families.toy.world import parse_prompt, scenes_in_split
from senseflow.metrics.coverage import DEFAULT_K, intra_prompt_diversity, precision_recall
from senseflow.metrics.frechet import fid_from_features
from senseflow.metrics.shapes.background import background_stats
from senseflow.metrics.shapes.evaluator import evaluate, layout_diversity
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
    coverage: dict | None = None  # precision and recall against the teacher's reference set
    background: dict | None = None  # senseflow.metrics.shapes.background.BackgroundStats.record()
    diversity: dict | None = None  # measure_diversity() output

    def record(self) -> dict:
        return dataclasses.asdict(self)

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
    k: int = DEFAULT_K,
) -> tuple[QualityReport, np.ndarray]:
    """Generate every prompt of the set, score it per split, FID it against each reference, and
    measure its background; with a ``teacher`` reference also precision and recall (k-NN, ``k``).

    ``reference_features`` maps a reference name to its features (``extract_features`` output).
    """
    start = time.perf_counter()
    images = _generate_all(generate, prompt_set.prompts, prompt_set.seeds, batch_size)
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
    coverage = None
    if "teacher" in reference_features:
        coverage = precision_recall(reference_features["teacher"], features, k=k).record()
    background = background_stats(images).record()
    return QualityReport(name, seconds, accuracy, fid, coverage, background), images


def _generate_all(generate: Generator, prompts: list[str], seeds: list[int], batch_size: int) -> np.ndarray:
    return np.concatenate(
        [
            generate(prompts[i : i + batch_size], seeds[i : i + batch_size])
            for i in range(0, len(prompts), batch_size)
        ]
    )


DIVERSITY_SEED_BASE = 3_000_000  # seeds of the diversity images: disjoint from the other sets'


def measure_diversity(
    generate: Generator, prompt_set: PromptSet, prompts: int, seeds_per_prompt: int, batch_size: int = 64
) -> dict:
    """Intra-prompt diversity: ``seeds_per_prompt`` images of each of ``prompts`` prompts spread over
    the set; the mean over prompts of the mean pairwise distance of their toy features, and of their
    layouts (object positions and sizes)."""
    if prompts < 1 or seeds_per_prompt < 2:
        raise ValueError(f"diversity needs >= 1 prompt, >= 2 seeds each; got {prompts}, {seeds_per_prompt}")
    picks = np.linspace(0, len(prompt_set.prompts) - 1, prompts).astype(int)
    chosen = [prompt_set.prompts[i] for i in picks for _ in range(seeds_per_prompt)]
    seeds = [DIVERSITY_SEED_BASE + j for j in range(len(chosen))]
    images = _generate_all(generate, chosen, seeds, batch_size)
    value, _ = intra_prompt_diversity(extract_features(images).reshape(prompts, seeds_per_prompt, -1))
    layout = layout_diversity(images, chosen, prompts, seeds_per_prompt)
    return {
        "features": value,
        "layout": layout["value"],
        "layout_prompts_used": layout["prompts_used"],
        "prompts": prompts,
        "seeds_per_prompt": seeds_per_prompt,
    }


class Comparison:
    """Several generators measured on one prompt set against renders and the teacher's reference.

    ``add_reference_rows`` measures the floors first: a second render set (floor of the FID to
    renders), then the teacher at its reference setting on an independent seed set, which becomes
    the FID-T reference, and on the common seeds that every other row uses (FID-T's floor). No row
    shares its seeds with the reference, so a deterministic sampler gains nothing from pairing.
    """

    def __init__(
        self, splits: Sequence[str], per_split: int, seed: int = 0, diversity: tuple[int, int] | None = None
    ):
        """``diversity``: (prompts, seeds per prompt) of the intra-prompt diversity of each row."""
        self.prompt_set = PromptSet.sample(splits, per_split, seed=seed)
        self.per_split, self.seed, self.diversity = per_split, seed, diversity
        self.references = {
            "renders": extract_features(render_reference(self.prompt_set.prompts, seed=seed + 1))
        }
        self.reports: list[QualityReport] = []
        self.images: dict[str, np.ndarray] = {}

    def add(self, name: str, generate: Generator, diversity: bool = True) -> QualityReport:
        report, images = measure(name, generate, self.prompt_set, self.references)
        if diversity and self.diversity is not None:
            report.diversity = measure_diversity(generate, self.prompt_set, *self.diversity)
        self.reports.append(report)
        self.images[name] = images
        acc = report.accuracy["all"]["overall"]["all"]
        print(f"{name}: compositional accuracy {100 * acc:.1f}%, FID {report.fid}", flush=True)
        return report

    def add_reference_rows(self, teacher_generator: Callable[[int], Generator], reference_name: str) -> None:
        """``teacher_generator(seed_offset)`` returns the teacher's reference sampler."""
        self.add("rendered images (other placements)", lambda p, s: render_reference(p, self.seed + 2 + s[0]))
        reference_set = f"{reference_name} ({REFERENCE_SET_LABEL})"
        self.add(reference_set, teacher_generator(SECOND_SEED_SET), diversity=False)
        self.references["teacher"] = extract_features(self.images[reference_set])
        self.add(reference_name, teacher_generator(0))

    def payload(self) -> list[dict]:
        return [r.record() for r in self.reports]


SECOND_SEED_SET = 1_000_000  # seed offset of the teacher's FID-T reference set
REFERENCE_SET_LABEL = "FID-T reference set"
