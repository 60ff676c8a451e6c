"""The official trainers' choices that the recipes reproduce, checked against independent references:
diffusers' own schedulers for the noise levels, closed forms for the draws' scope and the first anchor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from senseflow.config import load_config
from senseflow.core.ddpm import DDPMSchedule
from senseflow.core.flow import FlowSchedule
from senseflow.core.parameterisation import DDPMParameterisation, FlowParameterisation
from senseflow.method import sample_levels, segment_ends
from senseflow.models import build_adapter
from senseflow.train.draws import draw_step
from senseflow.train.step import NetworkCalls, SenseFlowStep
from tests.family_helpers import family_cfg, write_image_dataset
from tests.trainer_helpers import RECIPE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)
SD35 = FlowParameterisation(FlowSchedule(shift=3.0))
SD35_SCHEDULER = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD 3.5's config


# ---------------------------------------------------------------------------------------------- levels


@pytest.mark.parametrize("recipe", ["sd35_large", "sd35_medium"])
def test_sd35_fake_score_levels_follow_the_official_shifted_table(recipe):
    """The official SD 3.5 trainers draw u ~ logit-normal(0, 1) and read the scheduler's shift-3 table at
    index floor(1000 u); the recipe's draws must have that distribution (median sigma 0.75, not 0.5)."""
    dist = load_config(CONFIGS / f"{recipe}.yaml").method.fake.timestep_dist
    n = 40_000
    ours = sample_levels(dist, n, SD35, generator=torch.Generator().manual_seed(0))
    u = torch.sigmoid(torch.randn(n, generator=torch.Generator().manual_seed(1)))
    official = SD35_SCHEDULER.sigmas[(u * 1000).long()]
    q = torch.linspace(0.05, 0.95, 19)
    assert torch.quantile(ours, q).sub(torch.quantile(official, q)).abs().max() < 0.01
    assert abs(ours.median().item() - 0.75) < 0.01


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("sd35_large", lambda: float(SD35_SCHEDULER.sigmas.flip(0)[0])),  # table index 0: sigma ~ 0.003
        ("sd35_medium", lambda: float(SD35_SCHEDULER.sigmas.flip(0)[0])),
        ("flux_dev", lambda: 0.0),  # timestep 0 / 1000
    ],
)
def test_the_last_isg_segment_ends_where_the_official_trainer_ends_it(recipe, expected):
    cfg = load_config(CONFIGS / f"{recipe}.yaml")
    param = SD35 if recipe.startswith("sd35") else FlowParameterisation(FlowSchedule(), grid="sigma")
    end = segment_ends(torch.tensor([1.0, 0.5]), param, cfg.method.isg.last_segment_end)[-1]
    assert end.item() == pytest.approx(expected(), abs=1e-6)


def test_sdxl_last_isg_segment_ends_at_t0_as_the_official_trainer():
    """The official SDXL ISG re-noises to timestep_prev = 0 (noise std sqrt(1 - alpha_bar_0) ~ 0.03)."""
    cfg = load_config(CONFIGS / "sdxl.yaml")
    param = DDPMParameterisation(DDPMSchedule())
    end = segment_ends(torch.tensor([999, 749, 499, 249]), param, cfg.method.isg.last_segment_end)[-1]
    reference = DDPMScheduler(**SDXL_SCHEDULER)
    x0, eps = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(
        param.add_noise(x0, eps, end.expand(2)), reference.add_noise(x0, eps, torch.tensor([0, 0]))
    )


# ---------------------------------------------------------------------------------------------- draws


def _draws(randomness: str, iteration: int = 3, world: int = 4, batch: int = 2, prob: float = 0.5):
    method = load_config(
        RECIPE,
        [f"method.randomness={randomness}", f"method.backward_sim_prob={prob}", "method.gan.diffaug=[]"],
    ).method
    assert method.isg.weight > 0  # t_mid is drawn
    anchors = torch.tensor([1.0, 0.9, 0.75, 0.5])
    return draw_step(method, SD35, anchors, (3, 4, 4), world * batch, batch, 1, iteration)


