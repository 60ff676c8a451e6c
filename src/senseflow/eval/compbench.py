"""T2I-CompBench inside ``senseflow eval run`` (paper Table 2).

For each category the prompt list (built by ``senseflow eval build-prompts compbench``) becomes an
index of ``images_per_prompt`` images per prompt (``idx = line * n + k``, seed = base + idx); every
model's images come from the same image store as the Table 1 panel. Scoring per category:

* colour, shape, texture: BLIP-VQA yes-probability product over the sidecar's noun chunks;
* non-spatial: CLIP ViT-B/32 cosine with the prompt;
* spatial: the pure-Python 2D rules over detections (``detections_dir/<model>/<category>.jsonl``),
  or the official UniDet script's ``vqa_result.json`` written into the exported official layout;
* complex: 3-in-1 of BLIP-VQA, spatial (complex mode) and CLIP on the adjective-free prompt.

A category whose detections are missing is reported as ``--`` and its official layout is exported so
the official detector can run externally; the next run reads its result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from senseflow.eval.config import EvalConfig
from senseflow.eval.images import ensure_images
from senseflow.eval.sources import ImageSource
from senseflow.metrics.weights import resolve

__all__ = ["CompBenchRunner"]

ATTRIBUTE = ("color", "shape", "texture")


def _scores(cs) -> dict[int, float]:
    return {r.idx: r.score for r in cs.records}


class CompBenchRunner:
    """Loads the prompt lists, sidecar and models once; :meth:`evaluate` scores one model."""

    def __init__(self, cfg: EvalConfig, progress: bool = True):
        from senseflow.eval.prompts import load_compbench_prompts
        from senseflow.metrics.compbench.layout import build_index
        from senseflow.metrics.compbench.three_in_one import SubsetLines

        self.cfg, self.cb, self.progress = cfg, cfg.metrics.compbench, progress
        folder = Path(self.cb.prompts_dir or "").expanduser()
        if not (folder / "compbench.provenance.json").is_file():
            raise FileNotFoundError(
                f"metrics.compbench.prompts_dir: {folder} holds no compbench.provenance.json "
                "(build it with 'senseflow eval build-prompts compbench --dataset ... --out ...')"
            )
        lists = load_compbench_prompts(folder)
        self.indices = {}
        for cat in self.cb.categories:
            prompts = lists[cat][: self.cb.limit_prompts] if self.cb.limit_prompts else lists[cat]
            self.indices[cat] = build_index(
                cat, prompts, self.cb.images_per_prompt, self.cfg.seeds.base, image_pattern="{idx:05d}.png"
            )
        self.subsets = SubsetLines(
            tuple(lists.get("complex_spatial", ())), tuple(lists.get("complex_action", ()))
        )
        needs_sidecar = set(self.cb.categories) & {*ATTRIBUTE, "spatial", "complex"}
        self.sidecar = None
        if needs_sidecar:
            from senseflow.metrics.compbench.sidecar import load_sidecar

            self.sidecar = load_sidecar(folder / "compbench.sidecar.json")
        self.blip = self.clip = None
        self.weights: dict[str, Any] = {}
        root = cfg.weights_root
        if set(self.cb.categories) & {*ATTRIBUTE, "complex"}:
            from senseflow.metrics.compbench.blip_vqa import BlipVqaOptions, load_blip_vqa

            w = resolve("compbench.blip_vqa", self.cb.blip_vqa, root=root, verify=self.cb.blip_vqa is None)
            self.blip = load_blip_vqa(w.path, self.cb.blip_tokenizer, device=cfg.device)
            self.vqa_options = BlipVqaOptions(
                np_num=self.cb.np_num,
                exclude_chunks=tuple(self.cb.exclude_chunks),
                round4=self.cb.round4,
                image_size=self.cb.vqa_image_size,
                batch_size=self.cb.batch_size,
            )
            self.weights["compbench.blip_vqa"] = self.blip.provenance
        if set(self.cb.categories) & {"non_spatial", "complex"}:
            from senseflow.metrics.compbench.clip_score import load_clip_b32

            w = resolve("compbench.clip_vit_b32", self.cb.clip, root=root, verify=self.cb.clip is None)
            self.clip = load_clip_b32(w.path, device=cfg.device)
            self.weights["compbench.clip_vit_b32"] = self.clip.provenance

    # ----------------------------------------------------------------------------------- spatial

    def _spatial(self, model: str, cat: str, index, folder: Path, complex_mode: bool):
        """Spatial scores from detections or the official result; None (layout exported) if neither."""
        from senseflow.metrics.compbench.official import (
            export_official_layout,
            find_official_result,
            official_category_scores,
            read_official_scores,
        )
        from senseflow.metrics.compbench.spatial import read_detections_jsonl, score_spatial

        if self.cb.detections_dir:
            path = Path(self.cb.detections_dir).expanduser() / model / f"{cat}.jsonl"
            if path.is_file():
                dets = read_detections_jsonl(path)
                return score_spatial(index, dets, self.sidecar, complex_mode, detector=self.cb.detector)
        official = Path(self.cfg.output_dir) / "compbench" / "official" / model / cat
        try:
            result = find_official_result(official, "spatial")
        except FileNotFoundError:
            if self.cb.export_official:
                export_official_layout(index, folder, official, mode="symlink", overwrite=True)
            return None
        return official_category_scores(index, read_official_scores(result), "spatial", result)

    # ---------------------------------------------------------------------------------- scoring

    def evaluate(self, source: ImageSource) -> tuple[dict[str, Any], dict[str, float | None], list]:
        """(``metrics.compbench`` block, ``{category: value}`` table row, per-image score records)."""
        from senseflow.metrics.compbench.blip_vqa import score_attribute
        from senseflow.metrics.compbench.clip_score import score_clip
        from senseflow.metrics.compbench.report import compbench_block
        from senseflow.metrics.compbench.three_in_one import merge_three_in_one

        name = source.entry.name
        results, row, per_image, missing = [], {}, [], []
        for cat, index in self.indices.items():
            images = ensure_images(
                source.subset(cat),
                [e.prompt for e in index.entries],
                [e.seed for e in index.entries],
                Path(self.cfg.output_dir) / "compbench" / "images" / cat,
                self.cfg.quantisation,
                batch_size=source.entry.batch_size,
                progress=self.progress,
            )
            folder = images.folder
            if cat in ATTRIBUTE:
                cs = score_attribute(self.blip, index, folder, self.sidecar, self.vqa_options)
            elif cat == "non_spatial":
                cs = score_clip(self.clip, index, folder, batch_size=self.cb.batch_size)
            elif cat == "spatial":
                cs = self._spatial(name, cat, index, folder, complex_mode=False)
            else:
                spatial = self._spatial(name, cat, index, folder, complex_mode=True)
                cs = None
                if spatial is not None:
                    attribute = score_attribute(self.blip, index, folder, self.sidecar, self.vqa_options)
                    action = score_clip(
                        self.clip,
                        index,
                        folder,
                        self.sidecar,
                        complex_mode=True,
                        batch_size=self.cb.batch_size,
                    )
                    cs = merge_three_in_one(
                        index, self.subsets, _scores(attribute), _scores(spatial), _scores(action)
                    )
            if cs is None:
                missing.append(cat)
                row[cat] = None
                continue
            results.append(cs)
            row[cat] = cs.value
            per_image += [r.to_json() for r in cs.records]
        block = compbench_block(
            results,
            evaluator_version=self.cb.evaluator_version,
            images_per_prompt=self.cb.images_per_prompt,
            np_num=self.cb.np_num,
            exclude_chunks=self.cb.exclude_chunks,
            round4=self.cb.round4,
            vqa_image_size=self.cb.vqa_image_size,
            sidecar_spacy=self.sidecar.label if self.sidecar is not None else None,
            spatial_detector=self.cb.detector if "spatial" in row and row["spatial"] is not None else None,
        )
        block["missing"] = {
            cat: "no detections: run the official spatial script on "
            f"{Path(self.cfg.output_dir) / 'compbench' / 'official' / name / cat} or give detections_dir"
            for cat in missing
        }
        block["prompts_per_category"] = {cat: len(ix.prompts) for cat, ix in self.indices.items()}
        block["weights"] = self.weights
        return block, row, per_image
