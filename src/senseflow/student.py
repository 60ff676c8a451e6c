"""A distilled student loaded from a run or from an exported diffusers folder: its recipe, its adapter
and the generator's weights.

Sampling is the few-step, CFG-free chain of spec §7 (``renoise`` or ``euler``), one network call
per anchor, with per-sample seeds so an image depends only on its prompt and seed.

**Compute dtype.** The generator's weights are *cast* to the chosen dtype when it is built (as the
stock pipelines' ``torch_dtype`` does, modules a class keeps in float32 excepted), rather than kept
in float32 under autocast: half the weight memory, no per-call casts of the weights, and the same
arithmetic the stock pipeline runs, so the benchmark compares like with like. The adapter casts each
call's inputs to the network's dtype and returns float32, so the chain's renoising and Euler steps
stay in float32 whatever the dtype; the VAE always decodes in float32 (an fp16 SDXL VAE overflows).
``dtype=None`` keeps the dtype the run trained its generator in (``precision.param_dtype``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from senseflow.config import load_config
from senseflow.config.schema import DistillConfig
from senseflow.devices import resolve_device, to_dtype
from senseflow.models import build_adapter
from senseflow.models.adapter import FamilyAdapter
from senseflow.models.batch import Conditioning
from senseflow.models.build import build_generator, read_weights
from senseflow.models.sampling import student_images
from senseflow.train import checkpoint as ckpt

log = logging.getLogger(__name__)

# The layout an export adds to a stock diffusers pipeline folder (what `from_export` reads).
EXPORT_DIR = "senseflow"
EXPORT_META = "export.json"  # {"format": "diffusers", "network": "unet"|"transformer", "sampler_mode", ...}
EXPORT_RECIPE = "recipe.yaml"  # the run's resolved recipe; anchors in sigma / ddpm_t units, no LoRA
EXPORT_FORMAT = "diffusers"
SAMPLERS = ("renoise", "euler")
SAMPLE_BATCH_SIZE = 64  # Student.sample's default (the toy experiments' figures were made with it)

# Sampling stages, in the order a batch runs them, with the names the timing summary prints ("denoise"
# also holds the chain's noise draws and renoising, which cost little beside the network).
STAGES = {
    "text": "text encoding",
    "denoise": "network forwards",
    "decode": "VAE decode",
}

WeightSource = Mapping[str, Tensor] | Callable[[FamilyAdapter], Mapping[str, Tensor]]


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` is an exported diffusers folder (it holds ``senseflow/export.json``)."""
    return (Path(folder) / EXPORT_DIR / EXPORT_META).is_file()


def read_export_meta(folder: str | Path) -> dict[str, Any] | None:
    """An exported folder's ``senseflow/export.json`` (None when ``folder`` is not an export)."""
    path = Path(folder) / EXPORT_DIR / EXPORT_META
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_dtype(name: str | torch.dtype | None, device: torch.device, default: torch.dtype) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (what the large teachers are published in), float32 on the CPU (where
    half precision is slower on most processors); ``None``: ``default``; else fp32, bf16 or fp16."""
    if name is None:
        return default
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return to_dtype(name, "dtype")


class StageTimer:
    """Wall-clock seconds per sampling stage, summed over batches.

    A GPU runs asynchronously, so a stage waits for the device's queued work before it stops the
    clock: each stage is charged for its own kernels, and the waits cost no more than the copy of
    the images to the host would wait anyway.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def summary(self, images: int, total: float | None = None, labels: Mapping[str, str] = STAGES) -> str:
        """A table of each stage's seconds, seconds per image and share of ``total`` (default: the
        stages' sum); what ``total`` holds beyond the stages is shown as "other"."""
        rows = [(labels.get(name, name), s) for name, s in self.seconds.items()]
        measured = sum(s for _, s in rows)
        total = measured if total is None else total
        if total > measured:
            rows.append(("other", total - measured))
        n = max(images, 1)
        width = max(len(label) for label, _ in [*rows, ("total", 0.0)])
        lines = [f"{'stage':<{width}}  {'seconds':>9}  {'s/image':>9}  {'share':>6}"]
        for label, s in [*rows, ("total", total)]:
            share = s / total if total > 0 else 0.0
            lines.append(f"{label:<{width}}  {s:9.3f}  {s / n:9.4f}  {share:6.1%}")
        return "\n".join(lines)


