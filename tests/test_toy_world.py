import numpy as np
import pytest

from senseflow.families.toy.render import IMAGE_SIZE, MIN_GAP, place, render
from senseflow.families.toy.world import (
    COLOURS,
    HELD_OUT_PAIRS,
    SPLITS,
    ObjectSpec,
    SceneSpec,
    all_scenes,
    parse_prompt,
    scenes_in_split,
    split_of,
)


def test_grammar_size_and_round_trip():
    scenes = all_scenes()
    assert len(scenes) == 36 + 36 * 30 * 4  # singles + ordered pairs of different colours x relations
    assert len({s.prompt for s in scenes}) == len(scenes)
    for s in scenes[::37]:
        assert parse_prompt(s.prompt) == s


def test_prompt_text():
    scene = SceneSpec(
        objects=(ObjectSpec("red", "circle", "small"), ObjectSpec("blue", "square", "large")), relation="left"
    )
    assert scene.prompt == "a small red circle to the left of a large blue square"
    assert parse_prompt("a large green triangle below a small cyan circle").relation == "below"


@pytest.mark.parametrize(
    "bad", ["a red circle", "a small pink circle", "a small red circle near a large blue square", ""]
)
def test_parse_rejects_prompts_outside_grammar(bad):
    with pytest.raises(ValueError, match=r"grammar|cannot parse|unknown"):
        parse_prompt(bad)


def test_scene_validation():
    red = ObjectSpec("red", "circle", "small")
    with pytest.raises(ValueError, match="different colours"):
        SceneSpec(objects=(red, ObjectSpec("red", "square", "large")), relation="left")
    with pytest.raises(ValueError, match="relation is required"):
        SceneSpec(objects=(red, ObjectSpec("blue", "square", "large")))
    with pytest.raises(ValueError, match="unknown relation"):
        SceneSpec(objects=(red, ObjectSpec("blue", "square", "large")), relation="near")


def test_splits_partition_and_hold_out_pairs():
    parts = {s: {x.prompt for x in scenes_in_split(s)} for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == len(all_scenes())
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not parts[a] & parts[b]
    seen_pairs = {(o.colour, o.shape) for s in scenes_in_split("train") for o in s.objects}
    assert not seen_pairs & HELD_OUT_PAIRS
    assert all(
        any((o.colour, o.shape) in HELD_OUT_PAIRS for o in s.objects) for s in scenes_in_split("heldout")
    )
    assert len(parts["val"]) > 100 and len(parts["test"]) > 100
    assert split_of(all_scenes()[0]) == split_of(all_scenes()[0])  # deterministic


def test_render_respects_relation_and_gap():
    rng = np.random.default_rng(0)
    for scene in [s for s in all_scenes() if s.relation][::97]:
        a, b = place(scene, rng)
        dx, dy = b.cx - a.cx, b.cy - a.cy
        axis = {"left": dx, "right": -dx, "above": dy, "below": -dy}[scene.relation]
        assert axis >= a.half + b.half + MIN_GAP
        for p in (a, b):
            assert p.half <= p.cx <= IMAGE_SIZE - p.half and p.half <= p.cy <= IMAGE_SIZE - p.half


def test_render_colours_and_determinism():
    scene = parse_prompt("a large yellow square")
    img1, (p,) = render(scene, np.random.default_rng(5))
    img2, _ = render(scene, np.random.default_rng(5))
    assert img1.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img1.dtype == np.uint8
    np.testing.assert_array_equal(img1, img2)
    centre = img1[int(p.cy), int(p.cx)]
    np.testing.assert_array_equal(centre, COLOURS["yellow"])
    # A square of half-extent h covers about (2h)^2 pixels.
    covered = np.all(img1 == COLOURS["yellow"], axis=-1).sum()
    assert abs(covered - (2 * p.half) ** 2) < 4 * 2 * p.half
