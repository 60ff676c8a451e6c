"""Reliability of recipe input: every bad recipe is refused with one line naming the field and the file.

Table-driven over bad training and evaluation recipes (non-finite and out-of-range numbers, booleans
for numbers, duplicate and unknown keys, bad devices, unreadable files), plus the rules that hold by
class: every number of every recipe model has a bound, reading a recipe imports no torch.
"""

from __future__ import annotations

import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from senseflow.config import ConfigError, DistillConfig, load_config
from senseflow.config import common as common_module
from senseflow.config.errors import _constraints, number_expectation
from senseflow.eval.config import EvalConfig

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

TRAIN = "base: toy/distill\n"
EVAL = "base: eval/toy\n"


def _error(path: Path | str, overrides: list[str] | None = None, schema: type | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [], schema=schema)
    return info.value


def _write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Bad recipes: (id, recipe text, field the message must name, fragment it must contain)
# ------------------------------------------------------------------------------------------------

BAD_TRAIN = [
    (
        "lr_inf",
        "optim:\n  generator:\n    lr: .inf\n",
        "optim.generator.lr",
        "must be a finite number > 0, got inf",
    ),
    ("lr_minus_inf", "optim:\n  fake:\n    lr: -.inf\n", "optim.fake.lr", "got -inf"),
    ("lr_nan", "optim:\n  generator:\n    lr: .nan\n", "optim.generator.lr", "got nan"),
    ("lr_negative", "optim:\n  generator:\n    lr: -1e-5\n", "optim.generator.lr", "> 0, got -1e-05"),
    ("lr_zero", "optim:\n  discriminator:\n    lr: 0\n", "optim.discriminator.lr", "> 0, got 0"),
    ("lr_bool", "optim:\n  generator:\n    lr: true\n", "optim.generator.lr", "got True"),
    ("lr_word", "optim:\n  generator:\n    lr: fast\n", "optim.generator.lr", "got 'fast'"),
    ("lr_inf_string", "optim:\n  generator:\n    lr: 'inf'\n", "optim.generator.lr", "finite"),
    ("eps_zero", "optim:\n  generator:\n    eps: 0.0\n", "optim.generator.eps", "> 0"),
    ("beta_one", "optim:\n  generator:\n    betas: [0.9, 1.0]\n", "optim.generator.betas.1", ">= 0 and < 1"),
    ("weight_decay_neg", "optim:\n  fake:\n    weight_decay: -0.1\n", "optim.fake.weight_decay", ">= 0"),
    ("clip_grad_nan", "optim:\n  fake:\n    clip_grad: .nan\n", "optim.fake.clip_grad", "got nan"),
    ("warmup_factor", "optim:\n  warmup_start_factor: 1.5\n", "optim.warmup_start_factor", "<= 1, got 1.5"),
    ("lam_probability", "method:\n  ida:\n    lam: 1.5\n", "method.ida.lam", ">= 0 and <= 1, got 1.5"),
    ("backward_sim_prob", "method:\n  backward_sim_prob: 1.5\n", "method.backward_sim_prob", "<= 1"),
    ("isg_weight_inf", "method:\n  isg:\n    weight: .inf\n", "method.isg.weight", ">= 0, got inf"),
    ("gan_weight_neg", "method:\n  gan:\n    weight: -2\n", "method.gan.weight", ">= 0, got -2"),
    ("cutout_fraction", "method:\n  gan:\n    diffaug_cutout: 2\n", "method.gan.diffaug_cutout", "<= 1"),
    ("ttur_zero", "method:\n  ttur_ratio: 0\n", "method.ttur_ratio", "an integer >= 1, got 0"),
    ("ttur_bool", "method:\n  ttur_ratio: true\n", "method.ttur_ratio", "got True"),
    (
        "iterations_fraction",
        "schedule:\n  iterations: 2.5\n",
        "schedule.iterations",
        "an integer >= 1, got 2.5",
    ),
    ("batch_size_zero", "data:\n  batch_size: 0\n", "data.batch_size", ">= 1"),
    ("workers_negative", "data:\n  num_workers: -1\n", "data.num_workers", "an integer >= 0"),
    ("seed_negative", "seed: -1\n", "seed", "an integer >= 0 and <= 2**63 - 1, got -1"),
    ("sample_seed_bool", "logging:\n  sample_seeds: [true]\n", "logging.sample_seeds.0", "got True"),
    ("anchor_nan", "model:\n  anchors:\n    values: [999, .nan, 499]\n", "model.anchors.values.1", "got nan"),
    (
        "logit_std_zero",
        "method:\n  fake:\n    timestep_dist: {kind: logit_normal, std: 0}\n",
        "method.fake.timestep_dist.std",
        "> 0",
    ),
    (
        "uniform_index_high",
        "method:\n  dmd:\n    timestep_dist: {kind: uniform_index, low: 20, high: 1200}\n",
        "method.dmd.timestep_dist.high",
        "an integer >= 0 and <= 999, got 1200",
    ),
    (
        "guidance_inf",
        "method:\n  dmd:\n    teacher_guidance: .inf\n",
        "method.dmd.teacher_guidance",
        "got inf",
    ),
    ("guidance_bool", "method:\n  dmd:\n    teacher_guidance: yes\n", "method.dmd.teacher_guidance", "True"),
    ("guidance_max_nan", "method:\n  dmd:\n    teacher_guidance: {min: 1, max: .nan}\n", ".max", "nan"),
    ("saturation_zero", "health:\n  saturation_level: 0\n", "health.saturation_level", "> 0"),
    ("timeout_inf", "parallel:\n  timeout_minutes: .inf\n", "parallel.timeout_minutes", "got inf"),
    ("lora_dropout_one", "model:\n  lora: {dropout: 1.0}\n", "model.lora.dropout", "< 1"),
    (
        "device_tpu",
        "parallel:\n  device: tpu\n",
        "parallel.device",
        "expected auto, cpu, cuda or cuda:N, got 'tpu'",
    ),
    ("device_cuda_word", "parallel:\n  device: 'cuda:one'\n", "parallel.device", "cuda:N"),
    (
        "duplicate_top_level",
        "name: a\nseed: 1\nname: b\n",
        "name",
        "duplicate key 'name' in '{path}', line 4 (first at line 2)",
    ),
    (
        "duplicate_nested",
        "optim:\n  generator:\n    lr: 1e-5\n    eps: 1e-8\n    lr: 2e-5\n",
        "optim.generator.lr",
        "duplicate key 'lr' in '{path}', line 6 (first at line 4)",
    ),
    (
        "duplicate_flow_mapping",
        "method:\n  fake:\n    timestep_dist: {kind: uniform, kind: logit_normal}\n",
        "method.fake.timestep_dist.kind",
        "duplicate key 'kind' in '{path}', line 4, column 36 (first at column 21)",
    ),
    (
        "unknown_top_level",
        "optimm:\n  warmup_steps: 3\n",
        "optimm",
        "unknown key 'optimm'; did you mean 'optim'?",
    ),
    ("unknown_nested", "optim:\n  generator:\n    lrr: 1e-5\n", "optim.generator.lrr", "did you mean 'lr'?"),
    (
        "unknown_in_union",
        "method:\n  dmd:\n    timestep_dist: {kind: uniform_index, low: 20, hgh: 980}\n",
        "method.dmd.timestep_dist.hgh",
        "did you mean 'high'?",
    ),
    ("unknown_in_list_section", "model:\n  anchorz: {}\n", "model.anchorz", "did you mean 'anchors'?"),
]

