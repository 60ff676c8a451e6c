"""T2I-CompBench complex category: the 3-in-1 merge of attribute, spatial and action scores.

Inputs are per-image scores of the complex prompts, keyed by image index: BLIP-VQA attribute scores,
spatial scores in complex mode, and CLIP scores in complex mode (the "action" score, computed on the
prompt with its adjectives removed). Prompt lines are compared after :func:`normalise_line`
(``line.strip('\\n').split('.')[0].lower()``). Per prompt line ``i`` (images ``i*n .. i*n + n-1``):

* line in the spatial subset (``complex_val_spatial``): ``(spatial + attribute) / 2``;
* else in the action subset (``complex_val_action``): ``(action + attribute) / 2``;
* else (spatial and action): ``(attribute + spatial + action) / 3``.

The category score is the mean over images.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from senseflow.metrics.compbench.layout import CompBenchIndex
from senseflow.metrics.compbench.results import CategoryScores, records_from_scores

RULES = ("spatial", "action", "all")


def normalise_line(line: str) -> str:
    """The official matching key of a prompt line: ``line.strip('\\n').split('.')[0].lower()``."""
    return line.strip("\n").split(".")[0].lower()


def three_in_one_rule(prompt: str, spatial_lines: Iterable[str], action_lines: Iterable[str]) -> str:
    """``"spatial"``, ``"action"`` or ``"all"`` for one complex prompt (subset lines raw or normalised)."""
    key = normalise_line(prompt)
    if key in {normalise_line(s) for s in spatial_lines}:
        return "spatial"
    if key in {normalise_line(a) for a in action_lines}:
        return "action"
    return "all"


def merge_score(rule: str, attribute: float | None, spatial: float | None, action: float | None) -> float:
    """Combine the scores of one image under ``rule`` (the scores a rule does not use may be None)."""
    if rule == "spatial":
        return (_need(spatial, "spatial") + _need(attribute, "attribute")) * 0.5
    if rule == "action":
        return (_need(action, "action") + _need(attribute, "attribute")) * 0.5
    if rule == "all":
        return (_need(attribute, "attribute") + _need(spatial, "spatial") + _need(action, "action")) / 3
    raise ValueError(f"unknown 3-in-1 rule {rule!r}; expected one of {RULES}")


def _need(value: float | None, name: str) -> float:
    if value is None:
        raise KeyError(f"3-in-1 needs the {name} score of this image")
    return float(value)


@dataclass(frozen=True)
class SubsetLines:
    """The complex subsets used for the merge (the spatial+action subset is not consulted)."""

    spatial: tuple[str, ...]
    action: tuple[str, ...]


def merge_three_in_one(
    index: CompBenchIndex,
    subsets: SubsetLines,
    attribute: Mapping[int, float],
    spatial: Mapping[int, float],
    action: Mapping[int, float],
) -> CategoryScores:
    """3-in-1 scores of every image of the complex ``index`` (score mappings keyed by idx)."""
    spatial_keys = {normalise_line(s) for s in subsets.spatial}
    action_keys = {normalise_line(a) for a in subsets.action}
    scores: dict[int, float] = {}
    details: dict[int, dict] = {}
    counts = dict.fromkeys(RULES, 0)
    for entry in index.entries:
        key = normalise_line(entry.prompt)
        rule = "spatial" if key in spatial_keys else "action" if key in action_keys else "all"
        counts[rule] += 1
        parts = {
            name: source.get(entry.idx)
            for name, source in (("attribute", attribute), ("spatial", spatial), ("action", action))
        }
        try:
            scores[entry.idx] = merge_score(rule, parts["attribute"], parts["spatial"], parts["action"])
        except KeyError as exc:
            raise KeyError(f"complex image idx {entry.idx}: {exc.args[0]}") from None
        details[entry.idx] = {"rule": rule, **parts}
    info = {"images_per_rule": counts, "images_per_prompt": index.images_per_prompt}
    return CategoryScores(
        index.category, "3-in-1", records_from_scores(index, "3-in-1", scores, details), info
    )
