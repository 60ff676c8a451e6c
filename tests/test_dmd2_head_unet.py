"""DMD2's head reads the features the adapter offers, so it works on a UNet (SDXL's kind) too:
there it sits on the bottleneck (``mid_block``), as in DMD2's SDXL code."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from senseflow.core.ddpm import DDPMSchedule
from senseflow.core.parameterisation import DDPMParameterisation
from senseflow.method import nonsaturating_d_loss
from senseflow.models.adapter import FamilyAdapter
from senseflow.models.batch import Conditioning
from senseflow.models.discriminators import FakeScoreHeadDiscriminator

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    cross_attention_dim=12,
    attention_head_dim=4,
    norm_num_groups=4,
)


class UNetAdapter(FamilyAdapter):
    """The smallest adapter around a UNet with an ε-prediction DDPM schedule."""

    def __init__(self):
        self.param = DDPMParameterisation(DDPMSchedule())
        self.anchors = None

    def network_spec(self, role):
        return UNet2DConditionModel, UNET

    def weight_files(self):
        return []

    def encode_text(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        return Conditioning({"tokens": torch.randn(len(prompts), 3, 12, generator=g)})

    def sample_shape(self, resolution):
        return (4, resolution // 8, resolution // 8)

    def sampling_levels(self, steps):
        return torch.linspace(999, 0, steps + 1)

    def predict(self, net, x_t, level, cond, guidance=None):
        return net(x_t, self.param.model_timestep(level), encoder_hidden_states=cond.tensors["tokens"]).sample


def test_dmd2_head_on_a_unet_reads_the_bottleneck_and_trains_only_its_head():
    torch.manual_seed(0)
    adapter = UNetAdapter()
    unet = UNet2DConditionModel(**UNET)
    taps = adapter.feature_taps(unet)
    assert [t.module for t in taps] == [unet.mid_block] and taps[0].width == 16
    head = FakeScoreHeadDiscriminator(adapter, unet, trains_fake=False)
    x = torch.randn(2, 4, 8, 8)
    cond = adapter.encode_prompts(["a", "b"])
    level = torch.tensor([500, 100])
    noise = torch.randn_like(x)
    tokens = head.features(adapter.param.add_noise(x, noise, level), level, cond)
    assert tokens.shape == (2, 4 * 4, 16)  # the mid block's 4x4 map at the widest channel count
    logits = head(x, cond, level, noise)
    assert logits.shape == (2, 1)
    loss = nonsaturating_d_loss(logits, -logits.detach())
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in unet.parameters())  # the fake score's weights stay out of D's loss


def test_the_conv_head_is_dmd2s_classifier_on_the_bottleneck_map():
    """``head: conv``: convolutions of kernel 4 and strides 2, 2, 2, 4 with GroupNorm and SiLU, then a
    1x1 convolution, on the mid block's map resized to 32x32; written out here layer by layer."""
    torch.manual_seed(0)
    adapter = UNetAdapter()
    unet = UNet2DConditionModel(**UNET)
    head = FakeScoreHeadDiscriminator(adapter, unet, trains_fake=False, head="conv")
    convs = [m for m in head.head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [
        ((4, 4), (2, 2), (1, 1)),
        ((4, 4), (2, 2), (1, 1)),
        ((4, 4), (2, 2), (1, 1)),
        ((4, 4), (4, 4), (0, 0)),
        ((1, 1), (1, 1), (0, 0)),
    ]
    x, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    cond = adapter.encode_prompts(["a", "b"])
    level = torch.tensor([500, 100])
    fmap = head.features(adapter.param.add_noise(x, noise, level), level, cond, as_tokens=False)
    assert fmap.shape == (2, 16, 4, 4)
    h = torch.nn.functional.interpolate(fmap, size=(32, 32), mode="bilinear", align_corners=False)
    for i in range(4):
        conv, norm = convs[i], head.head.net[3 * i + 1]
        h = torch.nn.functional.silu(torch.nn.functional.group_norm(conv(h), 16, norm.weight, norm.bias))
    expected = convs[4](h).flatten(1)  # GroupNorm(gcd(32, 16) = 16) on 16 channels
    torch.testing.assert_close(head(x, cond, level, noise), expected)
    head(x, cond, level, noise).sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in unet.parameters())


def test_the_conv_head_refuses_token_features():
    """A DiT's blocks give tokens, not a map: one clear error."""
    dit = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=8,
    )
    with pytest.raises(ValueError, match=r"method\.gan\.head: conv reads a UNet's bottleneck"):
        FakeScoreHeadDiscriminator(UNetAdapter(), dit, head="conv")
