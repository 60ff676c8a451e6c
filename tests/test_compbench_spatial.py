"""T2I-CompBench 2D spatial rules on synthetic boxes: determine_position, image score, category scoring."""

from __future__ import annotations

import pytest

from senseflow.metrics.compbench.layout import build_index
from senseflow.metrics.compbench.sidecar import Sidecar, SidecarEntry
from senseflow.metrics.compbench.spatial import (
    Detection,
    Detector,
    box_iou,
    detector_label,
    detector_label_for_record,
    determine_position,
    find_locality,
    position_details,
    read_detections_jsonl,
    run_detector,
    score_spatial,
    spatial_image_score,
    write_detections_jsonl,
)


def box(x0, y0, x1, y1, label="thing", score=1.0):
    return Detection(label, score, x0, y0, x1, y1)


# (locality, box1, box2, expected score, expected branch). Centres: dx = cx2 - cx1, dy = cy2 - cy1.
ORIGIN = box(0, 0, 10, 10)  # centre (5, 5)
CASES = [
    # near-type localities: 1 when either offset is under 150, else 150 / max(|dx|, |dy|)
    *[(loc, ORIGIN, box(100, 300, 110, 310), 1.0, "near:close") for loc in ("near", "next to", "on side of")],
    ("near", ORIGIN, box(400, 0, 410, 10), 1.0, "near:close"),  # dx 400, dy 0
    ("next to", ORIGIN, box(300, 400, 310, 410), 150 / 400, "near:far"),  # dx 300, dy 400
    ("on side of", ORIGIN, box(150, 200, 160, 210), 150 / 200, "near:far"),  # dx exactly 150 is not < 150
    ("near", ORIGIN, box(-405, -305, -395, -295), 150 / 405, "near:far"),  # dx -405, dy -305
    # on the right of: dx < 0, |dx| > |dy|, IoU < 0.1 -> 1, else 0.1 / IoU
    ("on the right of", box(200, 0, 300, 100), box(0, 0, 100, 100), 1.0, "right:clear"),
    ("on the right of", box(50, 0, 150, 100), box(0, 0, 100, 100), 0.1 / (5000 / 15000), "right:overlap"),
    ("on the right of", box(200, 0, 210, 10), box(0, 300, 10, 310), 0.0, "right:axis"),  # |dy| > |dx|
    ("on the right of", box(200, 0, 210, 10), box(0, 200, 10, 210), 0.0, "right:axis"),  # |dx| == |dy|
    ("on the right of", box(0, 0, 100, 100), box(200, 0, 300, 100), 0.0, "right:sign"),  # dx > 0
    ("on the right of", ORIGIN, box(0, 300, 10, 310), 0.0, "right:sign"),  # dx == 0
    # on the left of: dx > 0
    ("on the left of", box(0, 0, 100, 100), box(200, 0, 300, 100), 1.0, "left:clear"),
    ("on the left of", box(0, 0, 100, 100), box(50, 0, 150, 100), 0.3, "left:overlap"),
    ("on the left of", box(0, 0, 10, 10), box(9, 0, 10, 10), 1.0, "left:overlap"),  # IoU exactly 0.1
    ("on the left of", ORIGIN, box(100, 300, 110, 310), 0.0, "left:axis"),
    ("on the left of", box(200, 0, 300, 100), box(0, 0, 100, 100), 0.0, "left:sign"),
    # on the bottom of: dy < 0 (image y grows downwards, so box1 is lower)
    ("on the bottom of", box(0, 200, 100, 300), box(0, 0, 100, 100), 1.0, "bottom:clear"),
    ("on the bottom of", box(0, 50, 100, 150), box(0, 0, 100, 100), 0.3, "bottom:overlap"),
    ("on the bottom of", box(0, 200, 10, 210), box(300, 0, 310, 10), 0.0, "bottom:axis"),
    ("on the bottom of", box(0, 0, 100, 100), box(0, 200, 100, 300), 0.0, "bottom:sign"),
    # on the top of: dy > 0
    ("on the top of", box(0, 0, 100, 100), box(0, 200, 100, 300), 1.0, "top:clear"),
    ("on the top of", box(0, 0, 100, 100), box(0, 50, 100, 150), 0.3, "top:overlap"),
    ("on the top of", ORIGIN, box(300, 100, 310, 110), 0.0, "top:axis"),
    ("on the top of", box(0, 200, 100, 300), box(0, 0, 100, 100), 0.0, "top:sign"),
    # anything else scores 0, including "on top of" and no locality
    ("on top of", box(0, 0, 100, 100), box(0, 200, 100, 300), 0.0, "other"),
    (None, box(0, 0, 100, 100), box(200, 0, 300, 100), 0.0, "other"),
    ("above", box(0, 0, 100, 100), box(0, 200, 100, 300), 0.0, "other"),
]


