"""The mutation list of benchmarks/mutations.py stays in step with the code, without running a mutant.

A mutant whose original text no longer occurs (or occurs twice) would make the runner stop, and one
that no longer compiles would be killed for nothing; both are caught here, when the code changes.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("mutation_list", ROOT / "benchmarks" / "mutation_list.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


LIST = _load()
ALL = [LIST.SANITY, *LIST.MUTATIONS]
REQUIRED = {
    "dmd_sign_flipped_at_call",
    "fake_input_not_detached",
    "isg_teacher_student_swapped",
    "gan_time_weights_ignored",
    "backward_sim_prob_forced_0",
    "backward_sim_prob_forced_1",
}


def test_enough_uniquely_named_mutants_including_the_required_ones():
    names = [m.name for m in ALL]
    assert len(LIST.MUTATIONS) >= 25
    assert len(set(names)) == len(names)
    assert not REQUIRED - set(names)


@pytest.mark.parametrize("m", ALL, ids=lambda m: m.name)
def test_each_mutant_applies_once_and_still_compiles(m):
    assert re.fullmatch(r"src/senseflow/(method|train)/\w+\.py", m.file), m.file
    text = (ROOT / m.file).read_text()
    assert text.count(m.original) == 1, f"{m.name}: original text found {text.count(m.original)} times"
    assert m.replacement != m.original
    mutated = text.replace(m.original, m.replacement)
    compile(mutated, m.file, "exec")  # a syntax error would be killed without testing anything
    before, after = text.splitlines(), mutated.splitlines()
    assert len(after) == len(before)
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 1, "a one-line mutation"


@pytest.mark.parametrize("m", ALL, ids=lambda m: m.name)
def test_each_mutant_names_tests_that_exist(m):
    assert m.tests and m.caught_by
    for test in m.tests:
        path, _, name = test.partition("::")
        assert (ROOT / path).is_file(), test
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), test