def test_global_randomness_shares_the_iteration_choices_and_levels_as_the_official_trainers():
    """One anchor, switch and t_mid for the global batch; the DMD and fake levels of one rank's batch
    repeated on every rank; noises and guidance per sample."""
    world, batch = 4, 2
    for iteration in range(20):
        d = _draws("global", iteration, world, batch)
        for choice in (d.anchor_index, d.simulate, d.isg_mid_grid):
            assert (choice == choice[0]).all()
        for level in (d.dmd_level, d.fake_level):
            per_rank = level.view(world, batch)
            assert (per_rank == per_rank[0]).all() and per_rank[0, 0] != per_rank[0, 1]
        assert len({tuple(x.flatten().tolist()) for x in d.input_noise}) == world * batch
    # another world size with the same global batch (a resume elsewhere) keeps the iteration's choices
    other = _draws("global", 5, world=2, batch=4)
    same = _draws("global", 5, world=4, batch=2)
    for name in ("anchor_index", "simulate", "isg_mid_grid"):
        assert torch.equal(getattr(other, name), getattr(same, name))
    anchors = torch.stack([_draws("global", n).anchor_index[0] for n in range(400)])
    simulated = torch.stack([_draws("global", n).simulate[0] for n in range(400)]).float()
    assert set(anchors.tolist()) == {0, 1, 2, 3}
    assert abs(simulated.mean().item() - 0.5) < 0.1  # 400 draws: sd 0.025


def test_per_rank_and_per_sample_scopes():
    per_rank = _draws("per_rank", world=4, batch=2)
    for choice in (per_rank.anchor_index, per_rank.simulate):
        pairs = choice.view(4, 2)
        assert (pairs[:, 0] == pairs[:, 1]).all()
    varied = [len(set(_draws("per_sample", n).anchor_index.tolist())) for n in range(10)]
    assert max(varied) > 1
    levels = _draws("per_sample").dmd_level.view(4, 2)
    assert not (levels == levels[0]).all()


# ---------------------------------------------------------------------------------------------- first anchor


def _step(recipe: str, param, anchors: torch.Tensor, *overrides: str):
    method = load_config(CONFIGS / f"{recipe}.yaml", ["method.randomness=per_sample", *overrides]).method
    return method, SenseFlowStep(method, param, anchors, NetworkCalls(*[None] * 6))


@pytest.mark.parametrize("mode", ["noise", "add_noise"])
def test_sdxl_first_anchor_input_is_pure_noise_as_the_official_pure_noise_mask(mode):
    """At t = 999 the official SDXL trainers feed G the noise itself (alpha_bar_999 is not 0);
    ``add_noise`` is diffusers' forward noising, which keeps sqrt(alpha_bar_999) of the sample."""
    param = DDPMParameterisation(DDPMSchedule())
    anchors = torch.tensor([999, 749, 499, 249])
    method, step = _step("dmd2_sdxl", param, anchors, f"method.first_anchor_input={mode}")
    assert method.backward_sim_prob == 0.0  # every input is forward-noised data
    d = draw_step(method, param, anchors, (4, 8, 8), 64, 64, 0, 0)
    x_real = torch.randn(64, 4, 8, 8)
    x_in = step.generator_input(x_real, d, None)
    timesteps = anchors[d.anchor_index]
    reference = DDPMScheduler(**SDXL_SCHEDULER).add_noise(x_real, d.input_noise, timesteps)
    first = d.anchor_index == 0
    assert first.any() and (~first).any()
    torch.testing.assert_close(x_in[~first], reference[~first])
    if mode == "noise":
        assert torch.equal(x_in[first], d.input_noise[first])
    else:
        torch.testing.assert_close(x_in[first], reference[first])
        assert not torch.allclose(x_in[first], d.input_noise[first])


def test_flow_first_anchor_at_sigma_one_is_noise_either_way():
    anchors = SD35.level_from_grid(torch.tensor([999, 749, 499, 249]))  # the recipe's anchors
    x_real = torch.randn(32, 2, 4)
    inputs = []
    for mode in ("noise", "add_noise"):
        method, step = _step(
            "sd35_large", SD35, anchors, f"method.first_anchor_input={mode}", "method.backward_sim_prob=0.0"
        )
        d = draw_step(method, SD35, anchors, (2, 4), 32, 32, 0, 0)
        inputs.append(step.generator_input(x_real, d, None))
        first = d.anchor_index == 0
        assert first.any() and torch.equal(inputs[-1][first], d.input_noise[first])
    assert torch.equal(*inputs)


# ---------------------------------------------------------------------------------------------- VAE dtype


