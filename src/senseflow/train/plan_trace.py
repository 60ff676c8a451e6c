"""Activation memory for ``senseflow plan``, measured on the meta device.

A pass (a network's forward, and its backward for the passes that train) runs on meta tensors,
which have shapes and dtypes but no storage, under :class:`Timeline`, a dispatch mode that records
every storage an operation creates and the moment it is freed. The running sum of those storages
is what the pass holds beyond its weights and inputs: the tensors autograd saves, the transient
results of each operation, the gradients of activations in the backward pass, and the blocks
recomputed there under gradient checkpointing (torch's own checkpointing runs on meta tensors).
Weight gradients are left out (the plan counts them as gradients).

Two things a meta pass cannot know are modelled:

* attention runs as a fused kernel (flash or memory-efficient attention on a GPU): it keeps q, k,
  v, the output and a float32 log-sum-exp per row, never the [L, L] score matrix
  (:class:`FusedAttention`), where the meta device would run the unfused math;
* autocast: the pass runs with the network cast to the compute dtype. The bf16 copies autocast
  makes of float32 weights are added by the plan to the passes that train; the float32 copies it
  makes of the inputs of normalisation layers are not (an underestimate under bf16 autocast).

Passes are measured at batch 1 and 2 and extended linearly in the batch (:class:`Linear`). Against
the CPU allocator on the tiny folders (64 and 128 px, float32; docs/scale.md), passes with
gradients came out 13 % under to 3 % over, passes without gradients 31 % under to 2 % over (CPU
kernels' own buffers, which no operation returns, weigh most in those small passes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from senseflow.models.adapter import FamilyAdapter
from senseflow.models.batch import Conditioning

META = torch.device("meta")


class FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for its backward: q, k, v, the output and a float32
    log-sum-exp per query row; its backward allocates dq, dk, dv and a float32 accumulator for dq."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        accumulator = torch.empty_like(q, dtype=torch.float32)
        dq = torch.empty_like(q)
        del accumulator
        return dq, torch.empty_like(k), torch.empty_like(v)


def _fused_attention(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as :class:`FusedAttention` while a pass is measured.

    The function is replaced in ``torch.nn.functional`` itself (diffusers and transformers look it
    up there at each call), so that the blocks recomputed in the backward pass, which autograd runs
    outside any mode entered here, see it too; it is restored afterwards."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class Timeline(TorchDispatchMode):
    """Every storage created by an operation inside the mode, with when it is freed.

    Storages of ``existing`` tensors (weights, inputs) are never counted. Each allocation gets an id,
    so a set of allocations (weight gradients) can be left out of :meth:`peak` afterwards."""

    def __init__(self, existing: Iterable[Tensor] = ()):
        super().__init__()
        self._existing = {t.untyped_storage()._cdata for t in existing}
        self._live: dict[int, tuple[int, int]] = {}  # storage key -> (allocation id, bytes)
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes at creation / -bytes when freed)
        self._next = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._see(t)
        return out

    def _see(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._existing or key in self._live:
            return
        uid, size = self._next, storage.nbytes()
        self._next += 1
        self._live[key] = (uid, size)
        self.events.append((uid, size))
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        uid, size = self._live.pop(key)
        self.events.append((uid, -size))

    def allocation(self, t: Tensor) -> int | None:
        found = self._live.get(t.untyped_storage()._cdata)
        return None if found is None else found[0]

    def now(self) -> int:
        return sum(size for _, size in self._live.values())

    def peak(self, leave_out: set[int] = frozenset()) -> int:
        current = best = 0
        for uid, size in self.events:
            if uid not in leave_out:
                current += size
                best = max(best, current)
        return best


@dataclass(frozen=True)
class Pass:
    """Bytes one pass holds beyond its weights and inputs: ``kept`` when its forward returns (what
    autograd keeps for the backward, and the output), ``peak`` at the worst moment of forward and
    backward."""

    kept: int
    peak: int


def run_pass(
    fn: Callable[[], Tensor], modules: Iterable[nn.Module], inputs: Iterable[Tensor], train: bool
) -> Pass:
    """Run ``fn`` (on meta tensors), and with ``train`` a backward from a mean-square loss of its
    output; weight gradients are not counted and are cleared afterwards."""
    modules = list(modules)
    existing = [*inputs, *(t for m in modules for t in (*m.parameters(), *m.buffers()))]
    # one thread: the backward (and the blocks recomputed in it) runs under this thread's modes
    with torch.autograd.set_multithreading_enabled(False), fused_attention(), Timeline(existing) as timeline:
        with torch.set_grad_enabled(train):
            out = fn()
        kept = timeline.now()
        if train:
            out.float().square().mean().backward()
        del out
        grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
        leave_out = {timeline.allocation(g) for g in grads} - {None}
        del grads
        for m in modules:
            m.zero_grad(set_to_none=True)
    return Pass(kept=kept, peak=timeline.peak(leave_out))


@dataclass(frozen=True)
class Linear:
    """Bytes as ``fixed + per_sample * batch``, from passes at batch 1 and 2."""

    fixed: float
    per_sample: float

    @classmethod
    def fit(cls, at_one: int, at_two: int) -> Linear:
        return cls(float(2 * at_one - at_two), float(at_two - at_one))

    def at(self, batch: int) -> float:
        return max(0.0, self.fixed + self.per_sample * batch)


def fit_pass(measure: Callable[[int], Pass]) -> tuple[Linear, Linear]:
    """(kept, peak) of a pass as linear functions of its batch."""
    one, two = measure(1), measure(2)
    return Linear.fit(one.kept, two.kept), Linear.fit(one.peak, two.peak)


# ---------------------------------------------------------------------------------------------- inputs


def conditioning_shapes(adapter: FamilyAdapter) -> dict[str, tuple[int, ...]]:
    """One sample's conditioning tensors (names and shapes), as the family's adapter states them."""
    return adapter.conditioning_shapes()


def meta_conditioning(shapes: dict[str, tuple[int, ...]], batch: int) -> Conditioning:
    return Conditioning({k: torch.empty(batch, *s, device=META) for k, s in shapes.items()})


def _levels(adapter: FamilyAdapter, batch: int) -> Tensor:
    return adapter.param.anchor_levels(adapter.anchors)[:1].expand(batch).to(META)


# ---------------------------------------------------------------------------------------------- passes


def network_pass(adapter: FamilyAdapter, net: nn.Module, resolution: int, batch: int, train: bool) -> Pass:
    """One call of a denoiser as the trainer makes it (``adapter.forward``), on meta tensors, with a
    guidance value when the network has a guidance input."""
    x = torch.empty(batch, *adapter.sample_shape(resolution), device=META)
    level = _levels(adapter, batch)
    cond = meta_conditioning(conditioning_shapes(adapter), batch)
    guided = bool(getattr(getattr(net, "config", None), "guidance_embeds", False))
    scale = torch.full((batch,), 3.5, device=META) if guided else None
    inputs = [x, level, *cond.tensors.values(), *([scale] if guided else [])]
    return run_pass(lambda: adapter.forward(net, x, level, cond, scale), [net], inputs, train)


def with_lora(net: nn.Module, rank: int, targets: Iterable[str]) -> nn.Module:
    """``net`` (meta) with one LoRA adapter on ``targets`` and only the adapter trainable: a role of
    LoRA mode as its passes see it."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, target_modules=list(targets)), net, adapter_name="generator")
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return net.train()


