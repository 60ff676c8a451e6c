"""T2I-CompBench index, official layout and question ids, official results, 3-in-1 merge and the report."""

from __future__ import annotations

import json

import pytest

from senseflow.metrics.compbench.layout import (
    build_index,
    check_official_names,
    index_from_json,
    index_to_json,
    official_filename,
    parse_official_filename,
    prompts_digest,
    read_index,
    sort_official_names,
    write_index,
)
from senseflow.metrics.compbench.official import (
    EXPORT_MANIFEST,
    export_official_layout,
    find_official_result,
    official_category_scores,
    read_official_scores,
)
from senseflow.metrics.compbench.report import compbench_block, markdown_table, table_row
from senseflow.metrics.compbench.results import (
    CategoryScores,
    mean_score,
    read_image_scores,
    records_from_scores,
    write_image_scores,
)
from senseflow.metrics.compbench.three_in_one import (
    SubsetLines,
    merge_score,
    merge_three_in_one,
    normalise_line,
    three_in_one_rule,
)

PROMPTS = ["a teal teapot and an amber lantern", "a striped umbrella", "a glass owl beside a tin drum"]


# --------------------------------------------------------------------------- index and file names


def test_index_layout_idx_is_line_times_n_plus_k():
    index = build_index("color", PROMPTS, images_per_prompt=10, seed_base=1000)
    assert len(index) == 30
    for e in index.entries:
        assert e.idx == e.prompt_line * 10 + e.k
        assert e.prompt == PROMPTS[e.prompt_line]
        assert e.seed == 1000 + e.idx
        assert e.image == f"{e.idx:06d}.png"
    assert index.entries[13].prompt_line == 1 and index.entries[13].k == 3
    assert index.prompts == PROMPTS
    assert index.prompts_sha256 == prompts_digest(PROMPTS)


def test_index_round_trip_and_validation(tmp_path):
    index = build_index("shape", PROMPTS, images_per_prompt=2)
    assert read_index(write_index(index, tmp_path / "i.json")) == index
    data = index_to_json(index)
    data["entries"][3]["k"] = 0  # idx 3 is line 1, k 1
    with pytest.raises(ValueError, match="idx = prompt_line"):
        index_from_json(data)
    data = index_to_json(index)
    del data["entries"][2]
    with pytest.raises(ValueError, match="exactly once"):
        index_from_json(data)
    with pytest.raises(ValueError, match="surrounding whitespace"):
        build_index("shape", [" a cup"])


def test_official_filename_and_question_id():
    assert official_filename("a teal teapot", 7) == "a teal teapot_000007.png"
    assert official_filename("a cat. A dog.", 123456) == "a cat. A dog._123456.png"
    parsed = parse_official_filename("samples/a cat. A dog._123456.png")
    assert (parsed.prompt, parsed.question_id) == ("a cat. A dog.", 123456)
    for bad in ("snake_case prompt", "a/b"):
        with pytest.raises(ValueError, match="contains"):
            official_filename(bad, 0)
    with pytest.raises(ValueError, match="bytes"):
        official_filename("x" * 250, 0)
    with pytest.raises(ValueError, match="6 digits"):
        official_filename("a cup", 1_000_000)
    with pytest.raises(ValueError, match="question_id"):
        parse_official_filename("a cup_abc.png")


def test_official_sorting_is_numeric():
    names = ["b_000010.png", "a_000002.png", "c_000001.png"]
    assert sort_official_names(names) == ["c_000001.png", "a_000002.png", "b_000010.png"]


def test_check_official_names_against_index():
    index = build_index("color", PROMPTS[:2], images_per_prompt=2)
    names = [official_filename(e.prompt, e.idx) for e in index.entries]
    pairs = check_official_names(reversed(names), index)
    assert [e.idx for _, e in pairs] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="differs"):
        check_official_names([*names[:3], official_filename("a striped parasol", 3)], index)
    with pytest.raises(ValueError, match="no official file"):
        check_official_names(names[:3], index)
    with pytest.raises(ValueError, match="not in the"):
        check_official_names([*names, official_filename(PROMPTS[0], 9)], index)


