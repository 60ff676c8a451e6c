"""T2I-CompBench through ``senseflow eval run``: a synthetic benchmark checkout, tiny BLIP-VQA and CLIP,
the toy teacher as two models, detections for one of them, and the official-script hand-off."""

from __future__ import annotations

import json

import numpy as np
import pytest

from senseflow.config import load_config
from senseflow.eval.config import EvalConfig
from senseflow.eval.prompts import build_compbench_prompts
from senseflow.eval.run import run_eval
from senseflow.metrics.compbench.blip_vqa import write_fallback_vocab
from senseflow.metrics.compbench.spatial import Detection, write_detections_jsonl
from senseflow.metrics.image_io import load_rgb
from tests.test_compbench_blip import save_tiny_blip
from tests.test_compbench_clip import tiny_clip_dir  # noqa: F401  (fixture)

IPP = 2  # images per prompt
LISTS = {
    "color_val.txt": ["a red circle", "a blue square"],
    "shape_val.txt": ["a green triangle", "a yellow circle"],
    "texture_val.txt": ["a purple square", "a cyan triangle"],
    "spatial_val.txt": [
        "a red circle on the left of a blue square",
        "a green triangle on the right of a red circle",
    ],
    "non_spatial_val.txt": ["a red circle", "a large blue square"],
    "complex_val.txt": ["a red circle on the left of a blue square", "a green triangle near a red circle"],
    "complex_val_spatial.txt": ["a red circle on the left of a blue square"],
    "complex_val_action.txt": ["a green triangle near a red circle"],
    "complex_val_spatialaction.txt": [],
}
ADJ = {"red", "blue", "green", "yellow", "purple", "cyan", "large", "small"}
NOUN = {"circle", "square", "triangle", "left", "right"}


class _Doc:
    """spaCy-like doc: whitespace tokens tagged by word lists; noun chunks = DET ADJ* NOUN."""

    def __init__(self, text):
        words = text.split()
        pos = [
            "ADJ" if w in ADJ else "NOUN" if w in NOUN else "DET" if w in ("a", "the") else "ADP"
            for w in words
        ]
        self._tokens = [
            type("T", (), {"text": w, "pos_": p, "whitespace_": " " if i < len(words) - 1 else ""})()
            for i, (w, p) in enumerate(zip(words, pos, strict=True))
        ]
        self.noun_chunks, start = [], None
        for i, p in enumerate(pos):
            if p == "DET":
                start = i
            elif p == "NOUN" and start is not None:
                self.noun_chunks.append(type("S", (), {"start": start, "end": i + 1})())
                start = None

    def __iter__(self):
        return iter(self._tokens)


class _Nlp:
    def __init__(self):
        self.meta = {"lang": "en", "name": "word_lists", "version": "0.0"}

    def __call__(self, text):
        return _Doc(text)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip_dir, tiny_teacher_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("compbench")
    dataset = root / "dataset"
    dataset.mkdir()
    for name, lines in LISTS.items():
        (dataset / name).write_text("".join(f"{line}\n" for line in lines))
    prompts_dir = root / "prompts"
    counts = dict.fromkeys(("color", "shape", "texture", "spatial", "non_spatial", "complex"), 2)
    build_compbench_prompts(dataset, prompts_dir, sidecar=True, nlp=_Nlp(), expected_counts=counts)
    vocab = write_fallback_vocab(root / "bert" / "vocab.txt")
    n = len(vocab.read_text().splitlines())
    save_tiny_blip(root / "blip", n + 2, n, 3, bias={5: 1.0})
    # Detections for the teacher only: line 0 of spatial/complex has both objects apart (score 0.95),
    # line 1 a single object (0.25 * 0.9 < 0.5, so 0).
    good = [Detection("circle", 0.9, 0, 0, 10, 10), Detection("square", 0.9, 100, 0, 110, 10)]
    one = [Detection("triangle", 0.9, 0, 0, 10, 10)]
    for cat in ("spatial", "complex"):
        dets = {line * IPP + k: (good if line == 0 else one) for line in range(2) for k in range(IPP)}
        write_detections_jsonl(dets, root / "detections" / "teacher" / f"{cat}.jsonl")
    recipe = {
        "output_dir": str(root / "out"),
        "prompts": {"kind": "toy", "toy_per_split": 1},
        "reference": {"name": "teacher", "kind": "toy_teacher", "path": str(tiny_teacher_dir), "steps": 2},
        "students": [{"name": "fast", "kind": "toy_teacher", "path": str(tiny_teacher_dir), "steps": 1}],
        "metrics": {
            "toy": {"enabled": False},
            "compbench": {
                "enabled": True,
                "prompts_dir": str(prompts_dir),
                "images_per_prompt": IPP,
                "blip_vqa": str(root / "blip"),
                "blip_tokenizer": str(vocab),
                "clip": str(tiny_clip_dir),
                "detections_dir": str(root / "detections"),
                "vqa_image_size": 32,
            },
        },
    }
    cfg = load_config(recipe, schema=EvalConfig)
    return root, cfg, run_eval(cfg, progress=False)


