"""k-NN precision/recall and intra-prompt diversity (senseflow.metrics.coverage) against hand
computations, and both through ``senseflow eval run`` on the shapes world (records and table)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from senseflow.config import load_config
from senseflow.eval.config import EvalConfig
from senseflow.eval.images import diversity_plan
from senseflow.eval.record import markdown_table
from senseflow.eval.run import run_eval
from senseflow.metrics import fid as fid_module
from senseflow.metrics.coverage import (
    intra_prompt_diversity,
    knn_radii,
    mean_pairwise_distance,
    precision_recall,
    within_spheres,
)
from senseflow.metrics.image_io import load_rgb
from senseflow.metrics.shapes.features import extract_features
from tests.test_fid import _small_extractor

# ------------------------------------------------------------------------------- precision / recall

REF_1D = [0.0, 1.0, 2.0, 3.0, 10.0]


def test_knn_radii_by_hand():
    # k = 1: nearest other point; k = 2: second nearest (the point itself never counts)
    np.testing.assert_allclose(knn_radii(REF_1D, k=1), [1, 1, 1, 1, 7])
    np.testing.assert_allclose(knn_radii(REF_1D, k=2), [2, 1, 1, 2, 8])
    np.testing.assert_allclose(knn_radii(REF_1D, k=3), [3, 2, 2, 3, 9])
    # a duplicate is a neighbour at distance 0
    np.testing.assert_allclose(knn_radii([0.0, 0.0, 5.0], k=1), [0, 0, 5])


def test_precision_recall_by_hand_1d():
    # reference radii (k = 1): [1, 1, 1, 1, 7]; model radii (k = 1): -1.5 -> 2, 0.5 -> 2, 5 -> 4.5, 20 -> 15
    model = [0.5, 5.0, 20.0, -1.5]
    # 0.5 is within 1 of 0 and 1; 5 is within 7 of 10; 20 is 10 from 10 (> 7); -1.5 is 1.5 from 0 (> 1)
    np.testing.assert_array_equal(
        within_spheres(model, REF_1D, knn_radii(REF_1D, k=1)), [True, True, False, False]
    )
    # every reference point lies in a model ball: 0, 1, 2 near 0.5 (<= 2); 3 is 2 from 5 (<= 4.5);
    # 10 is 10 from 20 (<= 15)
    result = precision_recall(REF_1D, model, k=1)
    assert (result.precision, result.recall) == (0.5, 1.0)
    assert (result.n_model, result.n_reference, result.k) == (4, 5, 1)
    # the balls are closed: a point exactly at the radius is inside
    assert precision_recall([0.0, 1.0], [2.0, 3.0], k=1).precision == 0.5


def test_identical_sets_and_far_sets():
    x = np.random.default_rng(0).standard_normal((60, 8))
    same = precision_recall(x, x.copy(), k=3)
    assert (same.precision, same.recall) == (1.0, 1.0)
    far = precision_recall(x, x + 1000.0, k=3)
    assert (far.precision, far.recall) == (0.0, 0.0)


def test_half_the_modes_gives_half_the_recall():
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    reference = np.concatenate([c + rng.standard_normal((25, 2)) for c in centres])
    # the model reproduces two of the four modes exactly: all its samples are real, half the modes
    subset = precision_recall(reference, reference[:50], k=3)
    assert (subset.precision, subset.recall) == (1.0, 0.5)
    # fresh samples of the same two modes: recall close to 0.5, never above it
    fresh = np.concatenate([c + rng.standard_normal((50, 2)) for c in centres[:2]])
    result = precision_recall(reference, fresh, k=3)
    assert 0.4 <= result.recall <= 0.5 and result.precision >= 0.85


def test_against_brute_force_distances():
    rng = np.random.default_rng(2)
    ref, gen = rng.standard_normal((70, 5)), rng.standard_normal((40, 5)) * 1.3 + 0.4
    for k in (1, 3, 5):
        d_ref = np.sort(cdist(ref, ref), axis=1)[:, k]  # column 0 is the point itself
        d_gen = np.sort(cdist(gen, gen), axis=1)[:, k]
        np.testing.assert_allclose(knn_radii(ref, k), d_ref, rtol=1e-9, atol=1e-12)
        precision = (cdist(gen, ref) <= d_ref[None, :]).any(axis=1).mean()
        recall = (cdist(ref, gen) <= d_gen[None, :]).any(axis=1).mean()
        result = precision_recall(ref, gen, k=k)
        assert (result.precision, result.recall) == (precision, recall)
        if k == 1:  # not a trivial case
            assert 0 < recall < 1 and 0 < precision < 1


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(3)
    ref, gen = rng.standard_normal((257, 32)), rng.standard_normal((190, 32)) + 0.3
    whole = precision_recall(ref, gen, k=3, chunk_size=10_000)
    radii = knn_radii(ref, 3, chunk_size=10_000)
    for chunk in (1, 7, 64, 256):
        np.testing.assert_allclose(knn_radii(ref, 3, chunk_size=chunk), radii, rtol=1e-12)
        assert precision_recall(ref, gen, k=3, chunk_size=chunk) == whole


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="more than k = 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match="dimension"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(ValueError, match="NaN"):
        knn_radii(np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="chunk_size"):
        knn_radii(np.zeros((5, 2)), chunk_size=0)


# ---------------------------------------------------------------------------------------- diversity


def test_diversity_by_hand():
    first = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])  # pairwise 5, 10, 5
    second = np.array([[1.0, 1.0], [1.0, 1.0]])  # identical images: 0
    assert mean_pairwise_distance(first) == pytest.approx(20 / 3, rel=1e-12)
    value, per_prompt = intra_prompt_diversity([first, second])
    assert per_prompt == pytest.approx([20 / 3, 0.0], abs=1e-12)
    assert value == pytest.approx(10 / 3, rel=1e-12)
    value, _ = intra_prompt_diversity(np.stack([first[:2], first[1:]]))  # [P, K, D] array
    assert value == pytest.approx(5.0)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(first[:1])


def test_diversity_plan_orders_prompts_and_seeds():
    prompts, seeds, rule = diversity_plan(["a", "b", "c"], base=10, offset=100, count=2, per_prompt=3)
    assert prompts == ["a", "a", "a", "b", "b", "b"]
    assert seeds == [110, 111, 112, 113, 114, 115]
    assert rule == "10 + 100 + prompt * 3 + k"
    assert len(diversity_plan(["a"], 0, 0, count=5, per_prompt=2)[0]) == 2  # capped by the prompt count


def test_table_columns_appear_with_their_blocks():
    def record(name, metrics):
        return {"model": {"name": name, "sampler": "euler", "nfe": 2}, "metrics": metrics}

    missing = {"value": None, "missing": "no images"}
    records = [
        record("ref", {"precision_recall": None, "diversity": {"value": 1.25}}),
        record("a", {"precision_recall": {"precision": 0.5, "recall": 0.25}, "diversity": missing}),
    ]
    lines = markdown_table(records).splitlines()
    assert lines[0] == "| Model | Sampler | NFE | Precision ↑ | Recall ↑ | Diversity ↑ |"
    assert lines[2] == "| ref | euler | 2 | -- | -- | 1.250 |"
    assert lines[3] == "| a | euler | 2 | 0.500 | 0.250 | -- |"
    assert "Precision" not in markdown_table([records[0]])  # no record has the block


# ------------------------------------------------------------------------------- senseflow eval run

SEEDS_PER_PROMPT, DIVERSITY_PROMPTS = 2, 3


@pytest.fixture(scope="module")
def evaluated(tiny_teacher_dir, tmp_path_factory):
    """The shipped eval/toy recipe, shrunk: tiny teacher at 2 steps as the reference (with the FID-T
    floor), at 1 step as a student, the same 1-step images handed in as a folder (without diversity
    images); FID-T on an 8-d stand-in extractor so precision/recall and diversity run on both the
    Inception path and the toy features."""
    out = tmp_path_factory.mktemp("coverage_eval")
    extractor_file = out / "stand-in-inception.pt"
    extractor_file.write_bytes(b"not read: load_extractor is replaced")
    mp = pytest.MonkeyPatch()
    mp.setattr(fid_module, "load_extractor", lambda *a, **k: _small_extractor(seed=3))
    teacher = str(tiny_teacher_dir)
    overrides = [
        f"output_dir={out / 'run'}",
        "prompts.toy_per_split=2",
        f"reference={{name: teacher, kind: toy_teacher, path: {teacher}, steps: 2}}",
        "reference_floor_seed_offset=1000",
        f"students=[{{name: fast, kind: toy_teacher, path: {teacher}, steps: 1}}]",
        f"metrics.fid={{enabled: true, patch: false, extractor: {extractor_file}}}",
        f"metrics.diversity={{prompts: {DIVERSITY_PROMPTS}, seeds_per_prompt: {SEEDS_PER_PROMPT}}}",
    ]
    try:
        cfg = load_config("eval/toy", overrides, schema=EvalConfig)
        first = run_eval(cfg, progress=False)
        fast = next(r for r in first.records if r["model"]["name"] == "fast")
        outside = out / "made_elsewhere"
        shutil.copytree(fast["model"]["images"], outside, ignore=shutil.ignore_patterns("*.json*"))
        folder = {"name": "folder", "kind": "folder", "path": str(outside)}
        students = [*cfg.students, cfg.students[0].model_copy(update=folder)]
        result = run_eval(cfg.model_copy(update={"students": students}), progress=False)
    finally:
        mp.undo()
    return cfg, first, result


def _record(result, name):
    return next(r for r in result.records if r["model"]["name"] == name)


def _pixels(folder):
    rows = [json.loads(x) for x in (folder / "index.jsonl").read_text().splitlines()]
    return np.stack([load_rgb(folder / r["file"]) for r in rows]), rows


def test_eval_records_carry_precision_recall(evaluated):
    cfg, _, result = evaluated
    assert cfg.metrics.precision_recall.k == 3  # the documented default
    teacher, floor, fast = (_record(result, n) for n in ("teacher", "teacher-other-seeds", "fast"))
    assert teacher["metrics"]["precision_recall"] is None  # the reference against itself: 1 by construction
    assert teacher["metrics"]["toy"]["precision_recall"] is None
    for record in (floor, fast):
        for block in (record["metrics"]["precision_recall"], record["metrics"]["toy"]["precision_recall"]):
            assert block["k"] == 3 and block["n"] == [6, 6] and block["reference"] == "teacher"
            assert 0.0 <= block["precision"] <= 1.0 and 0.0 <= block["recall"] <= 1.0
    # the toy block is the pure function on the toy features of the stored PNGs
    ours, _ = _pixels(result.out / "images" / fast["model"]["images"].rsplit("/", 1)[-1])
    theirs, _ = _pixels(result.out / "images" / teacher["model"]["images"].rsplit("/", 1)[-1])
    expected = precision_recall(extract_features(theirs), extract_features(ours), k=3)
    block = fast["metrics"]["toy"]["precision_recall"]
    assert (block["precision"], block["recall"]) == (expected.precision, expected.recall)
    # the Inception-path block uses the FID-T features of the same images
    ext = _small_extractor(seed=3)
    feats = [
        fid_module.extract_folder(result.out / "images" / r["model"]["images"].rsplit("/", 1)[-1], ext)[
            "clean299"
        ].features
        for r in (teacher, fast)
    ]
    expected = precision_recall(feats[0], feats[1], k=3)
    block = fast["metrics"]["precision_recall"]
    assert (block["precision"], block["recall"]) == (expected.precision, expected.recall)
    assert "Inception" in block["features"]


def test_eval_records_carry_diversity(evaluated):
    _, first, result = evaluated
    teacher, floor, fast, folder = (
        _record(result, n) for n in ("teacher", "teacher-other-seeds", "fast", "folder")
    )
    assert floor["metrics"]["diversity"] is None and floor["metrics"]["toy"]["diversity"] is None
    for record in (teacher, fast):
        block = record["metrics"]["toy"]["diversity"]
        assert block["missing"] is None and block["prompts"] == DIVERSITY_PROMPTS
        assert (
            block["seeds_per_prompt"] == SEEDS_PER_PROMPT and block["seeds"] == "0 + 2000000 + prompt * 2 + k"
        )
        pixels, rows = _pixels(result.out / "images" / "diversity" / block["images"].rsplit("/", 1)[-1])
        assert [r["seed"] for r in rows] == [2_000_000 + i for i in range(6)]
        assert [r["prompt"] for r in rows][::2] == [r["prompt"] for r in rows][1::2]  # K seeds per prompt
        groups = extract_features(pixels).reshape(DIVERSITY_PROMPTS, SEEDS_PER_PROMPT, -1)
        assert block["value"] == pytest.approx(intra_prompt_diversity(groups)[0], rel=1e-12)
        assert block["value"] > 0  # different seeds make different images
        assert block["layout"]["prompts_used"] <= DIVERSITY_PROMPTS
        assert record["metrics"]["diversity"]["value"] > 0  # Inception path
        assert "Inception" in record["metrics"]["diversity"]["features"]
    # the teacher's diversity images follow its own steps: its folder differs from the student's
    assert teacher["metrics"]["toy"]["diversity"]["images"] != fast["metrics"]["toy"]["diversity"]["images"]
    # a folder source without <folder>/diversity/: reported missing with the reason, not a crash
    block = folder["metrics"]["toy"]["diversity"]
    assert block["value"] is None and "diversity" in block["missing"] and "does not exist" in block["missing"]
    assert folder["metrics"]["diversity"]["value"] is None
    # the second run regenerated nothing
    assert first.records[0]["timing"]["generated_diversity_images"] == DIVERSITY_PROMPTS * SEEDS_PER_PROMPT
    assert all(r["timing"]["generated_diversity_images"] == 0 for r in result.records)
    assert folder["metrics"]["toy"]["precision_recall"] == fast["metrics"]["toy"]["precision_recall"]


def test_eval_table_carries_the_new_columns(evaluated):
    _, _, result = evaluated
    text = result.table.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Model"))
    for col in ("Precision ↑", "Recall ↑", "Diversity ↑", "Toy precision ↑", "Toy recall ↑",
                "Toy diversity ↑", "Layout diversity ↑"):  # fmt: skip
        assert col in header
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| Model")
    }
    assert rows["teacher"][cols.index("Precision ↑")] == "--"
    assert rows["fast"][cols.index("Toy diversity ↑")] != "--"
    assert rows["folder"][cols.index("Toy diversity ↑")] == "--"
    assert "k = 3" in text and "Diversity:" in text


def test_folder_source_reads_its_diversity_folder(evaluated, tmp_path):
    """Images made elsewhere: <folder>/diversity/ in diversity_plan order gives the same value."""
    cfg, _, result = evaluated
    fast = _record(result, "fast")
    outside = tmp_path / "elsewhere"
    shutil.copytree(fast["model"]["images"], outside, ignore=shutil.ignore_patterns("*.json*"))
    shutil.copytree(
        fast["metrics"]["toy"]["diversity"]["images"],
        outside / "diversity",
        ignore=shutil.ignore_patterns("*.json*"),
    )
    entry = cfg.students[0].model_copy(update={"name": "folder2", "kind": "folder", "path": str(outside)})
    toy_only = cfg.metrics.model_copy(update={"fid": cfg.metrics.fid.model_copy(update={"enabled": False})})
    run = cfg.model_copy(
        update={"students": [entry], "metrics": toy_only, "reference_floor_seed_offset": None}
    )
    record = _record(run_eval(run, progress=False), "folder2")
    assert record["metrics"]["diversity"] is None  # no Inception or CLIP features in this run
    ours, theirs = record["metrics"]["toy"]["diversity"], fast["metrics"]["toy"]["diversity"]
    assert ours["missing"] is None and ours["value"] == pytest.approx(theirs["value"], rel=1e-12)
    assert ours["layout"] == theirs["layout"]


def test_layout_diversity_on_rendered_scenes(tmp_path):
    """Layout diversity: mean pairwise distance of (cx, cy, extent) of the prompted objects, on
    renders whose placements are known; an image missing its object is left out."""
    from senseflow.eval.images import DiversityImages, ImageSet
    from senseflow.eval.panel import Panel
    from senseflow.families.toy.render import render
    from senseflow.families.toy.world import BACKGROUND, parse_prompt
    from senseflow.metrics.image_io import save_png

    rng = np.random.default_rng(4)
    prompts = ["a large red square"] * 3 + ["a small blue square"] * 3
    images, expected = [], []
    for prompt in prompts[:3]:
        image, (p,) = render(parse_prompt(prompt), rng)
        images.append(image)
        expected.append([p.cx, p.cy, 2 * p.half])
    blank = np.empty_like(images[0])
    blank[:] = BACKGROUND
    images += [render(parse_prompt(prompts[3]), rng)[0], blank, blank]  # one found: prompt left out
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / "set" / f"{i:05d}.png")
        save_png(files[-1], image)
    cfg = load_config(
        {
            "output_dir": str(tmp_path / "out"),
            "prompts": {"kind": "toy"},
            "reference": {"name": "t", "kind": "toy_teacher"},
        },
        schema=EvalConfig,
    )
    image_set = ImageSet("m", tmp_path / "set", files, prompts, list(range(6)), {}, {}, 0)
    block = Panel(cfg, tmp_path / "cache", progress=False)._diversity(
        DiversityImages(image_set, 2, 3, "rule"), "toy"
    )
    assert block["layout"]["prompts_used"] == 1
    assert block["layout"]["value"] == pytest.approx(mean_pairwise_distance(np.array(expected)), abs=0.5)
    assert block["value"] == pytest.approx(
        intra_prompt_diversity(extract_features(np.stack(images)).reshape(2, 3, -1))[0], rel=1e-12
    )


def test_clip_diversity_features(tmp_path_factory, tmp_path):
    """Without FID-T, real families' diversity uses the CLIP-score model's L2-normalised image embeddings."""
    import torch
    from PIL import Image

    from senseflow.eval.images import DiversityImages, ImageSet
    from senseflow.eval.panel import Panel, diversity_features
    from senseflow.metrics.clip_score import ClipScorer
    from senseflow.metrics.image_io import save_png
    from tests.scorer_helpers import make_clip_tokenizer, make_tiny_clip

    tok = make_clip_tokenizer(tmp_path_factory)
    scorer = ClipScorer(make_tiny_clip(seed=0, tokenizer=tok), tok)
    pixels = np.random.default_rng(5).integers(0, 256, (4, 40, 48, 3), dtype=np.uint8)
    files = []
    for i, image in enumerate(pixels):
        files.append(tmp_path / "set" / f"{i:05d}.png")
        save_png(files[-1], image)
    cfg = load_config(
        {
            "output_dir": str(tmp_path / "out"),
            "prompts": {"kind": "lines", "path": str(tmp_path / "prompts.txt")},
            "reference": {"name": "t", "kind": "folder", "path": str(tmp_path)},
            "metrics": {"clip_score": {"enabled": True}, "batch_size": 3},
        },
        schema=EvalConfig,
    )
    assert diversity_features(cfg) == ["clip"]
    panel = Panel(cfg, tmp_path / "cache", progress=False, scorers={"clip_score": scorer})
    image_set = ImageSet("m", tmp_path / "set", files, ["a"] * 2 + ["b"] * 2, [0, 1, 2, 3], {}, {}, 0)
    block = panel._diversity(DiversityImages(image_set, 2, 2, "rule"), "clip")
    with torch.no_grad():
        out = scorer.model.get_image_features(
            pixel_values=scorer.preprocess([Image.fromarray(p) for p in pixels])
        )
    emb = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4.x / 5.x
    emb = torch.nn.functional.normalize(emb, dim=-1).numpy().reshape(2, 2, -1)
    assert block["value"] == pytest.approx(intra_prompt_diversity(emb)[0], rel=1e-5)
    assert "CLIP" in block["features"] and "layout" not in block
