"""One registry per kind of name: its entries' rules are what the schema checks, its builders what a
run builds, and a field nothing reads is refused rather than ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

import senseflow.config.registry as registry
from senseflow.config import ConfigError, load_config, save_resolved
from senseflow.config.registry import FamilySpec, available, register_family
from senseflow.models import build_adapter
from senseflow.models.build import build_generator
from senseflow.models.discriminators import build_discriminator
from senseflow.train.data import build_stream
from tests.trainer_helpers import RECIPE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _toy(*overrides):
    return load_config(RECIPE, list(overrides))


def test_built_ins():
    assert "toy" in available("family") and "toy" in available("data")
    assert {"sdxl", "sd3", "flux"} <= set(available("family"))
    assert {"toy", "dmd2_head"} <= set(available("discriminator"))
    assert "vfm" in available("discriminator")


@pytest.mark.parametrize("recipe", ["sdxl.yaml", "sd35_large.yaml", "sd35_medium.yaml", "flux_dev.yaml"])
def test_a_hub_teacher_missing_from_the_cache_is_one_clear_error(recipe, tmp_path, monkeypatch):
    """The shipped recipes name hub ids; without model.allow_download nothing is downloaded."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(CONFIGS / recipe)
    with pytest.raises(FileNotFoundError, match=r"model\.teacher: '[\w./-]+' is neither a local folder"):
        build_adapter(cfg)


def test_planned_data_kind_refuses_to_build():
    cfg = load_config(CONFIGS / "sdxl.yaml", ["data.kind=latent_lmdb"])
    with pytest.raises(ValueError, match=r"data\.kind: 'latent_lmdb' is a valid recipe value"):
        build_stream(cfg)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("data.path=somewhere", "data.path"),
        ("data.kind=json data.path=x.json", "data.kind"),
        ("method.gan.backbone=facebook/dinov2-base", "method.gan.backbone"),
        ("method.gan.text_encoder=clip", "method.gan.text_encoder"),
        ("method.gan.reference_encoder=clip", "method.gan.reference_encoder"),
        ("method.gan.feature_blocks=[3]", "method.gan.feature_blocks"),
        ("method.gan.head_trains_fake=false", "method.gan.head_trains_fake"),
        ("method.dmd.guidance_kind=embedding", "method.dmd.guidance_kind"),
        ("data.resolution=33", None),  # any resolution: the toy family has no VAE factor
    ],
)
def test_fields_nothing_reads_are_refused(override, field):
    if field is None:
        _toy(*override.split())
        return
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _toy(*override.split())


def test_fields_a_discriminator_reads_are_accepted():
    cfg = _toy(
        "method.gan.type=dmd2_head", "method.gan.feature_blocks=[0]", "method.gan.head_trains_fake=false"
    )
    assert cfg.method.gan.feature_blocks == [0]


def test_a_resolved_config_loads_back(tmp_path):
    cfg = _toy("method.gan.type=dmd2_head", "method.gan.feature_blocks=[0]")
    save_resolved(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_recipe_rules_come_from_the_registered_entry(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    register_family(
        FamilySpec(
            "tiny_latent", builder=None, anchor_units=("t",), guidance_kinds=("cfg",), resolution_multiple=16
        )
    )
    base = ["model.family=tiny_latent", "model.teacher=org/model", "data.resolution=32"]
    with pytest.raises(ConfigError, match=r"model\.anchors\.units.*expected one of t"):
        _toy(*base, "model.anchors.units=sigma", "model.anchors.values=[1.0,0.5]")
    with pytest.raises(ConfigError, match=r"data\.resolution.*multiple of 16"):
        _toy(*base[:2], "data.resolution=40")
    cfg = _toy(*base)
    with pytest.raises(ValueError, match="cannot build it yet"):
        build_adapter(cfg)


def test_discriminator_builders_come_from_the_registry(tiny_teacher_dir):
    cfg = _toy(f"model.teacher={tiny_teacher_dir}")
    adapter = build_adapter(cfg)
    fake = build_generator(adapter)
    assert build_discriminator(cfg.method.gan, adapter, fake).loss == "hinge"


def test_a_kind_registered_by_name_reads_a_path(monkeypatch):
    monkeypatch.setattr(registry, "_DATA_KINDS", dict(registry._DATA_KINDS))
    registry.register_data_kind("my_shards")
    cfg = _toy("data.kind=my_shards", "data.path=somewhere", "model.family=sd3", "model.teacher=org/m")
    assert cfg.data.path == "somewhere"


def test_dmd2_head_reads_one_block():
    with pytest.raises(ConfigError, match=r"method\.gan\.feature_blocks: the DMD2 head reads one block"):
        _toy("method.gan.type=dmd2_head", "method.gan.feature_blocks=[3,5]")


def test_a_planned_discriminator_is_refused_before_any_weight_is_read(
    tiny_teacher_dir, tmp_path, monkeypatch
):
    import senseflow.models.build as build
    import senseflow.train.trainer as trainer

    read = []
    monkeypatch.setattr(build, "read_weights", lambda files: read.append(files) or {})
    monkeypatch.setattr(build, "TeacherWeights", lambda files: read.append(files))
    monkeypatch.setattr(registry, "_DISCRIMINATORS", dict(registry._DISCRIMINATORS))
    registry.register_discriminator("planned_disc")  # a name without a builder
    cfg = _toy(f"model.teacher={tiny_teacher_dir}", f"output_dir={tmp_path}", "method.gan.type=planned_disc")
    with pytest.raises(ValueError, match=r"method\.gan\.type: 'planned_disc' is a valid recipe value"):
        trainer.Distiller(cfg, progress=False)
    assert read == []


def test_a_folder_does_not_hide_a_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sdxl").mkdir()  # e.g. a downloaded teacher folder
    assert load_config("sdxl").model.family == "sdxl"


def test_base_is_found_beside_the_recipe_or_shipped_never_in_the_working_directory(tmp_path, monkeypatch):
    work, recipes = tmp_path / "work", tmp_path / "recipes"
    work.mkdir()
    recipes.mkdir()
    (work / "sdxl.yaml").write_text("name: from_the_working_directory\n")
    (recipes / "child.yaml").write_text("base: sdxl.yaml\nname: child\n")
    monkeypatch.chdir(work)
    cfg = load_config(recipes / "child.yaml")
    assert cfg.model.family == "sdxl" and cfg.name == "child"  # the shipped sdxl recipe underneath
    (recipes / "sdxl.yaml").write_text(
        (CONFIGS / "sdxl.yaml").read_text().replace("name: ", "name: beside_", 1)
    )
    (recipes / "child.yaml").write_text("base: sdxl.yaml\n")
    assert load_config(recipes / "child.yaml").name.startswith("beside_")
