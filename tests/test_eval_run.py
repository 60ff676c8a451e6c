"""``senseflow eval run`` end to end on the toy world: tiny teacher, a one-iteration student, every
scorer on its tiny random model through the production loaders, records, table and image cache."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from senseflow.cli import main
from senseflow.config import ConfigError, load_config
from senseflow.eval.config import EvalConfig
from senseflow.eval.run import run_eval
from senseflow.metrics import fid as fid_module
from senseflow.metrics.clip_score import ClipScorer
from senseflow.metrics.frechet import fid_from_features
from senseflow.metrics.image_io import load_rgb
from senseflow.metrics.shapes.evaluator import evaluate
from senseflow.metrics.shapes.features import extract_features
from senseflow.metrics.weights import WeightsNotFoundError, sha256_file
from senseflow.train.trainer import Distiller
from tests.scorer_helpers import (
    TINY_HEADS,
    make_clip_tokenizer,
    make_tiny_clip,
    open_clip_state_dict,
)
from tests.test_fid import _NvidiaLike, _script_save, _small_extractor
from tests.test_scorer_imagereward import HEADS, MED_CONFIG, generated_bert_vocab, ir_state_dict
from tests.test_scorer_pickscore import processor_config
from tests.test_student import _cfg

# Every field of the spec's result record (§12), top level and model/reference/images.
RECORD_KEYS = {
    "schema",
    "model",
    "reference",
    "prompts",
    "images",
    "metrics",
    "software",
    "device",
    "created",
}
MODEL_KEYS = {
    "name",
    "checkpoint_sha256",
    "sampler",
    "nfe",
    "guidance",
    "seed_scheme",
    "seed_base",
    "resolution",
}
METRIC_KEYS = {"fid_t", "patch_fid_t", "clip_score", "hpsv2", "pickscore", "imagereward"}


@pytest.fixture(scope="module")
def student_run(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("student_run")
    Distiller(_cfg(tiny_teacher_dir, out, "schedule.iterations=1"), progress=False).run()
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny models laid out like real downloads (folders and files) for every pair scorer."""
    root = tmp_path_factory.mktemp("weights")
    tok = make_clip_tokenizer(tmp_path_factory)
    clip = root / "clip"
    make_tiny_clip(seed=0, logit_scale=math.log(100.0), tokenizer=tok).save_pretrained(clip)
    tok.save_pretrained(clip)
    hps = root / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": open_clip_state_dict(seed=11)}, hps)
    pick, proc = root / "pick", root / "proc"
    make_tiny_clip(seed=21, logit_scale=3.0, tokenizer=tok).save_pretrained(pick)
    tok.save_pretrained(proc)
    (proc / "preprocessor_config.json").write_text(json.dumps(processor_config(legacy=True)))
    ir = root / "ir"
    ir.mkdir()
    torch.save(ir_state_dict(seed=31), ir / "ImageReward.pt")
    (ir / "med_config.json").write_text(json.dumps(MED_CONFIG))
    bert = root / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(generated_bert_vocab()) + "\n", "utf-8")
    inception = root / "inception-2015-12-05.pt"
    torch.manual_seed(0)
    _script_save(_NvidiaLike(), inception)
    return {
        "root": root,
        "clip": clip,
        "hps": hps,
        "pick": pick,
        "proc": proc,
        "ir": ir,
        "bert": bert,
        "inception": inception,
        "clip_tokenizer": tok,
    }