@pytest.mark.parametrize(("locality", "box1", "box2", "expected", "branch"), CASES)
def test_determine_position_table(locality, box1, box2, expected, branch):
    pos = position_details(locality, box1, box2)
    assert pos.branch == branch
    assert pos.score == pytest.approx(expected, rel=1e-12)
    assert determine_position(locality, box1, box2) == pos.score
    assert not pos.zero_union


def test_every_locality_branch_is_covered():
    branches = {c[4] for c in CASES}
    for name in ("right", "left", "bottom", "top"):
        assert {f"{name}:{b}" for b in ("clear", "overlap", "axis", "sign")} <= branches
    assert {"near:close", "near:far", "other"} <= branches


def test_thresholds_are_parameters():
    b1, b2 = box(0, 0, 100, 100), box(50, 0, 150, 100)  # IoU 1/3
    assert determine_position("on the left of", b1, b2, iou_threshold=0.5) == 1.0
    assert determine_position("near", ORIGIN, box(300, 400, 310, 410), distance_threshold=500) == 1.0


def test_zero_area_union_is_iou_zero_and_flagged():
    point = box(5, 5, 5, 5)
    assert box_iou(point, point) == (0.0, True)
    pos = position_details("near", point, point)
    assert (pos.score, pos.zero_union, pos.iou) == (1.0, True, 0.0)
    line1, line2 = box(0, 0, 0, 10), box(100, 0, 100, 10)  # two zero-width boxes side by side
    pos = position_details("on the left of", line1, line2)
    assert (pos.score, pos.branch, pos.zero_union) == (1.0, "left:clear", True)
    # one degenerate box beside a normal one is an ordinary union
    iou, zero = box_iou(box(5, 5, 5, 5), box(0, 0, 10, 10))
    assert (iou, zero) == (0.0, False)


def test_detection_validation():
    with pytest.raises(ValueError, match="inverted"):
        box(10, 0, 0, 10)
    with pytest.raises(ValueError, match="non-finite"):
        Detection("cat", float("nan"), 0, 0, 1, 1)


def test_find_locality_first_in_vocabulary_order():
    assert find_locality("a vase on the left of a lamp") == "on the left of"
    assert find_locality("a kite on top of a roof") == "on top of"
    assert find_locality("a kite on the top of a roof") == "on the top of"
    # substring match, vocabulary order decides: "next to" comes before "on the left of"
    assert find_locality("a mug next to a pot on the left of a jar") == "next to"
    assert find_locality("a linear sculpture") == "near"  # upstream matches substrings inside words
    assert find_locality("a mug and a pot") is None


def test_person_words_map_to_person():
    assert [detector_label(w) for w in ("girl", "boy", "man", "woman", "dog", None)] == [
        "person",
        "person",
        "person",
        "person",
        "dog",
        None,
    ]


# --------------------------------------------------------------------------- image score rule


def test_image_score_both_found():
    dets = [box(0, 0, 100, 100, "owl", 0.9), box(200, 0, 300, 100, "lamp", 0.8)]
    r = spatial_image_score("owl", "lamp", "on the left of", dets)
    assert r.score == pytest.approx(0.25 * 0.9 + 0.25 * 0.8 + 0.5 * 1.0)
    assert r.found == (True, True) and r.position.branch == "left:clear"


def test_image_score_below_half_becomes_zero():
    dets = [box(0, 0, 100, 100, "owl", 0.9), box(200, 0, 300, 100, "lamp", 0.8)]
    r = spatial_image_score("owl", "lamp", "on the right of", dets)  # wrong side: position 0
    assert r.raw_score == pytest.approx(0.425) and r.score == 0.0


def test_image_score_exactly_half_is_kept():
    dets = [box(0, 0, 100, 100, "owl", 1.0), box(200, 0, 300, 100, "lamp", 1.0)]
    r = spatial_image_score("owl", "lamp", "on top of", dets)  # "on top of" always positions 0
    assert r.raw_score == 0.5 and r.score == 0.5


@pytest.mark.parametrize(
    ("obj1", "obj2", "raw"),
    [("owl", "lamp", 0.25 * 0.9), ("lamp", "owl", 0.25 * 0.9), ("bat", "lamp", 0.0), (None, None, 0.0)],
)
def test_image_score_one_or_no_object_is_zero(obj1, obj2, raw):
    r = spatial_image_score(obj1, obj2, "near", [box(0, 0, 10, 10, "owl", 0.9)])
    assert r.raw_score == pytest.approx(raw) and r.score == 0.0 and r.position is None


def test_image_score_uses_first_detection_of_a_label_and_person_mapping():
    dets = [
        box(500, 0, 600, 100, "person", 0.6),  # first person: right of the dog
        box(0, 0, 100, 100, "dog", 0.7),
        box(-500, 0, -400, 100, "person", 0.99),  # a later, better person on the left is ignored
    ]
    r = spatial_image_score("woman", "dog", "on the right of", dets)
    assert r.objects == ("person", "dog")
    assert r.position.branch == "right:clear"
    assert r.score == pytest.approx(0.25 * 0.6 + 0.25 * 0.7 + 0.5)


