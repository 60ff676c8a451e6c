import torch

from senseflow.config.common import AnchorsConfig
from senseflow.families.toy.adapter import ToyAdapter
from senseflow.families.toy.pipeline import ToyTeacher
from senseflow.models.build import build_networks


def test_adapter_cfg_equals_two_stock_transformer_calls(tiny_teacher_dir):
    """The trainer's guided teacher call equals u + w (c - u) from two separate calls of the stock
    ``from_pretrained`` transformer (conditional, then the empty prompt)."""
    adapter = ToyAdapter(
        tiny_teacher_dir, AnchorsConfig(values=[1.0, 0.75, 0.5, 0.25], units="t"), "uncond_plus"
    )
    nets = build_networks(adapter)
    teacher = ToyTeacher(tiny_teacher_dir)
    prompts = ["a small red circle", "a large blue square above a small green triangle"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.3])
    ours = adapter.guided_predict(
        nets.teacher, x, sigma, adapter.encode_prompts(prompts), torch.tensor([2.5, 2.5])
    )

    def velocity(texts):
        tokens, pooled = teacher.encoder(texts)
        return teacher.transformer(
            hidden_states=x,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=sigma * 1000,
            return_dict=False,
        )[0]

    with torch.no_grad():
        c, u = velocity(prompts), velocity(["", ""])
    reference = u + 2.5 * (c - u)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_generator_and_fake_start_as_teacher_copies(tiny_teacher_dir):
    adapter = ToyAdapter(tiny_teacher_dir, AnchorsConfig(values=[1.0, 0.5], units="t"), "uncond_plus")
    nets = build_networks(adapter)
    for (name, t), g, f in zip(
        nets.teacher.named_parameters(),
        nets.generator.parameters(),
        nets.fake_score.parameters(),
        strict=True,
    ):
        assert torch.equal(t, g) and torch.equal(t, f), name
        assert not t.requires_grad and g.requires_grad and f.requires_grad
        assert g.data_ptr() != t.data_ptr() and f.data_ptr() != g.data_ptr()
    assert adapter.anchors.sigmas == (1.0, 0.5)


def test_toy_family_refuses_a_hub_revision(tiny_teacher_dir, tmp_path):
    from pathlib import Path

    import pytest

    from senseflow.config import ConfigError, load_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "toy" / "distill.yaml"
    with pytest.raises(ConfigError, match=r"model\.revision.*local folder and has no hub revision"):
        load_config(recipe, [f"model.teacher={tiny_teacher_dir}", "model.revision=main"])