BAD_EVAL = [
    ("eval_device_tpu", "device: tpu\n", "device", "expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("eval_device_gpu0", "device: gpu0\n", "device", "got 'gpu0'"),
    ("eval_batch_zero", "metrics:\n  batch_size: 0\n", "metrics.batch_size", "an integer >= 1, got 0"),
    ("eval_seed_negative", "seeds: {base: -3}\n", "seeds.base", "an integer >= 0"),
    ("eval_offset_zero", "reference_floor_seed_offset: 0\n", "reference_floor_seed_offset", ">= 1"),
    ("eval_per_split_bool", "prompts:\n  toy_per_split: true\n", "prompts.toy_per_split", "got True"),
    (
        "eval_guidance_inf",
        "students:\n  - {name: s, kind: toy_teacher, guidance: .inf}\n",
        "students.0.guidance",
        ">= 0, got inf",
    ),
    (
        "eval_duplicate_in_list",
        "students:\n  - name: s\n    kind: toy_teacher\n    name: t\n",
        "students.0.name",
        "duplicate key 'name'",
    ),
    (
        "eval_unknown_key",
        "metrics:\n  fid: {enabeld: true}\n",
        "metrics.fid.enabeld",
        "did you mean 'enabled'?",
    ),
    (
        "eval_vqa_size",
        "metrics:\n  compbench: {vqa_image_size: 8}\n",
        "metrics.compbench.vqa_image_size",
        ">= 16",
    ),
]


def _check_one_line(err: ConfigError, field: str, fragment: str, path: Path) -> None:
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    assert field in message, message
    assert fragment.format(path=path) in message, message
    assert str(path) in message, message  # the file is named
    assert all("\n" not in p for p in err.problems)


@pytest.mark.parametrize(
    ("text", "field", "fragment"), [c[1:] for c in BAD_TRAIN], ids=[c[0] for c in BAD_TRAIN]
)
def test_bad_training_recipe_is_refused_in_one_line(
    tmp_path: Path, text: str, field: str, fragment: str
) -> None:
    path = _write(tmp_path, TRAIN + text)
    _check_one_line(_error(path), field, fragment, path)


@pytest.mark.parametrize(
    ("text", "field", "fragment"), [c[1:] for c in BAD_EVAL], ids=[c[0] for c in BAD_EVAL]
)
def test_bad_eval_recipe_is_refused_in_one_line(tmp_path: Path, text: str, field: str, fragment: str) -> None:
    path = _write(tmp_path, EVAL + text)
    _check_one_line(_error(path, schema=EvalConfig), field, fragment, path)


def test_the_table_is_large_enough() -> None:
    assert len(BAD_TRAIN) + len(BAD_EVAL) >= 25


# ------------------------------------------------------------------------------------------------
# Files that are not recipes
# ------------------------------------------------------------------------------------------------


def test_empty_file_names_the_missing_sections(tmp_path: Path) -> None:
    path = _write(tmp_path, "# only a comment\n")
    err = _error(path)
    assert "\n" not in str(err) and str(path) in str(err)
    assert {p.split(":")[0] for p in err.problems} >= {"model", "data", "method", "schedule"}
    assert all("required field is missing" in p for p in err.problems)


def test_non_mapping_top_level(tmp_path: Path) -> None:
    path = _write(tmp_path, "- model\n- data\n")
    message = str(_error(path))
    assert (
        "\n" not in message
        and "must contain a mapping at top level, got list" in message
        and str(path) in message
    )


def test_directory_as_recipe(tmp_path: Path) -> None:
    folder = tmp_path / "recipe.yaml"
    folder.mkdir()
    message = str(_error(folder))
    assert "\n" not in message and "is a directory" in message and str(folder) in message


def test_binary_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    message = str(_error(path))
    assert "\n" not in message and str(path) in message and "not UTF-8" in message


def test_nul_bytes_and_broken_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: a\x00b\n")
    message = str(_error(path))
    assert "\n" not in message and "invalid YAML" in message and str(path) in message
    path = _write(tmp_path, "name: [unclosed\nseed: 1\n", "broken.yaml")
    message = str(_error(path))
    assert "\n" not in message and "invalid YAML" in message and "line" in message


def test_duplicate_key_in_a_base_file_names_that_file(tmp_path: Path) -> None:
    parent = _write(tmp_path, TRAIN + "seed: 1\nseed: 2\n", "parent.yaml")
    child = _write(tmp_path, "base: parent.yaml\nname: child\n", "child.yaml")
    message = str(_error(child))
    assert f"seed: duplicate key 'seed' in '{parent}', line 3 (first at line 2)" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------------------
# Overrides
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.generator.lr=.inf", "optim.generator.lr: must be a finite number > 0, got inf"),
        ("optim.generator.lr=true", "optim.generator.lr: must be a finite number > 0, got True"),
        ("method.ida.lam=nan", "method.ida.lam: must be a finite number >= 0 and <= 1, got 'nan'"),
        ("parallel.device=tpu", "parallel.device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
        ("optim.generatr.lr=1e-5", "optim.generatr: unknown key 'generatr'; did you mean 'generator'?"),
        ("method.isg.wieght=1", "method.isg.wieght: unknown key 'wieght'; did you mean 'weight'?"),
        ("method.fake.timestep_dist={kind: uniform, kind: logit_normal}", "duplicate key 'kind' in override"),
    ],
)
def test_bad_override_is_refused_in_one_line(override: str, fragment: str) -> None:
    message = str(_error("toy/distill", [override]))
    assert "\n" not in message and fragment in message, message
    assert "toy/distill.yaml" in message