def test_same_label_for_both_objects_uses_one_detection():
    dets = [box(0, 0, 100, 100, "cup", 0.8), box(300, 0, 400, 100, "cup", 0.9)]
    r = spatial_image_score("cup", "cup", "next to", dets)
    assert r.position.score == 1.0 and r.position.iou == 1.0
    assert r.score == pytest.approx(0.25 * 0.8 * 2 + 0.5)


# ------------------------------------------------------------------ category scoring, files, detectors


def _spatial_setup():
    prompts = ["a heron on the left of a canoe", "a girl next to a tractor", "a pear on top of a crate"]
    index = build_index("spatial", prompts, images_per_prompt=2)
    sidecar = Sidecar(
        {
            prompts[0]: SidecarEntry(
                ("a heron", "a canoe"), ("heron", "canoe"), None, "a heron on the left of a canoe"
            ),
            prompts[1]: SidecarEntry(
                ("a girl", "a tractor"), ("girl", "tractor"), None, "a girl next to a tractor"
            ),
            prompts[2]: SidecarEntry(("a pear", "a crate"), None, None, "a pear on top of a crate"),
        },
        {"spacy": "test", "model": "hand", "model_version": "0"},
    )
    dets = {
        0: [box(0, 0, 100, 100, "heron", 0.9), box(300, 0, 400, 100, "canoe", 0.9)],  # correct: 0.95
        1: [box(300, 0, 400, 100, "heron", 0.9), box(0, 0, 100, 100, "canoe", 0.9)],  # wrong side: 0
        2: [box(0, 0, 1000, 1000, "person", 0.8), box(400, 400, 500, 500, "tractor", 0.6)],  # near: 0.85
        3: [box(5, 5, 5, 5, "person", 0.8), box(5, 5, 5, 5, "tractor", 0.6)],  # zero-area union, near: 0.85
        4: [box(0, 0, 10, 10, "pear", 0.9)],
        5: [],
    }
    return index, sidecar, dets


def test_score_spatial_category_and_counts():
    index, sidecar, dets = _spatial_setup()
    result = score_spatial(index, dets, sidecar)
    expected = [0.95, 0.0, 0.85, 0.85, 0.0, 0.0]
    assert [r.score for r in result.records] == pytest.approx(expected)
    assert result.value == pytest.approx(sum(expected) / 6)
    counts = result.info["counts"]
    assert counts == {"zero_union": 1, "no_objects": 2, "both_found": 4, "one_found": 0, "none_found": 2}
    assert result.records[3].details["zero_union"] is True
    assert result.info["detector"] == "unidet-official"


def test_score_spatial_needs_every_image():
    index, sidecar, dets = _spatial_setup()
    del dets[5]
    with pytest.raises(KeyError, match="idx 5"):
        score_spatial(index, dets, sidecar)


def test_complex_mode_uses_complex_objects():
    prompt = "a sleepy heron waits near a red canoe"
    index = build_index("complex", [prompt], images_per_prompt=1)
    sidecar = Sidecar(
        {prompt: SidecarEntry((), ("waits", "canoe"), ("heron", "canoe"), "a heron waits near a canoe")}
    )
    dets = {0: [box(0, 0, 10, 10, "heron", 1.0), box(20, 0, 30, 10, "canoe", 1.0)]}
    assert score_spatial(index, dets, sidecar, complex_mode=True).records[0].score == 1.0
    assert score_spatial(index, dets, sidecar, complex_mode=False).records[0].score == 0.0


def test_detections_jsonl_round_trip(tmp_path):
    dets = {1: [box(0, 0, 1.5, 2.5, "owl", 0.75)], 0: []}
    path = write_detections_jsonl(dets, tmp_path / "d.jsonl")
    assert read_detections_jsonl(path) == dets
    path.write_text(
        '{"question_id": 3, "detections": [{"label": "owl", "score": 0.5, "box": [0, 0, 1, 1]}]}\n'
    )
    assert read_detections_jsonl(path) == {3: [box(0, 0, 1, 1, "owl", 0.5)]}


def test_pluggable_detector(tmp_path):
    from PIL import Image

    class Fixed:
        name = "fixed-boxes"
        mode = "approx"

        def detect(self, image):
            assert image.mode == "RGB"
            return [box(0, 0, 10, 10, "owl", 0.4), box(20, 0, 30, 10, "lamp", 0.9)]

    det = Fixed()
    assert isinstance(det, Detector)
    assert detector_label_for_record(det) == "approx:fixed-boxes"
    index = build_index("spatial", ["an owl near a lamp"], images_per_prompt=2)
    for e in index.entries:
        Image.new("RGB", (8, 8)).save(tmp_path / e.image)
    out = run_detector(det, index, tmp_path)
    assert out == {0: [box(20, 0, 30, 10, "lamp", 0.9)], 1: [box(20, 0, 30, 10, "lamp", 0.9)]}