def test_vae_decodes_in_the_recipe_dtype(tiny_folder, tmp_path):
    """fp32 (the default, as the official code decodes D's inputs) is diffusers' decode in float32;
    bf16 runs the decoder under bf16 autocast: float32 out, close but not equal."""
    data = write_image_dataset(tmp_path / "data", 2)
    teacher = tiny_folder("sdxl")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for dtype in ("fp32", "bf16"):
        cfg = family_cfg("sdxl", teacher, data, tmp_path / dtype, f"precision.vae_dtype={dtype}")
        adapter = build_adapter(cfg).to(torch.device("cpu"))
        with torch.no_grad():
            out[dtype] = adapter.decode(latents)
        assert out[dtype].dtype == torch.float32
    vae = adapter.vae
    with torch.no_grad():
        direct = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    torch.testing.assert_close(out["fp32"], direct)
    assert not torch.equal(out["bf16"], out["fp32"])
    torch.testing.assert_close(out["bf16"], out["fp32"], rtol=0.1, atol=0.05)


# ---------------------------------------------------------------------------------------------- the table

METHOD_DOC = Path(__file__).resolve().parents[1] / "docs" / "method.md"
OFFICIAL_RECIPES = {"sdxl", "sd35_large", "sd35_medium", "flux_dev", "dmd2_sdxl"}


def _official_rows() -> list[dict[str, str]]:
    """The rows of docs/method.md's official-vs-senseflow table that name a recipe field."""
    rows, header = [], None
    for line in METHOD_DOC.read_text().splitlines():
        if not line.startswith("|"):
            header = None if not line.strip() else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["point", "official code"]:
            header = cells if "senseflow field" in cells else None
        elif header and not set(line) <= set("|- "):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _value(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = value[int(part)] if isinstance(value, list | tuple) else getattr(value, part)
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return list(value) if isinstance(value, tuple) else value


def _same(found, documented) -> bool:
    if isinstance(documented, dict):
        return isinstance(found, dict) and all(_same(found.get(k), v) for k, v in documented.items())
    if isinstance(documented, list):
        return (
            isinstance(found, list) and len(found) == len(documented) and all(map(_same, found, documented))
        )
    if isinstance(documented, float | int) and not isinstance(documented, bool):
        return isinstance(found, float | int) and found == pytest.approx(documented, rel=1e-9)
    return found == documented


def test_every_official_recipe_matches_the_documented_official_values():
    """docs/method.md's table states each official value with its file and line; every recipe it
    lists must hold exactly that value (one YAML value per row, in backticks)."""
    import yaml

    rows = [r for r in _official_rows() if r["senseflow field"].startswith("`")]
    assert len(rows) >= 40
    checked: dict[str, int] = {}
    for row in rows:
        assert ".py:" in row["official code"] or ".yaml:" in row["official code"], row["point"]
        field = row["senseflow field"].strip("`")
        documented = yaml.safe_load(row["official value"].strip("`"))
        for recipe in (r.strip() for r in row["recipes"].split(",")):
            assert recipe in OFFICIAL_RECIPES, (row["point"], recipe)
            found = _value(load_config(CONFIGS / f"{recipe}.yaml"), field)
            assert _same(found, documented), f"{recipe}: {field} = {found!r}, official {documented!r}"
            checked[recipe] = checked.get(recipe, 0) + 1
    assert set(checked) == OFFICIAL_RECIPES and min(checked.values()) >= 10


@pytest.mark.parametrize("source", ["images", "decoded_latents"])
def test_a_pixel_discriminator_reads_the_recipes_real_pixels(source):
    """The official SDXL trainer shows D the fp32 VAE decode of the training latent, not the image."""
    from types import SimpleNamespace

    from senseflow.train.trainer import Distiller

    cfg = load_config(CONFIGS / "sdxl.yaml", [f"method.gan.real_pixels={source}"])
    run = SimpleNamespace(cfg=cfg, decode=lambda x: x * 2 - 1)  # a stand-in decoder
    images, latents = torch.rand(2, 3, 8, 8), torch.rand(2, 4, 1, 1)
    real = Distiller._real_pixels(run, SimpleNamespace(images=images), latents)
    assert torch.equal(real, images if source == "images" else latents * 2 - 1)
    cached = Distiller._real_pixels(run, SimpleNamespace(images=None), latents)
    assert torch.equal(cached, latents * 2 - 1)  # a latent-cache batch has no images to show
    assert load_config(CONFIGS / "sdxl.yaml").method.gan.real_pixels == "decoded_latents"
