"""The metric panel of ``senseflow eval``: load each enabled metric once, then score image sets.

FID-T and Patch FID-T compare a model's images with the reference's (the teacher's) through the
Inception extractor and the per-folder feature cache of :mod:`senseflow.metrics.fid`; the pair
scorers (CLIP score, HPSv2, PickScore, ImageReward) score (image, prompt) pairs; the shapes world adds
its rule-based attribute accuracy and FID-T on its own seeded features. On the features FID-T uses,
k-NN precision and recall against the reference and the intra-prompt diversity of the extra
diversity images (:mod:`senseflow.metrics.coverage`). Every weight file is located
through :func:`senseflow.metrics.weights.resolve` (explicit path, else the weights root's manifest
entry) and nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from senseflow.errors import UsageError
from senseflow.eval.config import EvalConfig
from senseflow.eval.images import DiversityImages, ImageSet, prompts_sha256
from senseflow.inputs import existing_file
from senseflow.metrics.weights import ResolvedWeights, resolve

__all__ = ["Panel", "PromptSet", "diversity_features", "load_prompts"]

#: Result-record key of each pair scorer, in the column order of the paper's Table 1.
PAIR_METRICS = ("clip_score", "hpsv2", "pickscore", "imagereward")
PATCH_PRESET = "center299_patch"


def diversity_features(cfg: EvalConfig) -> list[str]:
    """The features intra-prompt diversity will use (empty: it is off, or no feature is loaded):
    ``inception`` with FID-T, else ``clip`` with the CLIP score; ``toy`` with the toy panel."""
    if not cfg.metrics.diversity.enabled:
        return []
    found = []
    if cfg.metrics.fid.enabled:
        found.append("inception")
    elif cfg.metrics.clip_score.enabled:
        found.append("clip")
    if cfg.toy_metrics:
        found.append("toy")
    return found


@dataclass(frozen=True)
class PromptSet:
    prompts: list[str]
    info: dict[str, Any]  # the record's "prompts" block


def load_prompts(cfg: EvalConfig) -> PromptSet:
    """The prompts of the recipe with their provenance (spec §12 ``prompts``)."""
    pc = cfg.prompts
    info: dict[str, Any] = {
        "set": pc.name,
        "file": pc.path,
        "file_sha256": None,
        "source_sha256": None,
        "selection_rule": None,
        "selection_model": None,
    }
    if pc.kind == "toy":
        from senseflow.metrics.shapes.quality import PromptSet as ToyPrompts

        prompts = ToyPrompts.sample(pc.toy_splits, pc.toy_per_split, seed=pc.toy_seed).prompts
        info.update(
            set=pc.name or "toy",
            selection_rule=f"toy grammar: {pc.toy_per_split} per split "
            f"{'/'.join(pc.toy_splits)}, seed {pc.toy_seed}",
        )
    else:
        from senseflow.eval.prompts import read_prompt_lines, read_prompt_tsv, sha256_file

        path = existing_file(pc.path or "", "prompts.path")
        if pc.kind == "tsv":
            prompts = read_prompt_tsv(path, "prompts.path").prompts
        else:
            prompts = list(read_prompt_lines(path, "prompts.path").prompts)
        if not prompts:
            raise UsageError(f"the file holds no prompt (prompts.path {path}): write one prompt per line")
        info.update(set=pc.name or path.stem, file_sha256=sha256_file(path))
        provenance = path.with_name(f"{path.stem}.provenance.json")
        if provenance.is_file():
            prov = json.loads(provenance.read_text())
            info.update(
                source_sha256=prov.get("source_sha256"),
                selection_rule=prov.get("selection_rule"),
                selection_model=prov.get("selection_model"),
            )
    if pc.limit is not None:
        prompts = prompts[: pc.limit]
    if not prompts:
        raise ValueError("the prompt set is empty")
    info.update(count=len(prompts), prompts_sha256=prompts_sha256(prompts))
    return PromptSet(prompts, info)


def _weights(name: str, explicit: str | None, cfg: EvalConfig) -> ResolvedWeights:
    """Explicit paths are the user's choice (hashed and recorded); manifest locations are verified."""
    return resolve(name, explicit, root=cfg.weights_root, verify=explicit is None)


