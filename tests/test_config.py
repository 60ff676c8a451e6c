"""Fast tests for the typed recipe system (senseflow.config)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import senseflow.config.registry as registry_module
from senseflow.config import (
    ConfigError,
    DistillConfig,
    dump_config,
    flatten_config,
    known_families,
    load_config,
    read_recipe,
    register_family,
    save_resolved,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
SDXL = CONFIGS / "sdxl.yaml"
SD35L = CONFIGS / "sd35_large.yaml"
SD35M = CONFIGS / "sd35_medium.yaml"
FLUX = CONFIGS / "flux_dev.yaml"
DMD2 = CONFIGS / "dmd2_sdxl.yaml"


def minimal(**updates: object) -> dict:
    """A small valid mapping (toy family, no teacher needed)."""
    data = {
        "model": {"family": "toy", "anchors": {"values": [999, 749, 499, 249], "units": "index"}},
        "data": {"kind": "toy", "resolution": 32},
        "method": {
            "dmd": {
                "timestep_dist": {"kind": "uniform_index", "low": 20, "high": 980},
                "teacher_guidance": 4.0,
            },
            "fake": {"timestep_dist": {"kind": "logit_normal"}},
            "ida": {"enabled": True, "lam": 0.97},
            "isg": {"weight": 1.0, "margin": 50, "teacher_guidance": {"min": 2.0, "max": 4.0}},
            "gan": {"type": "toy", "weight": 0.1},
        },
        "schedule": {"iterations": 10},
    }
    for dotted, value in updates.items():
        node = data
        *head, last = dotted.split("__")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def error_of(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------


def test_expected_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {"sdxl.yaml", "sd35_large.yaml", "sd35_medium.yaml", "flux_dev.yaml", "dmd2_sdxl.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert isinstance(cfg, DistillConfig)
    assert cfg.model.anchors.steps == 4
    assert cfg.seed == 71801


def test_recipe_values_match_spec() -> None:
    sdxl, large, medium, flux, dmd2 = (load_config(p) for p in (SDXL, SD35L, SD35M, FLUX, DMD2))

    assert sdxl.model.teacher == "stabilityai/stable-diffusion-xl-base-1.0"
    assert sdxl.model.anchors.values == [999, 749, 499, 249] and sdxl.model.anchors.units == "ddpm_t"
    assert not sdxl.method.ida.enabled
    assert (sdxl.method.isg.weight, sdxl.method.isg.margin) == (0.2, 20)
    assert (sdxl.method.gan.weight, sdxl.method.gan.time_weight) == (0.5, "sqrt_alphabar")
    assert sdxl.method.dmd.teacher_guidance.fixed and sdxl.method.dmd.teacher_guidance.min == 8.0
    assert sdxl.optim.generator.name == "adamw" and sdxl.schedule.iterations == 18000

    assert large.model.family == "sd3" and large.model.anchors.units == "index"
    assert (large.method.ttur_ratio, large.method.ida.lam, large.method.isg.weight) == (5, 0.97, 1.0)
    assert (large.method.dmd.teacher_guidance.min, large.method.dmd.teacher_guidance.max) == (3.0, 10.0)
    assert large.method.gan.time_weight == "mirror_sigma_sq" and large.optim.fake.name == "adamw8bit"

    # Medium inherits Large through `base:` and changes only the Medium values.
    assert medium.model.teacher == "stabilityai/stable-diffusion-3.5-medium"
    assert (medium.method.ttur_ratio, medium.method.ida.lam, medium.method.isg.weight) == (10, 0.98, 0.5)
    assert (medium.method.isg.teacher_guidance.min, medium.method.isg.teacher_guidance.max) == (2.0, 4.0)
    assert medium.method.fake.timestep_dist == large.method.fake.timestep_dist
    assert medium.model.anchors == large.model.anchors
    # the official Medium trainer uses torch.optim.AdamW; everything else about the optimisers as Large
    assert {medium.optim.generator.name, medium.optim.fake.name, medium.optim.discriminator.name} == {"adamw"}
    assert (
        medium.optim.generator.lr == large.optim.generator.lr
        and medium.optim.warmup_steps == large.optim.warmup_steps
    )

    assert flux.model.teacher == "black-forest-labs/FLUX.1-dev"
    assert flux.model.anchors.values == [1.0, 0.904, 0.759, 0.512] and flux.model.anchors.units == "sigma"
    assert flux.method.dmd.guidance_kind == "embedding"
    assert flux.method.dmd.timestep_dist.kind == "logit_normal"
    assert (flux.method.gan.weight, flux.method.gan.time_weight) == (2.0, "alpha_sq")
    assert flux.precision.param_dtype == "bf16" and flux.optim.generator.lr == 1e-5

    assert not dmd2.method.ida.enabled and dmd2.method.isg.weight == 0.0
    assert dmd2.method.gan.type == "dmd2_head"
    assert (dmd2.method.gan.weight, dmd2.method.gan.disc_weight) == (5e-3, 1e-2)
    # the official SenseFlow code's DMD2-SDXL baseline (trainer_sdxl_DMD2.py)
    assert dmd2.method.ttur_ratio == 5 and dmd2.optim.generator.lr == 1e-6
    assert dmd2.optim.generator.clip_grad == 1.0 and dmd2.data.batch_size == 1
    assert dmd2.method.backward_sim_prob == 0.0 and dmd2.method.first_anchor_input == "noise"


def test_base_key_is_consumed_by_inheritance() -> None:
    raw = read_recipe(SD35M)
    assert "base" not in raw
    assert raw["model"]["family"] == "sd3"  # from sd35_large.yaml
    assert raw["method"]["ida"]["lam"] == 0.98  # Medium's own value wins


# ------------------------------------------------------------------------------------------------
# Overrides and round trip
# ------------------------------------------------------------------------------------------------


def test_overrides_scalars_bools_lists_nested() -> None:
    cfg = load_config(
        SD35L,
        [
            "optim.generator.lr=1e-6",  # YAML 1.1 reads '1e-6' as a string; pydantic coerces it
            "optim.fake.lr=2.5e-6",
            "method.ida.enabled=false",
            "method.ttur_ratio=7",
            "model.anchors.values=[999,749,499]",
            "method.dmd.timestep_dist={kind: logit_normal, mean: 0.5, std: 2}",
            "method.isg.teacher_guidance=6",
            "logging.sample_prompts=[a cat, a dog]",
            "name=my run",
        ],
    )
    assert cfg.optim.generator.lr == pytest.approx(1e-6)
    assert cfg.optim.fake.lr == pytest.approx(2.5e-6)
    assert cfg.method.ida.enabled is False
    assert cfg.method.ttur_ratio == 7
    assert cfg.model.anchors.values == [999, 749, 499]
    assert cfg.method.dmd.timestep_dist.kind == "logit_normal" and cfg.method.dmd.timestep_dist.std == 2.0
    assert cfg.method.isg.teacher_guidance.min == cfg.method.isg.teacher_guidance.max == 6.0
    assert cfg.logging.sample_prompts == ["a cat", "a dog"]
    assert cfg.name == "my run"


def test_override_list_index_and_creation_of_sections() -> None:
    cfg = load_config(SDXL, ["model.anchors.values.3=200", "checkpoint.keep_last=1"])
    assert cfg.model.anchors.values == [999, 749, 499, 200]
    cfg = load_config(minimal(), ["optim.discriminator.clip_grad=null", "precision.tf32=false"])
    assert cfg.optim.discriminator.clip_grad is None and cfg.precision.tf32 is False


def test_load_from_mapping_does_not_mutate_input() -> None:
    data = minimal()
    before = copy.deepcopy(data)
    cfg = load_config(data, ["method.ida.lam=0.5"])
    assert cfg.method.ida.lam == 0.5 and data == before
    assert cfg.output_dir == "runs/senseflow"  # default derived from name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_resolved_config_round_trips(recipe: Path, tmp_path: Path) -> None:
    cfg = load_config(recipe, ["optim.generator.lr=3e-6", "method.isg.teacher_guidance=[2, 9]"])
    out = save_resolved(cfg, tmp_path / "nested" / "config.yaml")
    again = load_config(out)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)
    assert "base" not in yaml.safe_load(out.read_text())


def test_flatten_config_for_logging() -> None:
    flat = flatten_config(load_config(FLUX))
    assert flat["method.ida.lam"] == 0.97
    assert flat["model.anchors.values"] == "[1.0, 0.904, 0.759, 0.512]"
    assert all(not isinstance(v, (dict, list)) for v in flat.values())


def test_json_schema_has_descriptions() -> None:
    schema = DistillConfig.model_json_schema()
    assert "method" in schema["properties"]
    ida = schema["$defs"]["IDAConfig"]["properties"]["lam"]
    assert "0.97" in ida["description"]


def test_register_family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_FAMILIES", dict(registry_module._FAMILIES))
    register_family("test_family_x")
    assert "test_family_x" in known_families()
    cfg = load_config(minimal(), ["model.family=test_family_x", "model.teacher=org/model"])
    assert cfg.model.family == "test_family_x"


# ------------------------------------------------------------------------------------------------
# One test per error kind: the message names the dotted field and the expectation
# ------------------------------------------------------------------------------------------------


def test_unknown_key_in_yaml_suggests_close_match(tmp_path: Path) -> None:
    data = read_recipe(SD35L)
    data["method"]["ida"]["lamda"] = data["method"]["ida"].pop("lam")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data))
    msg = error_of(path)
    assert "method.ida.lamda" in msg
    assert "unknown key 'lamda'" in msg
    assert "did you mean 'lam'?" in msg


def test_unknown_key_in_override_suggests_close_match() -> None:
    msg = error_of(SDXL, ["method.isg.wieght=0.3"])
    assert "method.isg.wieght" in msg and "did you mean 'weight'?" in msg
    assert "from override 'method.isg.wieght=0.3'" in msg
    msg = error_of(SDXL, ["optm.generator.lr=1e-6"])
    assert "optm: unknown key" in msg and "did you mean 'optim'?" in msg


def test_unknown_key_inside_tagged_union() -> None:
    msg = error_of(SDXL, ["method.dmd.timestep_dist.hgh=3"])
    assert "method.dmd.timestep_dist.hgh" in msg and "did you mean 'high'?" in msg
    msg = error_of(SDXL, ["method.dmd.timestep_dist.kind=logit"])
    assert "method.dmd.timestep_dist.kind" in msg and "logit_normal" in msg


def test_wrong_type() -> None:
    msg = error_of(SDXL, ["method.ttur_ratio=abc"])
    assert "method.ttur_ratio" in msg and "must be an integer >= 1" in msg and "'abc'" in msg
    msg = error_of(SDXL, ["method.ida.enabled=maybe"])
    assert "method.ida.enabled" in msg and "boolean" in msg
    msg = error_of(SDXL, ["method.gan.type=wgan"])
    assert "method.gan.type" in msg and "vfm" in msg and "wgan" in msg


def test_ida_lam_out_of_range() -> None:
    msg = error_of(SD35L, ["method.ida.lam=1.5"])
    assert "method.ida.lam" in msg and "<= 1" in msg and "1.5" in msg
    msg = error_of(SD35L, ["method.ida.lam=-0.1"])
    assert "method.ida.lam" in msg and ">= 0" in msg


def test_ida_enabled_without_lam() -> None:
    msg = error_of(SDXL, ["method.ida.enabled=true"])
    assert "method.ida.lam" in msg and "required when enabled" in msg


def test_anchors_not_strictly_decreasing() -> None:
    msg = error_of(SD35L, ["model.anchors.values=[999,499,749,249]"])
    assert "model.anchors.values" in msg and "strictly decreasing" in msg
    msg = error_of(SD35L, ["model.anchors.values=[999,749,749,249]"])
    assert "strictly decreasing" in msg


def test_anchors_outside_range() -> None:
    msg = error_of(SDXL, ["model.anchors.values=[1000,749,499,249]"])
    assert "model.anchors.values" in msg and "1000" in msg and "0..999" in msg
    msg = error_of(FLUX, ["model.anchors.values=[1.2,0.9,0.7]"])
    assert "model.anchors.values" in msg and "(0, 1]" in msg
    msg = error_of(SD35L, ["model.anchors.values=[999.5,749]"])
    assert "integer" in msg


def test_ttur_ratio_below_one() -> None:
    msg = error_of(SDXL, ["method.ttur_ratio=0"])
    assert "method.ttur_ratio" in msg and ">= 1" in msg


def test_missing_recipe_file(tmp_path: Path) -> None:
    msg = error_of(tmp_path / "nope.yaml")
    assert "recipe file not found" in msg and "nope.yaml" in msg
    msg = error_of(CONFIGS / "sdxl.yml")
    assert "did you mean 'sdxl.yaml'?" in msg


def test_missing_base_file(tmp_path: Path) -> None:
    path = tmp_path / "child.yaml"
    path.write_text("base: parent.yaml\nname: x\n")
    msg = error_of(path)
    assert "recipe file not found" in msg and "parent.yaml" in msg


def test_base_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert "cycle" in error_of(tmp_path / "a.yaml")


def test_missing_local_teacher_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_teacher"
    msg = error_of(SDXL, [f"model.teacher={missing}"])
    assert "model.teacher" in msg and "does not exist" in msg and str(missing) in msg
    msg = error_of(SDXL, ["model.teacher=./definitely/not/here"])
    assert "model.teacher" in msg and "./definitely/not/here" in msg
    # An existing local folder and a hub id are both fine.
    assert load_config(SDXL, [f"model.teacher={tmp_path}"]).model.teacher == str(tmp_path)
    assert load_config(SDXL, ["model.teacher=org/some-model"]).model.teacher == "org/some-model"


def test_invalid_yaml_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel:\n  family: sdxl\n   teacher: y\n")
    msg = error_of(path)
    assert "invalid YAML" in msg and str(path) in msg and "line 4" in msg


def test_invalid_override_syntax() -> None:
    assert "expected 'dotted.key=value'" in error_of(SDXL, ["method.ttur_ratio"])
    msg = error_of(SDXL, ["model.family.x=1"])
    assert "model.family" in msg and "not a mapping" in msg


def test_cross_field_checks() -> None:
    msg = error_of(SDXL, ["method.isg.margin=200"])
    assert "method.isg.margin" in msg and "expected margin <= 125" in msg
    msg = error_of(SDXL, ["model.anchors.units=index"])
    assert "model.anchors.units" in msg and "ddpm_t" in msg
    msg = error_of(SD35L, ["method.dmd.guidance_kind=embedding"])
    assert "method.dmd.guidance_kind" in msg
    msg = error_of(FLUX, ["data.resolution=1000"])
    assert "data.resolution" in msg and "multiple of 16" in msg
    msg = error_of(SDXL, ["method.dmd.teacher_guidance={min: 9, max: 3}"])
    assert "method.dmd.teacher_guidance.min" in msg and "<= max" in msg
    msg = error_of(SDXL, ["method.fake.timestep_dist={kind: uniform_index, low: 50, high: 10}"])
    assert "method.fake.timestep_dist.low" in msg


def test_missing_required_fields_and_family_rules() -> None:
    msg = error_of({"model": {"family": "sdxl", "anchors": {"values": [999], "units": "ddpm_t"}}})
    assert "model.teacher" in msg and "required" in msg
    assert "method: required field is missing" in msg and "schedule: required field is missing" in msg
    msg = error_of(minimal(), ["model.family=sdx"])
    assert "model.family" in msg and "did you mean 'sdxl'?" in msg


def test_several_problems_one_line_each() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SDXL, ["method.ttur_ratio=0", "optim.generator.lr=-1", "checkpoint.every=0"])
    problems = info.value.problems
    assert len(problems) == 3
    assert {p.split(":")[0] for p in problems} == {
        "method.ttur_ratio",
        "optim.generator.lr",
        "checkpoint.every",
    }
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.startswith("3 problems in ")  # one line, '; '-joined
    assert message.count("; ") >= 2 and all(p in message for p in problems)


def test_loader_is_schema_agnostic(tmp_path: Path) -> None:
    from pydantic import BaseModel, ConfigDict, Field

    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        steps: int = Field(default=4, ge=1)

    class Other(BaseModel):
        model_config = ConfigDict(extra="forbid")
        label: str
        inner: Inner = Inner()

    (tmp_path / "parent.yaml").write_text("label: a\ninner: {steps: 2}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nlabel: b\n")
    cfg = load_config(tmp_path / "child.yaml", ["inner.steps=3"], schema=Other)
    assert (cfg.label, cfg.inner.steps) == ("b", 3)
    out = save_resolved(cfg, tmp_path / "resolved.yaml")
    assert load_config(out, schema=Other) == cfg
    msg = error_of(tmp_path / "child.yaml", ["inner.stps=3"], schema=Other)
    assert "inner.stps" in msg and "did you mean 'steps'?" in msg


@pytest.mark.parametrize("recipe", ["sdxl", "dmd2_sdxl", "sd35_large", "sd35_medium", "flux_dev"])
def test_official_recipes_update_the_generator_at_the_end_of_each_ttur_period(recipe: str) -> None:
    # every official trainer counts iterations from 1 and steps G when the count is a multiple of k
    assert load_config(recipe).method.ttur_generator_turn == "period_end"


def test_the_toy_recipe_keeps_the_schedule_its_measured_results_used() -> None:
    assert load_config("toy/distill").method.ttur_generator_turn == "period_start"


def test_flux_and_sd35_recipes_carry_their_official_configs() -> None:
    """configs/FLUX/flux_senseflow.yaml and configs/SD35/sd35_senseflow.yaml of the official code, with
    its trainers building every optimiser at LR 1.0 under the config's schedule."""
    flux = load_config("flux_dev")
    assert (flux.seed, flux.checkpoint.every, flux.optim.warmup_steps) == (71801, 1500, 500)
    lrs = {flux.optim.generator.lr, flux.optim.fake.lr, flux.optim.discriminator.lr}
    assert lrs == {1e-5} and flux.optim.warmup_start_factor * 1e-5 == pytest.approx(5e-6)
    sd35 = load_config("sd35_large")
    assert (sd35.seed, sd35.checkpoint.every, sd35.optim.warmup_start_factor) == (71801, 3000, 1.0)
    assert {sd35.optim.generator.lr, sd35.optim.fake.lr, sd35.optim.discriminator.lr} == {1e-6}