# --------------------------------------------------------------------------- export and official results


def _images(tmp_path, index):
    from PIL import Image

    src = tmp_path / "gen"
    src.mkdir()
    for e in index.entries:
        Image.new("RGB", (4, 4), (e.idx, 0, 0)).save(src / e.image)
    return src


@pytest.mark.parametrize("mode", ["copy", "symlink", "hardlink"])
def test_export_official_layout(tmp_path, mode):
    index = build_index("texture", PROMPTS[:2], images_per_prompt=3)
    src = _images(tmp_path, index)
    samples = export_official_layout(index, src, tmp_path / "out", mode=mode)
    names = sorted(p.name for p in samples.iterdir())
    assert len(names) == 6
    assert [e.idx for _, e in check_official_names(names, index)] == list(range(6))
    assert (samples / "a striped umbrella_000004.png").read_bytes() == (src / "000004.png").read_bytes()
    manifest = json.loads((tmp_path / "out" / EXPORT_MANIFEST).read_text())
    assert manifest["count"] == 6 and manifest["prompts_sha256"] == index.prompts_sha256
    with pytest.raises(FileExistsError):
        export_official_layout(index, src, tmp_path / "out", mode=mode)
    export_official_layout(index, src, tmp_path / "out", mode=mode, overwrite=True)