def test_every_category_is_scored_for_the_model_with_detections(setup):
    root, _, result = setup
    teacher = result.records[0]["metrics"]["compbench"]
    cats = teacher["per_category"]
    assert set(cats) == {"color", "shape", "texture", "spatial", "non_spatial", "complex"}
    assert all(c["n"] == 2 * IPP for c in cats.values())
    assert cats["spatial"]["value"] == pytest.approx(0.95 / 2)  # (0.95 * IPP + 0 * IPP) / (2 * IPP)
    assert teacher["images_per_prompt"] == IPP and teacher["spatial_detector"] == "unidet-official"
    assert teacher["sidecar_spacy"].endswith("en_word_lists-0.0") and teacher["missing"] == {}
    rows = [
        json.loads(x) for x in (root / "out" / "records" / "teacher.compbench.jsonl").read_text().splitlines()
    ]
    complex_rows = [r for r in rows if r["category"] == "complex"]
    for r in (
        complex_rows
    ):  # 3-in-1: spatial subset -> (spatial + attribute)/2, action subset -> (action + attribute)/2
        d = r["details"]
        other = d["spatial"] if d["rule"] == "spatial" else d["action"]
        assert d["rule"] == ("spatial" if r["prompt_line"] == 0 else "action")
        assert r["score"] == pytest.approx((d["attribute"] + other) / 2)
    assert [r["seed"] for r in rows if r["category"] == "color"] == list(range(2 * IPP))


def test_images_follow_the_index_and_seeds(setup, tiny_teacher_dir):
    from senseflow.families.toy.pipeline import ToyTeacher
    from senseflow.metrics.image_io import quantise

    root, cfg, _ = setup
    folder = next((root / "out" / "compbench" / "images" / "shape").glob("teacher-*"))
    idx = 3  # line 1, k = 1
    sample = ToyTeacher(tiny_teacher_dir).sample([LISTS["shape_val.txt"][1]], [idx], steps=2)
    expected = quantise(sample, cfg.quantisation)[0]  # the recipe's rule: truncate (the default)
    np.testing.assert_array_equal(load_rgb(folder / f"{idx:05d}.png"), expected)


def test_missing_detections_export_the_official_layout_then_read_its_result(setup):
    root, cfg, result = setup
    fast = result.records[-1]["metrics"]["compbench"]
    assert fast["per_category"]["color"]["n"] == 2 * IPP
    assert set(fast["missing"]) == {"spatial", "complex"}
    samples = root / "out" / "compbench" / "official" / "fast" / "spatial" / "samples"
    names = sorted(p.name for p in samples.iterdir())
    assert "a red circle on the left of a blue square_000000.png" in names and len(names) == 2 * IPP
    table = result.table.read_text()
    assert "## T2I-CompBench" in table
    table2 = table.split("## T2I-CompBench")[1]
    fast_row = next(line for line in table2.splitlines() if line.startswith("| fast |"))
    assert fast_row.split("|")[5].strip() == "--"  # spatial column
    # The official script's answer file, as it would write it into that layout, is read on the next run.
    answers = root / "out" / "compbench" / "official" / "fast" / "spatial" / "labels"
    answers = answers / "annotation_obj_detection_2d" / "vqa_result.json"
    answers.parent.mkdir(parents=True)
    answers.write_text(json.dumps([{"question_id": i, "answer": f"{0.1 * i:.4f}"} for i in range(2 * IPP)]))
    again = run_eval(cfg, progress=False).records[-1]["metrics"]["compbench"]
    assert again["per_category"]["spatial"]["value"] == pytest.approx(
        np.mean([0.1 * i for i in range(2 * IPP)])
    )
    assert again["per_category"]["spatial"]["info"]["source"] == "official"