def _recipe(tiny_teacher_dir, student_run, weights, out, **extra) -> dict:
    w = weights
    recipe = {
        "name": "toy test",
        "output_dir": str(out),
        "prompts": {"kind": "toy", "toy_per_split": 2, "toy_splits": ["train", "test", "heldout"]},
        "quantisation": "round",
        "reference": {"name": "teacher", "kind": "toy_teacher", "path": str(tiny_teacher_dir), "steps": 3},
        "reference_floor_seed_offset": 1000,
        "students": [
            {"name": "teacher-2", "kind": "toy_teacher", "path": str(tiny_teacher_dir), "steps": 2},
            {"name": "student", "kind": "student", "path": str(student_run)},
        ],
        "metrics": {
            "fid": {"enabled": True, "patch": False, "extractor": str(w["inception"])},
            "clip_score": {"enabled": True, "path": str(w["clip"])},
            "hpsv2": {
                "enabled": True,
                "version": "v2.1",
                "path": str(w["hps"]),
                "tokenizer": str(w["clip"]),
                "vision_heads": TINY_HEADS,
                "text_heads": TINY_HEADS,
            },
            "pickscore": {"enabled": True, "path": str(w["pick"]), "processor": str(w["proc"])},
            "imagereward": {
                "enabled": True,
                "path": str(w["ir"] / "ImageReward.pt"),
                "tokenizer": str(w["bert"]),
                "vision_heads": HEADS,
            },
            "batch_size": 4,
        },
    }
    recipe.update(extra)
    return recipe


@pytest.fixture(scope="module")
def small_fid(monkeypatch_module):
    """8-d Inception stand-in (a 2048-d sqrtm per FID would take ~20 s here); the real file loader
    is still called, so path resolution is exercised."""
    loaded = []
    real = fid_module.load_extractor

    def load(path, *args, **kwargs):
        loaded.append(real(path, *args, **kwargs).format)
        return _small_extractor(seed=3)

    monkeypatch_module.setattr(fid_module, "load_extractor", load)
    return loaded


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def evaluated(tiny_teacher_dir, student_run, weights, small_fid, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cfg = load_config(_recipe(tiny_teacher_dir, student_run, weights, out), schema=EvalConfig)
    return cfg, run_eval(cfg, progress=False)


def test_records_have_every_protocol_field(evaluated, small_fid):
    _, result = evaluated
    assert small_fid == ["nvidia_torchscript"]  # the configured file went through the real loader
    names = [r["model"]["name"] for r in result.records]
    assert names == ["teacher", "teacher-other-seeds", "teacher-2", "student"]
    for r in result.records:
        assert set(r) >= RECORD_KEYS and set(r["model"]) >= MODEL_KEYS and set(r["metrics"]) >= METRIC_KEYS
        assert r["schema"] == "senseflow.eval/1"
        assert r["images"] == {"quantisation": "round", "format": "png", "per_prompt": 1}
        assert r["prompts"]["count"] == 6
        on_disk = json.loads((result.out / "records" / f"{r['model']['name']}.json").read_text())
        assert on_disk["metrics"] == r["metrics"]
    teacher, _, teacher2, student = result.records
    assert teacher["metrics"]["fid_t"] is None and teacher["reference"] is None
    assert teacher["model"]["nfe"] == 6  # 3 steps x (cond + uncond)
    assert teacher2["model"]["steps"] == 2 and student["model"]["nfe"] == 4
    assert student["model"]["sampler"] == "renoise" and student["model"]["guidance"] is None
    assert student["reference"]["name"] == "teacher"
    for key in ("clip_score", "hpsv2", "pickscore", "imagereward"):
        assert isinstance(student["metrics"][key]["value"], float)
        assert student["metrics"][key]["n"] == 6
    assert student["metrics"]["hpsv2"]["version"] == "v2.1"
    assert student["metrics"]["fid_t"]["n"] == [6, 6]


def _images_of(result, name):
    record = next(r for r in result.records if r["model"]["name"] == name)
    folder = result.out / "images" / record["model"]["images"].rsplit("/", 1)[-1]
    index = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    return record, folder, index


def test_scores_belong_to_the_right_image_and_prompt(evaluated, weights):
    _, result = evaluated
    record, folder, index = _images_of(result, "student")
    rows = [
        json.loads(x) for x in (result.out / "records" / "student.per_image.jsonl").read_text().splitlines()
    ]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in index]
    assert [r["seed"] for r in index] == list(range(6))
    # Independent scoring of two single pairs with a separately loaded scorer.
    scorer = ClipScorer.from_path(weights["clip"])
    for i in (0, 5):
        image = load_rgb(folder / index[i]["file"])
        expected = scorer.score([image], [index[i]["prompt"]])[0]
        assert rows[i]["clip_score"] == pytest.approx(expected, abs=1e-6)
    assert record["metrics"]["clip_score"]["value"] == pytest.approx(np.mean([r["clip_score"] for r in rows]))
    # Toy panel: the evaluator and the toy features on the stored PNGs.
    pixels = np.stack([load_rgb(folder / r["file"]) for r in index])
    prompts = [r["prompt"] for r in index]
    assert record["metrics"]["toy"]["accuracy"] == evaluate(pixels, prompts)
    _, tfolder, tindex = _images_of(result, "teacher")
    teacher_pixels = np.stack([load_rgb(tfolder / r["file"]) for r in tindex])
    expected_fid = fid_from_features(extract_features(pixels), extract_features(teacher_pixels))
    assert record["metrics"]["toy"]["fid_t"] == pytest.approx(expected_fid, rel=1e-9)
    # FID-T on the (stand-in) extractor: features of the stored PNGs.
    ext = _small_extractor(seed=3)
    feats = [fid_module.extract_folder(f, ext)["clean299"].features for f in (folder, tfolder)]
    assert record["metrics"]["fid_t"]["value"] == pytest.approx(fid_from_features(*feats), rel=1e-6)