def decode_pass(vae: nn.Module, latent_shape: tuple[int, ...], batch: int, train: bool) -> Pass:
    """The VAE decoder on ``batch`` latents (float32, as the codec runs it); with ``train`` the
    gradient reaches the latents (the generator's path into a pixel-space discriminator)."""
    z = torch.empty(batch, *latent_shape, device=META, requires_grad=train)
    return run_pass(lambda: vae.decode(z, return_dict=False)[0], [vae], [z], train)


def discriminator_pass(
    disc: nn.Module,
    modules: list[nn.Module],
    sample_shape: tuple[int, ...],
    cond: Conditioning,
    groups: int,
    input_grad: bool,
    adapter: FamilyAdapter,
) -> Pass:
    """D on ``len(cond)`` samples in ``groups`` separate passes (real and fake on D's own turn); with
    ``input_grad`` the gradient reaches the samples (the generator's adversarial term). ``modules``:
    D and the networks it holds by reference (a frozen backbone, the fake score)."""
    batch = len(cond)
    x = torch.empty(batch, *sample_shape, device=META, requires_grad=input_grad)
    extra = [_levels(adapter, batch), torch.empty(batch, *sample_shape, device=META)] if disc.noised else []
    kwargs = {"groups": groups} if groups > 1 and getattr(disc, "separate_calls", False) else {}
    inputs = [x, *cond.tensors.values(), *extra]
    return run_pass(lambda: disc(x, cond, *extra, **kwargs), modules, inputs, True)