# ------------------------------------------------------------------------------------------------
# What still loads
# ------------------------------------------------------------------------------------------------


def test_valid_recipes_still_load(tmp_path: Path) -> None:
    assert isinstance(load_config("toy/distill"), DistillConfig)
    assert isinstance(load_config("eval/toy", schema=EvalConfig), EvalConfig)


@pytest.mark.parametrize("spelling", ["1e-5", "1E-5", "1.0e-5", "0.00001", "'1e-5'", "+1e-5", "10e-6"])
def test_exponent_numbers_are_read_as_numbers(tmp_path: Path, spelling: str) -> None:
    path = _write(tmp_path, TRAIN + f"optim:\n  generator:\n    lr: {spelling}\n")
    assert load_config(path).optim.generator.lr == pytest.approx(1e-5)
    assert load_config("toy/distill", [f"optim.generator.lr={spelling}"]).optim.generator.lr == pytest.approx(
        1e-5
    )


def test_exponent_floats_are_floats_in_the_yaml_reader() -> None:
    from senseflow.config.loader import load_yaml

    assert load_yaml("a: 1e-5\nb: -2E+3\nc: 3\nd: 1.5\ne: 1e5x\nf: e5\n") == {
        "a": 1e-5,
        "b": -2000.0,
        "c": 3,
        "d": 1.5,
        "e": "1e5x",
        "f": "e5",
    }