def test_teacher_images_follow_the_teacher_sampler(evaluated, tiny_teacher_dir):
    from senseflow.families.toy.pipeline import ToyTeacher
    from senseflow.metrics.shapes.evaluator import to_uint8

    _, result = evaluated
    _, folder, index = _images_of(result, "teacher-other-seeds")
    assert [r["seed"] for r in index] == [1000 + i for i in range(6)]
    teacher = ToyTeacher(tiny_teacher_dir)
    expected = to_uint8(teacher.sample([index[2]["prompt"]], [index[2]["seed"]], steps=3))[0]
    np.testing.assert_array_equal(load_rgb(folder / index[2]["file"]), expected)


def test_table_has_the_paper_layout(evaluated):
    _, result = evaluated
    text = result.table.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Model"))
    for col in ("FID-T", "CLIP", "HPSv2", "PickScore", "ImageReward", "Toy FID-T", "Compositional"):
        assert col in header
    assert "Patch FID-T" not in header  # not computed
    teacher_row = next(line for line in text.splitlines() if line.startswith("| teacher |"))
    assert teacher_row.split("|")[4].strip() == "--"  # the reference has no FID-T


def test_second_run_reuses_images_and_folder_source_matches(
    evaluated, tiny_teacher_dir, student_run, weights, tmp_path
):
    cfg, result = evaluated
    again = run_eval(cfg, progress=False)
    assert all(r["timing"]["generated_images"] == 0 for r in again.records)
    assert [r["metrics"]["clip_score"] for r in again.records] == [
        r["metrics"]["clip_score"] for r in result.records
    ]
    # The same student images handed in as a folder made elsewhere score the same.
    _, folder, _ = _images_of(result, "student")
    outside = tmp_path / "made_elsewhere"
    shutil.copytree(folder, outside, ignore=shutil.ignore_patterns("*.json*"))
    recipe = _recipe(tiny_teacher_dir, student_run, weights, result.out)
    recipe["students"] = [
        {"name": "from-folder", "kind": "folder", "path": str(outside), "sampler": "renoise"}
    ]
    rec = run_eval(load_config(recipe, schema=EvalConfig), progress=False).records[-1]
    student = next(r for r in result.records if r["model"]["name"] == "student")
    for key in ("clip_score", "hpsv2", "pickscore", "imagereward", "fid_t"):
        assert rec["metrics"][key]["value"] == pytest.approx(student["metrics"][key]["value"], abs=1e-9)


def test_bad_recipes_fail_with_one_clear_error(tiny_teacher_dir, student_run, weights, tmp_path):
    recipe = _recipe(tiny_teacher_dir, student_run, weights, tmp_path)
    recipe["metrics"]["hpsv2"].pop("version")
    with pytest.raises(ConfigError, match="hpsv2"):
        load_config(recipe, schema=EvalConfig)
    recipe = _recipe(tiny_teacher_dir, student_run, weights, tmp_path)
    recipe["students"][0]["name"] = "teacher"
    with pytest.raises(ConfigError, match="unique"):
        load_config(recipe, schema=EvalConfig)
    recipe = _recipe(tiny_teacher_dir, student_run, weights, tmp_path, students=[])
    recipe["reference"]["kind"] = "sdxl_pipeline"
    with pytest.raises(ValueError, match=r"unknown kind 'sdxl_pipeline'.*toy_teacher"):
        run_eval(load_config(recipe, schema=EvalConfig), progress=False)
    recipe = _recipe(tiny_teacher_dir, student_run, weights, tmp_path, students=[])
    recipe["metrics"]["pickscore"].pop("path")  # falls back to the manifest, but no root is configured
    with pytest.raises(WeightsNotFoundError, match=r"pickscore\.model"):
        run_eval(load_config(recipe, schema=EvalConfig), progress=False)