def _hps_tokenizer(cfg: EvalConfig) -> ResolvedWeights:
    """HPSv2 files carry no tokenizer; ViT-H-14's (OpenAI BPE) ships with the PickScore processor files."""
    from senseflow.metrics.weights import WeightsNotFoundError

    try:
        return resolve("pickscore.processor", root=cfg.weights_root)
    except WeightsNotFoundError as exc:
        raise WeightsNotFoundError(
            "metrics.hpsv2.tokenizer is not set and the default (the ViT-H-14 tokenizer files of "
            f"'pickscore.processor') is missing: {exc}"
        ) from None


@dataclass
class Panel:
    """The enabled metrics, loaded once; :meth:`score` measures one image set."""

    cfg: EvalConfig
    cache_dir: Path
    progress: bool = True
    extractor: Any = None
    scorers: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)
    _toy_cache: dict[Path, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, cfg: EvalConfig, cache_dir: Path, progress: bool = True) -> Panel:
        panel = cls(cfg, cache_dir, progress)
        m, device, dtype = cfg.metrics, cfg.device, cfg.metrics.dtype
        if m.fid.enabled:
            from senseflow.metrics.fid import load_extractor

            w = _weights(m.fid.weights_name, m.fid.extractor, cfg)
            panel.extractor = load_extractor(w.path, device=device, expected_sha256=None)
            panel._note(w)
        if m.clip_score.enabled:
            from senseflow.metrics.clip_score import ClipScorer

            w = _weights(m.clip_score.weights_name, m.clip_score.path, cfg)
            panel.scorers["clip_score"] = ClipScorer.from_path(
                w.path,
                tokenizer=m.clip_score.tokenizer,
                backbone=m.clip_score.backbone,
                pretrained=m.clip_score.pretrained,
                prefix=m.clip_score.prefix,
                pre_resize=m.clip_score.pre_resize,
                device=device,
                dtype=dtype,
                weights_sha256=w.sha256,
            )
            panel._note(w)
        if m.hpsv2.enabled:
            from senseflow.metrics.hps import HPSv2Scorer

            version = m.hpsv2.version or ""
            w = _weights(f"hps.{version}", m.hpsv2.path, cfg)
            tokenizer = m.hpsv2.tokenizer
            if tokenizer is None and not w.path.is_dir():
                tokenizer = str(_hps_tokenizer(cfg).path)
            panel.scorers["hpsv2"] = HPSv2Scorer.from_path(
                w.path,
                version=version,
                tokenizer=tokenizer,
                antialias=m.hpsv2.antialias,
                device=device,
                **{k: v for k in ("vision_heads", "text_heads") if (v := getattr(m.hpsv2, k)) is not None},
                dtype=dtype,
                weights_sha256=w.sha256,
            )
            panel._note(w)
        if m.pickscore.enabled:
            from senseflow.metrics.pickscore import PickScoreScorer

            w = _weights("pickscore.model", m.pickscore.path, cfg)
            proc = _weights("pickscore.processor", m.pickscore.processor, cfg)
            panel.scorers["pickscore"] = PickScoreScorer.from_path(
                w.path, proc.path, device=device, dtype=dtype, weights_sha256=w.sha256
            )
            panel._note(w, proc)
        if m.imagereward.enabled:
            from senseflow.metrics.imagereward import ImageRewardScorer

            w = _weights("imagereward.model", m.imagereward.path, cfg)
            beside = str(w.path.parent / "med_config.json") if m.imagereward.path else None
            med = _weights("imagereward.med_config", m.imagereward.med_config or beside, cfg)
            tok = _weights("tokenizer.bert_base_uncased", m.imagereward.tokenizer, cfg)
            panel.scorers["imagereward"] = ImageRewardScorer.from_path(
                w.path,
                med.path,
                tok.path,
                vision_heads=m.imagereward.vision_heads,
                device=device,
                dtype=dtype,
                weights_sha256=w.sha256,
            )
            panel._note(w, med, tok)
        return panel

    def _note(self, *resolved: ResolvedWeights) -> None:
        for w in resolved:
            self.weights[w.name] = {"path": str(w.path), "sha256": w.sha256, "verified": w.verified}

    # ------------------------------------------------------------------------------------ scoring

    def _fid_features(self, images: ImageSet) -> dict[str, Any]:
        from senseflow.metrics.fid import extract_folder

        presets = [self.cfg.metrics.fid.preset] + ([PATCH_PRESET] if self.cfg.metrics.fid.patch else [])
        return extract_folder(
            images.folder,
            self.extractor,
            presets,
            batch_size=self.cfg.metrics.fid.batch_size,
            num_workers=self.cfg.metrics.fid.num_workers,
            cache_dir=self.cache_dir / "fid",
            set_id=images.key,
            progress=self.progress,
        )

    def score(
        self, images: ImageSet, reference: ImageSet | None, diversity: DiversityImages | None = None
    ) -> tuple[dict[str, Any], list[dict]]:
        """(the record's ``metrics`` block, per-image rows) of ``images``; FID-T and precision/recall
        need ``reference``, intra-prompt diversity the model's ``diversity`` images."""
        metrics: dict[str, Any] = {"fid_t": None, "patch_fid_t": None, "precision_recall": None}
        per_image = [
            {"index": i, "file": f.name, "prompt": p, "seed": s}
            for i, (f, p, s) in enumerate(zip(images.files, images.prompts, images.seeds, strict=True))
        ]
        if self.extractor is not None and reference is not None:
            from senseflow.metrics.fid import fid_between

            ours, theirs = self._fid_features(images), self._fid_features(reference)
            whole = self.cfg.metrics.fid.preset
            metrics["fid_t"] = fid_between(ours[whole], theirs[whole], self.extractor).record()
            if self.cfg.metrics.fid.patch:
                metrics["patch_fid_t"] = fid_between(
                    ours[PATCH_PRESET], theirs[PATCH_PRESET], self.extractor
                ).record()
            metrics["precision_recall"] = self._precision_recall(
                ours[whole].features, theirs[whole].features, self._inception_name(), reference
            )
        for key in PAIR_METRICS:
            metrics[key] = None
            scorer = self.scorers.get(key)
            if scorer is None:
                continue
            values = self._pair_scores(key, scorer, images)
            metrics[key] = scorer.result(values)
            for row, v in zip(per_image, values, strict=True):
                row[key] = float(v)
        kinds = diversity_features(self.cfg)
        metrics["diversity"] = None
        if diversity is not None and ("inception" in kinds or "clip" in kinds):
            feature = "inception" if "inception" in kinds else "clip"
            metrics["diversity"] = self._diversity(diversity, feature)
        if self.cfg.toy_metrics:
            metrics["toy"] = self._toy(images, reference, per_image)
            metrics["toy"]["diversity"] = (
                self._diversity(diversity, "toy") if diversity is not None and "toy" in kinds else None
            )
        return metrics, per_image

    # ------------------------------------------------------------------------ coverage, diversity

    def _inception_name(self) -> str:
        return f"Inception pool features ({self.extractor.dim}-d, preset {self.cfg.metrics.fid.preset})"

    def _precision_recall(
        self, ours: np.ndarray, theirs: np.ndarray, features: str, reference: ImageSet
    ) -> dict[str, Any] | None:
        """k-NN precision/recall of ``ours`` against the reference's ``theirs`` (None when disabled)."""
        from senseflow.metrics.coverage import precision_recall

        pr = self.cfg.metrics.precision_recall
        if not pr.enabled:
            return None
        block: dict[str, Any] = {"features": features, "reference": reference.name, "missing": None}
        if min(len(ours), len(theirs)) <= pr.k:
            block["missing"] = f"each set needs more than k = {pr.k} images"
            return {"precision": None, "recall": None, "k": pr.k, "n": [len(ours), len(theirs)], **block}
        return {**precision_recall(theirs, ours, k=pr.k, chunk_size=pr.chunk_size).record(), **block}

    def _diversity_vectors(self, images: ImageSet, feature: str) -> tuple[np.ndarray, str]:
        """Per-image features of the diversity images and their description."""
        if feature == "inception":
            from senseflow.metrics.fid import extract_folder

            preset = self.cfg.metrics.fid.preset
            found = extract_folder(
                images.folder,
                self.extractor,
                [preset],
                batch_size=self.cfg.metrics.fid.batch_size,
                num_workers=self.cfg.metrics.fid.num_workers,
                cache_dir=self.cache_dir / "fid",
                set_id=images.key,
                progress=self.progress,
            )[preset]
            if found.files != [f.name for f in images.files]:
                raise RuntimeError(f"unexpected files in {images.folder}: {found.files[:3]} ...")
            return found.features.astype(np.float64), self._inception_name()
        if feature == "clip":
            return self._clip_features(
                images
            ), "CLIP image embeddings of the CLIP-score model (L2-normalised)"
        from senseflow.metrics.shapes.features import FEATURE_DIM

        return self._toy_features(images), f"toy seeded random conv ({FEATURE_DIM}-d)"

    def _clip_features(self, images: ImageSet) -> np.ndarray:
        import torch
        from PIL import Image

        scorer, batch, out = self.scorers["clip_score"], self.cfg.metrics.batch_size, []
        for start in range(0, len(images.files), batch):
            idx = list(range(start, min(start + batch, len(images.files))))
            with torch.inference_mode():
                out.append(scorer.image_embeds([Image.fromarray(a) for a in images.load(idx)]).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def _diversity(self, div: DiversityImages, feature: str) -> dict[str, Any]:
        """Mean over prompts of the mean pairwise feature distance among each prompt's images; the
        toy block adds the layout diversity (object positions and sizes from the rule-based evaluator)."""
        from senseflow.metrics.coverage import intra_prompt_diversity

        block: dict[str, Any] = {
            "value": None,
            "per_prompt": None,
            "features": None,
            "distance": "euclidean",
            "prompts": div.prompts,
            "seeds_per_prompt": div.seeds_per_prompt,
            "seeds": div.seed_rule,
            "images": None if div.images is None else str(div.images.folder),
            "missing": div.missing,
        }
        if feature == "toy":
            block["layout"] = None
        if div.images is None:
            return block
        vectors, block["features"] = self._diversity_vectors(div.images, feature)
        groups = vectors.reshape(div.prompts, div.seeds_per_prompt, -1)
        block["value"], block["per_prompt"] = intra_prompt_diversity(groups)
        if feature == "toy":
            from senseflow.metrics.shapes.evaluator import layout_diversity

            block["layout"] = layout_diversity(
                div.images.load(), div.images.prompts, div.prompts, div.seeds_per_prompt
            )
        return block

    def _pair_scores(self, key: str, scorer: Any, images: ImageSet) -> np.ndarray:
        batch = self.cfg.metrics.batch_size
        chunks = range(0, len(images.files), batch)
        if self.progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=f"{key} {images.name}", unit="batch")
        out = []
        for start in chunks:
            idx = list(range(start, min(start + batch, len(images.files))))
            out.append(
                scorer.score(list(images.load(idx)), [images.prompts[i] for i in idx], batch_size=batch)
            )
        return np.concatenate(out)

    def _toy_features(self, images: ImageSet, pixels: Any = None) -> Any:
        """Toy features of an image set, computed once per set (the reference's serve every model)."""
        from senseflow.metrics.shapes.features import extract_features

        if images.folder not in self._toy_cache:
            self._toy_cache[images.folder] = extract_features(images.load() if pixels is None else pixels)
        return self._toy_cache[images.folder]

    def _toy(self, images: ImageSet, reference: ImageSet | None, per_image: list[dict]) -> dict[str, Any]:
        from senseflow.metrics.frechet import fid_from_features
        from senseflow.metrics.shapes.evaluator import parse_prompt, score_image, summarise
        from senseflow.metrics.shapes.features import FEATURE_DIM

        pixels = images.load()
        scenes = [parse_prompt(p) for p in images.prompts]
        scores = [score_image(image, scene) for image, scene in zip(pixels, scenes, strict=True)]
        accuracy = summarise(scores, scenes)
        for row, score in zip(per_image, scores, strict=True):
            row["toy_all"] = bool(score.all)
        fid = pr = None
        if reference is not None:
            ours, theirs = self._toy_features(images, pixels), self._toy_features(reference)
            fid = fid_from_features(ours, theirs)
            pr = self._precision_recall(ours, theirs, f"toy seeded random conv ({FEATURE_DIM}-d)", reference)
        return {
            "fid_t": fid,
            "precision_recall": pr,
            "accuracy": accuracy,
            "features": f"toy seeded random conv ({FEATURE_DIM}-d, senseflow.metrics.shapes.features)",
            "evaluator": "senseflow.metrics.shapes.evaluator (rule-based)",
        }