def test_merge_keys_are_not_duplicates() -> None:
    from senseflow.config.loader import load_yaml

    data = load_yaml("defaults: &opt {lr: 2e-5, eps: 1e-7}\ngenerator:\n  <<: *opt\n  lr: 3e-5\n")
    assert data["generator"] == {"lr": 3e-5, "eps": 1e-7}


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_devices_the_project_supports(device: str) -> None:
    assert load_config("toy/distill", [f"parallel.device={device}"]).parallel.device == device
    assert load_config("eval/toy", [f"device={device}"], schema=EvalConfig).device == device


@pytest.mark.parametrize("device", ["tpu", "mps", "CUDA", "cuda:", "cuda:-1", "cpu:0", " cpu", ""])
def test_devices_resolve_device_refuses(device: str) -> None:
    # senseflow.devices.resolve_device takes auto, cpu, cuda and cuda:N only (mps included: refused)
    assert "parallel.device" in str(_error("toy/distill", [f"parallel.device='{device}'"]))
    assert "device" in str(_error("eval/toy", [f"device='{device}'"], schema=EvalConfig))


def test_config_error_is_one_line_whatever_it_is_given() -> None:
    err = ConfigError(["a: first\nsecond", "b: third"], source="/tmp/x.yaml")
    assert str(err) == "2 problems in /tmp/x.yaml: a: first; second; b: third"
    assert err.problems == ["a: first; second", "b: third"]
    assert str(ConfigError("a: bad", source="/tmp/x.yaml")) == "a: bad (in /tmp/x.yaml)"
    assert str(ConfigError("a: bad")) == "a: bad"


# ------------------------------------------------------------------------------------------------
# Rules that hold by class
# ------------------------------------------------------------------------------------------------

# Numbers whose sign is meaningful or whose range another check owns (with the reason).
UNBOUNDED = {
    "LogitNormalDist.mean": "mean of a normal before the sigmoid: any sign",
    "AnchorsConfig.values": "range depends on units; checked by AnchorsConfig's validator",
}