def test_cli_run_and_weights_listing(tiny_teacher_dir, tmp_path, capsys):
    import yaml

    recipe = {
        "output_dir": str(tmp_path / "out"),
        "prompts": {"kind": "toy", "toy_per_split": 1},
        "reference": {"name": "teacher", "kind": "toy_teacher", "path": str(tiny_teacher_dir), "steps": 2},
        "students": [{"name": "fast", "kind": "toy_teacher", "path": str(tiny_teacher_dir), "steps": 1}],
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["eval", "run", "--quiet", str(path), "prompts.toy_per_split=2"]) == 0
    out = capsys.readouterr().out
    assert "| fast | euler | 2 |" in out and "Compositional" in out
    assert json.loads((tmp_path / "out" / "records" / "fast.json").read_text())["prompts"]["count"] == 6
    assert main(["eval", "weights", "--root", str(tmp_path / "empty")]) == 0
    listing = capsys.readouterr().out
    assert "fid.inception " in listing and "missing" in listing and "hps/HPS_v2.1_compressed.pt" in listing


def test_weights_root_layout_is_enough(tiny_teacher_dir, weights, small_fid, tmp_path, capsys):
    """No explicit paths: every file found at its manifest place under the root (HPS borrows the
    ViT-H-14 tokenizer of the PickScore processor files)."""
    w, root = weights, tmp_path / "root"
    layout = {
        "fid/inception-2015-12-05.pt": w["inception"],
        "clip/CLIP-ViT-g-14-laion2B-s12B-b42K": w["clip"],
        "hps/HPS_v2.1_compressed.pt": w["hps"],
        "pickscore/PickScore_v1": w["pick"],
        "pickscore/CLIP-ViT-H-14-processor": w["proc"],
        "imagereward/ImageReward.pt": w["ir"] / "ImageReward.pt",
        "imagereward/med_config.json": w["ir"] / "med_config.json",
        "tokenizers/bert-base-uncased": w["bert"],
    }
    for rel, src in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / rel)
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "weights_root": str(root),
        "prompts": {"kind": "toy", "toy_per_split": 1},
        "reference": {"name": "teacher", "kind": "toy_teacher", "path": str(tiny_teacher_dir), "steps": 2},
        "students": [{"name": "fast", "kind": "toy_teacher", "path": str(tiny_teacher_dir), "steps": 1}],
        "metrics": {
            "fid": {"enabled": True, "patch": False},
            "clip_score": {"enabled": True},
            "hpsv2": {
                "enabled": True,
                "version": "v2.1",
                "vision_heads": TINY_HEADS,
                "text_heads": TINY_HEADS,
            },
            "pickscore": {"enabled": True},
            "imagereward": {"enabled": True, "vision_heads": HEADS},
        },
    }
    record = run_eval(load_config(recipe, schema=EvalConfig), progress=False).records[-1]
    assert all(record["metrics"][k]["value"] is not None for k in METRIC_KEYS - {"patch_fid_t"})
    assert set(record["weights"]) == {
        "fid.inception", "clip.vit_g14.hf", "hps.v2.1", "pickscore.model", "pickscore.processor",
        "imagereward.model", "imagereward.med_config", "tokenizer.bert_base_uncased",
    }  # fmt: skip
    assert record["weights"]["hps.v2.1"]["sha256"] == sha256_file(w["hps"])
    assert main(["eval", "weights", "--root", str(root)]) == 0
    listing = capsys.readouterr().out
    assert "hps/HPS_v2.1_compressed.pt" in listing and listing.count("present") >= 5