class Student:
    def __init__(
        self,
        cfg: DistillConfig,
        generator_weights: WeightSource,
        checkpoint: Path | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        source: Path | None = None,
    ):
        """``device``: ``cpu``, ``cuda[:N]`` or ``auto``. ``dtype``: the compute dtype (``auto``, ``fp32``,
        ``bf16``, ``fp16``; None: the run's trained dtype; see the module's docstring).
        ``generator_weights``: the generator's state dict, or a function of the adapter that reads it
        (an export's weights sit in the folder the adapter reads)."""
        self.cfg = cfg
        self.checkpoint = checkpoint  # the checkpoint folder the weights came from, if any
        self.source = source or checkpoint  # the checkpoint or the exported folder
        self.device = resolve_device(device, field="device")
        self.adapter = build_adapter(cfg, text_cache=False).to(self.device)  # any prompt, live
        trained = to_dtype(cfg.precision.param_dtype, "precision.param_dtype")
        self.dtype = resolve_dtype(dtype, self.device, trained)
        if cfg.model.lora is not None:  # the teacher's weights with the generator's adapter
            from senseflow.train.lora_mode import build_lora_roles

            teacher_dtype = to_dtype(cfg.precision.teacher_dtype, "precision.teacher_dtype")
            base_dtype = teacher_dtype if dtype is None else self.dtype
            roles = build_lora_roles(
                self.adapter, cfg, base_dtype, self.dtype, self.device, adapters=("generator",)
            )
            generator = roles["generator"]
            generator.base.eval().requires_grad_(False)
        else:
            generator = build_generator(self.adapter, self.dtype, self.device).eval().requires_grad_(False)
        self.generator = generator
        weights = generator_weights(self.adapter) if callable(generator_weights) else generator_weights
        self.generator.load_state_dict(dict(weights), strict=True)  # copies, casting to the storage dtype
        self.anchor_levels = self.adapter.param.anchor_levels(self.adapter.anchors).to(self.device)
        self.default_sampler = "renoise"
        self.export_meta: dict[str, Any] | None = None  # an exported folder's export.json
        self.text_cache, self.text_source = self._open_text_cache()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> Student:
        """The newest checkpoint of ``run_dir`` (or ``checkpoint``) with the recipe saved inside it."""
        run_dir = Path(run_dir)
        path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run_dir / "checkpoints")
        if path is None or not (path / ckpt.META).is_file():
            raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'} (train first)")
        cfg = load_config(path / ckpt.CONFIG)
        return cls(cfg, ckpt.read_network(path, "generator"), checkpoint=path, device=device, dtype=dtype)

    @classmethod
    def from_export(
        cls, folder: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = None
    ) -> Student:
        """A student exported as a stock diffusers pipeline folder.

        The folder needs ``senseflow/export.json`` (``format: diffusers`` and the ``network``
        subfolder, ``unet`` or ``transformer``), ``senseflow/recipe.yaml`` (the run's resolved recipe
        with explicit anchors and no LoRA) and the teacher's folder layout: ``model_index.json``, the
        network's config and ``diffusion_pytorch_model*.safetensors`` (one file or shards with their
        index), the VAE, the scheduler (its config states the noise schedule the adapter reads: betas
        and prediction type, or the flow shift) and, for live prompts, the text encoders and
        tokenizers. The recipe is read with ``model.teacher`` pointing at the folder itself (and no
        hub revision or weight variant: the export is a local folder of plain weight files).
        """
        folder = Path(folder)
        meta_path = folder / EXPORT_DIR / EXPORT_META
        meta = read_export_meta(folder)
        if meta is None:
            raise FileNotFoundError(f"{folder}: not an exported folder ({EXPORT_DIR}/{EXPORT_META} missing)")
        if meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
        overrides = [f"model.teacher={folder}", "model.revision=null", "model.variant=null"]
        cfg = load_config(folder / EXPORT_DIR / EXPORT_RECIPE, overrides)
        if cfg.model.lora is not None:
            raise ValueError(
                f"{folder / EXPORT_DIR / EXPORT_RECIPE}: model.lora is set, but an export holds the merged "
                "generator; the export must write model.lora: null"
            )

        def weights(adapter: FamilyAdapter) -> dict[str, Tensor]:
            files = adapter.weight_files()
            if files[0].parent.name != meta.get("network"):
                raise ValueError(
                    f"{meta_path}: network {meta.get('network')!r}, but the recipe's family "
                    f"({cfg.model.family}) keeps its network in {files[0].parent.name!r}"
                )
            return read_weights(files)

        student = cls(cfg, weights, device=device, dtype=dtype, source=folder)
        modes = [meta.get(key) for key in ("sampler_mode", "sampler")]
        student.default_sampler = next((m for m in modes if m in SAMPLERS), student.default_sampler)
        student.export_meta = meta
        return student

    def _open_text_cache(self) -> tuple[Any, str]:
        """The run's offline text cache when it has one that these text encoders wrote; prompts it
        holds are then read instead of encoded. Any other case encodes live (``text_source`` says why)."""
        folder = self.cfg.model.text_cache
        if folder == "live":
            return None, "live"
        from senseflow.models.text_cache import TextCache, TextCacheError

        try:
            cache = TextCache.open(folder, self.adapter).to(self.device)
        except (FileNotFoundError, TextCacheError) as exc:
            reason = str(exc).splitlines()[0]
            log.info("text cache %s not used: %s", folder, reason)
            return None, f"live (the recipe's text cache is unusable: {reason})"
        return cache, f"text cache {cache.folder} (live for prompts it lacks)"

    # ------------------------------------------------------------------ speed switches

    @property
    def vae(self) -> nn.Module | None:
        """The family's diffusers autoencoder (loaded on first use), or None for a family without one
        (the toy family samples in pixel space)."""
        vae = getattr(self.adapter, "vae", None)
        return vae if isinstance(vae, nn.Module) else None

    @property
    def decode_batch_size(self) -> int:
        """Images the VAE decodes at once (the recipe's ``model.decode_chunk`` until set)."""
        return self.adapter.decode_chunk

    @decode_batch_size.setter
    def decode_batch_size(self, n: int) -> None:
        self.adapter.decode_chunk = int(n)

    def compile(self) -> None:
        """``torch.compile`` the generator in place: the first batch of each shape compiles (minutes on
        a CPU), later ones run the compiled graph. Results match eager mode to float rounding only."""
        self.generator.compile()

    # ------------------------------------------------------------------ sampling

    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The prompts' encodings: from the text cache when it holds all of them, else live."""
        if self.text_cache is not None and not self.text_cache.missing(prompts):
            return self.text_cache.lookup(prompts)
        return self.adapter.encode_prompts(prompts)

    @torch.no_grad()
    def batches(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        mode: str | None = None,
        batch_size: int = SAMPLE_BATCH_SIZE,
        timer: StageTimer | None = None,
        progress: bool = False,
    ) -> Iterator[tuple[int, Tensor]]:
        """``(start, images)`` per batch of ``batch_size`` prompts: decoded images in [-1, 1] (NCHW, on
        the CPU) of ``prompts[start : start + len(images)]``. ``mode``: 'renoise' or 'euler' (None:
        the export's sampler, else renoise). ``timer`` collects the stages' times."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        mode = mode or self.default_sampler
        stage = timer.stage if timer is not None else None
        bar = tqdm(total=len(prompts), desc="generate", unit="img", disable=not progress)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            with stage("text") if stage else nullcontext():
                cond = self.conditioning(chunk)
            images = student_images(
                self.adapter,
                self.generator,
                self.anchor_levels,
                self.cfg.data.resolution,
                chunk,
                seeds[start : start + batch_size],
                mode,
                cond=cond,
                stage=stage,
            )
            bar.update(len(chunk))
            yield start, images.cpu()
        bar.close()

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        mode: str | None = None,
        batch_size: int = SAMPLE_BATCH_SIZE,
        timer: StageTimer | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Decoded images in [-1, 1] (NCHW, on the CPU); ``mode`` is 'renoise' or 'euler'. In float32
        an image depends on its batch only through float rounding (a few 1e-6 on the tiny test
        models: kernels pick their blocking by batch size)."""
        out = [images for _, images in self.batches(prompts, seeds, mode, batch_size, timer, progress)]
        return torch.cat(out)