# ---------------------------------------------------------------------------------------------- one iteration


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one iteration at per-rank batch ``b``, from the passes measured on meta.

    * generator turn: G's forward and backward; or, while G's kept activations wait for its
      backward, the largest of the teacher's guided no-grad pass, D on the generated samples with
      the gradient to them, and the VAE decoder recomputed with gradients for one decode chunk
      (the codec checkpoints the whole decode, so its backward holds every decoder activation);
    * fake-score turn: its forward and backward (the generator's architecture);
    * discriminator turn: D on real and fake with its heads' gradients, or a no-grad decode chunk.

    ``copies`` (per call) adds what autocast keeps of float32 weights cast to bf16 in a trained pass.
    In LoRA mode the trained passes are those of the base with one adapter (:meth:`with_passes`).
    """

    g_kept: Linear
    g_peak: Linear
    teacher: Linear
    decode_grad: Linear | None = None
    decode: Linear | None = None
    d_generator: Linear | None = None
    d_turn: Linear | None = None
    chunk: int = 8
    pixel_d: bool = False
    image_bytes: int = 0  # one decoded RGB image in float32

    @classmethod
    def none(cls) -> Activations:
        zero = Linear(0.0, 0.0)
        return cls(zero, zero, zero)

    def with_passes(self, kept: Linear, peak: Linear) -> Activations:
        """The same iteration with other trained passes (LoRA mode's)."""
        return dataclasses.replace(self, g_kept=kept, g_peak=peak)

    def turns(self, b: int, copies: int = 0) -> dict[str, float]:
        chunk = min(b, self.chunk)
        side = [self.teacher.at(b)]
        if self.d_generator is not None:
            side.append(self.d_generator.at(b))
        if self.pixel_d and self.decode_grad is not None:
            side.append(self.decode_grad.at(chunk))
        d_turn = 0.0
        if self.d_turn is not None:  # with the two decoded batches it judges
            d_turn = self.d_turn.at(b) + (2 * b * self.image_bytes if self.pixel_d else 0)
        return {
            "generator_turn": max(self.g_peak.at(b), self.g_kept.at(b) + max(side)) + copies,
            "fake_turn": self.g_peak.at(b) + copies,
            "discriminator_turn": max(d_turn, self.decode.at(chunk) if self.decode is not None else 0.0),
        }

    def at(self, b: int, copies: int = 0) -> float:
        return max(self.turns(b, copies).values())


def measure_iteration(
    adapter: FamilyAdapter,
    gen: nn.Module,
    teacher: nn.Module,
    vae: nn.Module | None,
    resolution: int,
    chunk: int,
    disc: nn.Module | None = None,
    held: list[nn.Module] = (),
    disc_cond: Callable[[int], Conditioning] | None = None,
) -> Activations:
    """Measure the passes of one iteration (each at batch 1 and 2) on meta networks already in the
    compute dtype: ``gen`` trains (with the recipe's checkpointing), ``teacher`` guides without
    gradients, ``vae`` (float32) decodes, ``disc`` judges (``held``: the networks it holds by
    reference; ``disc_cond``: its condition for a batch)."""
    g_kept, g_peak = fit_pass(lambda b: network_pass(adapter, gen, resolution, b, train=True))
    embedding = adapter.guidance_kind == "embedding"
    teacher_peak = fit_pass(
        lambda b: network_pass(adapter, teacher, resolution, b if embedding else 2 * b, False)
    )[1]
    decode_grad = decode = d_gen = d_turn = None
    if vae is not None:
        shape = adapter.raw_latent_shape(resolution)
        decode_grad = fit_pass(lambda b: decode_pass(vae, shape, b, True))[1]
        decode = fit_pass(lambda b: decode_pass(vae, shape, b, False))[1]
    if disc is not None:
        shape = (
            (3, resolution, resolution) if disc.input_space == "pixels" else adapter.sample_shape(resolution)
        )
        modules = [disc, *held]
        d_gen = fit_pass(lambda b: discriminator_pass(disc, modules, shape, disc_cond(b), 1, True, adapter))[
            1
        ]
        d_turn = fit_pass(
            lambda b: discriminator_pass(disc, modules, shape, disc_cond(2 * b), 2, False, adapter)
        )[1]
    pixel_d = disc is not None and disc.input_space == "pixels"
    return Activations(
        g_kept,
        g_peak,
        teacher_peak,
        decode_grad,
        decode,
        d_gen,
        d_turn,
        chunk,
        pixel_d,
        3 * resolution**2 * 4,
    )