def _numeric_leaves(model: type[BaseModel], seen: set[type]) -> list[tuple[str, type, list]]:
    """(Model.field, int|float, constraints) for every number of ``model`` and the models below it."""
    if model in seen:
        return []
    seen.add(model)
    out: list[tuple[str, type, list]] = []

    def visit(name: str, tp: typing.Any, metadata: list) -> None:
        tp, metadata = _constraints(tp, metadata)
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            visit(name, tp, metadata)
        elif origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(tp):
                if arg is not type(None):
                    visit(name, arg, list(metadata))
        elif origin in (list, tuple, dict, set):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            for arg in args[-1:] if origin is dict else args:
                visit(name, arg, [])
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            out.extend(_numeric_leaves(tp, seen))
        elif tp in (int, float):
            out.append((name, tp, metadata))

    for field_name, info in model.model_fields.items():
        visit(f"{model.__name__}.{field_name}", info.annotation, list(info.metadata))
    return out


@pytest.mark.parametrize("root", [DistillConfig, EvalConfig], ids=lambda m: m.__name__)
def test_every_number_has_a_bound_refuses_booleans_and_non_finite_values(root: type[BaseModel]) -> None:
    leaves = _numeric_leaves(root, set())
    assert len(leaves) > 15
    for name, tp, metadata in leaves:
        validators = [getattr(m, "func", None) for m in metadata]
        assert common_module._refuse_bool in validators, f"{name} accepts a boolean"
        if tp is float:
            assert any(getattr(m, "allow_inf_nan", None) is False for m in metadata), f"{name} accepts inf"
        bounded = number_expectation(tp, metadata) not in ("an integer", "a finite number")
        assert bounded or name in UNBOUNDED, f"{name} has no range"


@pytest.mark.parametrize("root", [DistillConfig, EvalConfig], ids=lambda m: m.__name__)
def test_every_model_refuses_unknown_keys_and_non_finite_floats(root: type[BaseModel]) -> None:
    models: set[type] = set()
    _numeric_leaves(root, models)
    for model in models:
        assert model.model_config.get("extra") == "forbid", model
        assert model.model_config.get("allow_inf_nan") is False, model


def test_eval_quantisation_rules_match_the_image_writer() -> None:
    from senseflow.eval.config import QUANTISATION
    from senseflow.metrics.image_io import QUANTISATION_RULES

    assert tuple(QUANTISATION) == tuple(QUANTISATION_RULES)
    assert typing.get_args(EvalConfig.model_fields["quantisation"].annotation) == tuple(QUANTISATION_RULES)


def test_only_safe_yaml_loading_in_src() -> None:
    unsafe = ("yaml.load(", "yaml.unsafe_load", "yaml.full_load", "yaml.Loader", "FullLoader", "UnsafeLoader")
    offenders = [
        f"{path.relative_to(REPO)}: {word}"
        for path in SRC.rglob("*.py")
        for word in unsafe
        if word in path.read_text(encoding="utf-8")
    ]
    assert not offenders


_IMPORT_PROBE = """
import sys
from senseflow.config import ConfigError, load_config
from senseflow.eval.config import EvalConfig
for source, schema in ((sys.argv[1], None), (sys.argv[2], EvalConfig)):
    try:
        load_config(source, schema=schema)
    except ConfigError:
        pass
    else:
        raise SystemExit(f"{source} loaded")
load_config("toy/distill")
load_config("eval/toy", schema=EvalConfig)
print(",".join(sorted(m for m in ("torch", "diffusers", "transformers", "numpy") if m in sys.modules)))
"""


def test_reading_a_recipe_imports_no_torch(tmp_path: Path) -> None:
    bad = _write(tmp_path, TRAIN + "optim:\n  generator:\n    lr: .inf\n")
    bad_eval = _write(tmp_path, EVAL + "device: tpu\n", "bad_eval.yaml")
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, str(bad), str(bad_eval)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    loaded = [m for m in result.stdout.strip().split(",") if m]
    assert not {"torch", "diffusers", "transformers"} & set(loaded), loaded
