import torch

from senseflow.config.common import AnchorsConfig
from senseflow.models.toy import ToyAdapter
from senseflow.toy.pipeline import ToyTeacher


def test_adapter_cfg_matches_teacher_sampler(tiny_teacher_dir):
    """The trainer's guided teacher call equals the sampler's CFG velocity (two separate code paths)."""
    adapter = ToyAdapter(
        tiny_teacher_dir, AnchorsConfig(values=[1.0, 0.75, 0.5, 0.25], units="t"), "uncond_plus"
    )
    nets = adapter.build_networks()
    teacher = ToyTeacher(tiny_teacher_dir)
    prompts = ["a small red circle", "a large blue square above a small green triangle"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.3])
    ours = adapter.guided_predict(
        nets.teacher, x, sigma, adapter.encode_prompts(prompts), torch.tensor([2.5, 2.5])
    )
    reference = teacher.guided_velocity_fn(prompts, 2.5)(x, sigma)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_generator_and_fake_start_as_teacher_copies(tiny_teacher_dir):
    adapter = ToyAdapter(tiny_teacher_dir, AnchorsConfig(values=[1.0, 0.5], units="t"), "uncond_plus")
    nets = adapter.build_networks()
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

    from senseflow.config import load_config
    from senseflow.models import build_adapter

    recipe = Path(__file__).resolve().parents[1] / "configs" / "toy" / "distill.yaml"
    cfg = load_config(recipe, [f"model.teacher={tiny_teacher_dir}", "model.revision=main"])
    with pytest.raises(ValueError, match=r"model\.revision: the toy teacher is a local folder"):
        build_adapter(cfg)