def test_export_refuses_bad_prompts_before_writing(tmp_path):
    index = build_index("color", ["a red_blue kite"], images_per_prompt=1)
    src = _images(tmp_path, index)
    with pytest.raises(ValueError, match="split"):
        export_official_layout(index, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_official_results(tmp_path):
    index = build_index("color", PROMPTS[:2], images_per_prompt=2)
    result = tmp_path / "run" / "annotation_blip" / "vqa_result.json"
    result.parent.mkdir(parents=True)
    answers = ["0.5000", "0.2500", "1.0000", "0.0000"]
    result.write_text(json.dumps([{"question_id": i, "answer": a} for i, a in enumerate(answers)]))
    path = find_official_result(tmp_path / "run", "blip_vqa")
    scores = read_official_scores(path)
    assert scores == {0: 0.5, 1: 0.25, 2: 1.0, 3: 0.0}
    cat = official_category_scores(index, scores, "blip_vqa", path)
    assert cat.value == pytest.approx(0.4375) and cat.info["source"] == "official"
    with pytest.raises(FileNotFoundError, match="annotation_obj_detection"):
        find_official_result(tmp_path / "run", "spatial")
    with pytest.raises(KeyError, match="no blip_vqa score"):
        official_category_scores(index, {0: 1.0}, "blip_vqa")
    result.write_text(json.dumps([{"question_id": 0, "answer": 1}, {"question_id": 0, "answer": 1}]))
    with pytest.raises(ValueError, match="twice"):
        read_official_scores(result)


def test_image_scores_jsonl_round_trip(tmp_path):
    index = build_index("color", PROMPTS[:1], images_per_prompt=2)
    records = records_from_scores(index, "blip_vqa", {0: 0.25, 1: 0.75}, {1: {"questions": ["a cup?"]}})
    back = read_image_scores(write_image_scores(records, tmp_path / "s.jsonl"))
    assert [r.to_json() for r in back] == [r.to_json() for r in records]
    with pytest.raises(KeyError, match="no color index entry"):
        records_from_scores(index, "blip_vqa", {0: 0.0, 1: 0.0, 5: 0.0})
    with pytest.raises(ValueError):
        mean_score([])


# --------------------------------------------------------------------------- 3-in-1


def test_normalise_line():
    assert normalise_line("A Red Kite. With a tail\n") == "a red kite"
    assert normalise_line("no period at all\n") == "no period at all"


def test_merge_score_rules():
    assert merge_score("spatial", 0.4, 0.8, None) == pytest.approx(0.6)
    assert merge_score("action", 0.4, None, 0.2) == pytest.approx(0.3)
    assert merge_score("all", 0.3, 0.6, 0.9) == pytest.approx(0.6)
    with pytest.raises(KeyError, match="spatial"):
        merge_score("all", 0.3, None, 0.9)


def test_three_in_one_on_synthetic_records():
    prompts = [
        "The crimson kite drifts near a lighthouse.",  # spatial subset (matched after normalisation)
        "A bronze robot waters a fern",  # action subset
        "a violet frog sits on a log and sings",  # both: the mean of three
    ]
    subsets = SubsetLines(
        spatial=("the crimson kite drifts near a lighthouse\n",),
        action=("a bronze robot waters a fern.", "the crimson kite drifts near a lighthouse"),
    )
    assert three_in_one_rule(prompts[0], subsets.spatial, subsets.action) == "spatial"  # spatial wins
    index = build_index("complex", prompts, images_per_prompt=2)
    attribute = {0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8, 4: 0.3, 5: 0.9}
    spatial = {0: 1.0, 1: 0.0, 4: 0.6, 5: 0.0}  # action-only images need no spatial score
    action = {2: 0.2, 3: 0.4, 4: 0.3, 5: 0.3}
    result = merge_three_in_one(index, subsets, attribute, spatial, action)
    expected = [0.6, 0.2, 0.4, 0.6, 0.4, 0.4]
    assert [r.score for r in result.records] == pytest.approx(expected)
    assert result.value == pytest.approx(sum(expected) / 6)
    assert result.info["images_per_rule"] == {"spatial": 2, "action": 2, "all": 2}
    assert [r.details["rule"] for r in result.records] == ["spatial"] * 2 + ["action"] * 2 + ["all"] * 2
    del action[4]
    with pytest.raises(KeyError, match="idx 4"):
        merge_three_in_one(index, subsets, attribute, spatial, action)


# --------------------------------------------------------------------------- report


def _cat(category, scores):
    index = build_index(category, ["a tin drum"], images_per_prompt=len(scores))
    return CategoryScores(category, "m", records_from_scores(index, "m", dict(enumerate(scores))), {"k": 1})


def test_markdown_table_like_table_2():
    rows = {
        "Teacher": table_row([_cat("color", [0.5, 0.25]), _cat("complex", [0.3])]),
        "Student": {"color": 0.123456, "shape": 0.5, "texture": 0.25, "spatial": 0.2, "non_spatial": 0.31},
    }
    assert markdown_table(rows) == (
        "| Model | Color | Shape | Texture | Spatial | Non-Spatial | Complex |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        "| Teacher | 0.3750 | -- | -- | -- | -- | 0.3000 |\n"
        "| Student | 0.1235 | 0.5000 | 0.2500 | 0.2000 | 0.3100 | -- |\n"
    )
    with pytest.raises(ValueError, match="unknown categories"):
        markdown_table({"x": {"colour": 1.0}})


def test_compbench_block_has_every_record_field():
    block = compbench_block(
        [_cat("color", [1.0, 0.0]), _cat("spatial", [0.5])],
        evaluator_version="neurips23",
        sidecar_spacy="3.5.3/en_core_web_sm-3.5.0",
        spatial_detector="unidet-official",
    )
    assert set(block) == {
        "evaluator_version",
        "images_per_prompt",
        "np_num",
        "exclude_chunks",
        "round4",
        "vqa_image_size",
        "sidecar_spacy",
        "spatial_detector",
        "per_category",
    }
    assert block["exclude_chunks"] == ["top", "the side", "the left", "the right"]
    assert block["per_category"]["color"] == {"value": 0.5, "n": 2, "metric": "m", "info": {"k": 1}}
    with pytest.raises(ValueError, match="twice"):
        compbench_block([_cat("color", [1.0]), _cat("color", [1.0])], evaluator_version="x")
