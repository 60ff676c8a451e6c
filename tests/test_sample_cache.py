"""``SampleCache``: serving hits from memory, the saved file's round trip, and the re-sampling check
that decides whether a stored file may be used (with a fake, counting generator)."""

from __future__ import annotations

import numpy as np
import pytest

from senseflow.experiments.toy.sample_cache import CHECK_MAX_DIFF, CHECK_MEAN_DIFF, SampleCache

KEY = {"teacher": "abc123", "steps": 50, "guidance": 4.0}
PROMPTS = ["a small red circle", "a large blue square", "a small green triangle above a large red circle"]


def _value(prompt: str, seed: int) -> int:
    return (len(prompt) * 7 + seed) % 256


class FakeGenerator:
    """Deterministic images of (prompt, seed); ``shift`` adds levels to pixels of every image."""

    def __init__(self, shift: np.ndarray | int = 0):
        self.shift = shift
        self.calls: list[tuple[list[str], list[int]]] = []

    @property
    def images(self) -> int:
        return sum(len(p) for p, _ in self.calls)

    def __call__(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        self.calls.append((list(prompts), list(seeds)))
        out = np.empty((len(prompts), 4, 4, 3), dtype=np.int64)
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
            out[i] = _value(p, s)
        return np.clip(out + self.shift, 0, 255).astype(np.uint8)


def _expected(prompts, seeds) -> np.ndarray:
    return np.stack(
        [np.full((4, 4, 3), _value(p, s), dtype=np.uint8) for p, s in zip(prompts, seeds, strict=True)]
    )


def _filled(tmp_path, name="cache.npz", key=KEY, n=6):
    """A saved cache of ``n`` (prompt, seed) images, written with the true generator."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    seeds = list(range(n))
    cache = SampleCache(key, {})
    cache.wrap(FakeGenerator())(prompts, seeds)
    path = tmp_path / name
    cache.save(path)
    return path, prompts, seeds


def test_wrap_samples_only_misses():
    gen = FakeGenerator()
    cache = SampleCache(KEY, {})
    cached = cache.wrap(gen)
    out = cached(PROMPTS[:2], [0, 1])
    np.testing.assert_array_equal(out, _expected(PROMPTS[:2], [0, 1]))
    assert len(gen.calls) == 1 and cache.misses == 2
    # one repeat and one new (prompt, seed): only the new one is sampled, order is kept
    out = cached([PROMPTS[2], PROMPTS[0]], [5, 0])
    np.testing.assert_array_equal(out, _expected([PROMPTS[2], PROMPTS[0]], [5, 0]))
    assert gen.calls[-1] == ([PROMPTS[2]], [5])
    assert cache.misses == 3
    # all repeats: no call at all
    out = cached([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [0, 5, 1])
    np.testing.assert_array_equal(out, _expected([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [0, 5, 1]))
    assert len(gen.calls) == 2 and gen.images == 3 and cache.misses == 3


def test_same_prompt_other_seed_is_a_miss():
    gen = FakeGenerator()
    cached = SampleCache(KEY, {}).wrap(gen)
    cached([PROMPTS[0]], [0])
    cached([PROMPTS[0]], [1])
    assert gen.images == 2


def test_save_then_open_serves_stored_images(tmp_path):
    path, prompts, seeds = _filled(tmp_path, n=6)
    gen = FakeGenerator()
    cache = SampleCache.open([path], KEY, gen, check=2)
    assert cache.source == path
    assert gen.images == 2  # only the check images are sampled again
    assert gen.calls == [(prompts[:2], seeds[:2])]
    assert len(cache.images) == 6
    out = cache.wrap(gen)(prompts[::-1], seeds[::-1])
    np.testing.assert_array_equal(out, _expected(prompts[::-1], seeds[::-1]))
    assert gen.images == 2 and cache.misses == 0
    assert isinstance(cache.check_seconds_per_image, float) and cache.check_seconds_per_image > 0


def test_open_other_key_gives_empty_cache(tmp_path, capsys):
    path, _, _ = _filled(tmp_path)
    gen = FakeGenerator()
    cache = SampleCache.open([path], {**KEY, "steps": 49}, gen)
    assert cache.source is None and cache.images == {}
    assert cache.check_seconds_per_image is None
    assert gen.images == 0
    out = capsys.readouterr().out
    assert str(path) in out and "not used" in out


def test_key_order_does_not_matter(tmp_path):
    path, _, _ = _filled(tmp_path)
    reordered = dict(reversed(list(KEY.items())))
    assert SampleCache.open([path], reordered, FakeGenerator(), check=1).source == path


def _shifted(check: int, n_pixels: int, levels: int) -> np.ndarray:
    """A per-image shift: ``levels`` on the first ``n_pixels`` values of each check image."""
    shift = np.zeros((check, 4, 4, 3), dtype=np.int64)
    shift.reshape(check, -1)[:, :n_pixels] = levels
    return shift


@pytest.mark.parametrize(
    "shift",
    [
        _shifted(3, 5, 1),  # +1 level on a few values
        _shifted(3, 48, 1),  # mean exactly CHECK_MEAN_DIFF
        _shifted(3, 1, CHECK_MAX_DIFF),  # max exactly CHECK_MAX_DIFF, mean small
        -_shifted(3, 4, 2),
    ],
    ids=["few+1", "mean-at-limit", "max-at-limit", "few-2"],
)
def test_small_differences_are_accepted(tmp_path, shift):
    path, _, _ = _filled(tmp_path)
    diff = np.abs(shift)
    assert diff.mean() <= CHECK_MEAN_DIFF and diff.max() <= CHECK_MAX_DIFF
    cache = SampleCache.open([path], KEY, FakeGenerator(shift), check=3)
    assert cache.source == path and len(cache.images) == 6


@pytest.mark.parametrize(
    "shift",
    [
        _shifted(3, 48, 2),  # every value +2: mean 2
        _shifted(3, 1, CHECK_MAX_DIFF + 1),  # one value past the max, mean tiny
    ],
    ids=["mean", "max"],
)
def test_large_differences_reject_the_file(tmp_path, capsys, shift):
    path, _, _ = _filled(tmp_path)
    diff = np.abs(shift)
    assert diff.mean() > CHECK_MEAN_DIFF or diff.max() > CHECK_MAX_DIFF
    gen = FakeGenerator(shift)
    cache = SampleCache.open([path], KEY, gen, check=3)
    assert cache.source is None and cache.images == {}
    assert gen.images == 3
    assert "differ" in capsys.readouterr().out


def test_first_matching_path_wins_and_missing_are_skipped(tmp_path):
    other_key, _, _ = _filled(tmp_path, "other.npz", key={**KEY, "guidance": 1.0})
    first, _, _ = _filled(tmp_path, "first.npz", n=3)
    second, _, _ = _filled(tmp_path, "second.npz", n=5)
    missing = tmp_path / "missing.npz"
    gen = FakeGenerator()
    cache = SampleCache.open([missing, other_key, tmp_path, first, second], KEY, gen, check=2)
    assert cache.source == first and len(cache.images) == 3
    assert gen.images == 2  # the other key's file is not checked, the second file never opened
    cache = SampleCache.open([missing, second, first], KEY, FakeGenerator(), check=2)
    assert cache.source == second and len(cache.images) == 5


def test_rejected_file_falls_through_to_the_next(tmp_path):
    bad = tmp_path / "bad.npz"
    stale = SampleCache(KEY, {(PROMPTS[0], 0): np.full((4, 4, 3), 200, dtype=np.uint8)})
    stale.save(bad)
    good, _, _ = _filled(tmp_path, "good.npz", n=4)
    cache = SampleCache.open([bad, good], KEY, FakeGenerator(), check=1)
    assert cache.source == good


def test_save_is_atomic_and_round_trips_new_samples(tmp_path):
    path, prompts, seeds = _filled(tmp_path, n=2)
    cache = SampleCache.open([path], KEY, FakeGenerator(), check=1)
    cache.wrap(FakeGenerator())([PROMPTS[2]], [9])
    out = tmp_path / "sub" / "again.npz"
    cache.save(out)
    assert out.is_file()
    assert not list(tmp_path.rglob("*.partial.npz"))
    gen = FakeGenerator()
    again = SampleCache.open([out], KEY, gen, check=1)
    assert set(again.images) == {*zip(prompts, seeds, strict=True), (PROMPTS[2], 9)}
    all_prompts, all_seeds = [*prompts, PROMPTS[2]], [*seeds, 9]
    np.testing.assert_array_equal(again.wrap(gen)(all_prompts, all_seeds), _expected(all_prompts, all_seeds))
    assert gen.images == 1
