"""Shared pieces of the image–text scorers (CLIP score, HPSv2, PickScore, ImageReward).

Everything here re-implements documented behaviour (evaluation spec §3, §5–§8, §10) on top of
``torch``, ``PIL``, ``numpy`` and ``transformers``; nothing imports torchvision, timm or open_clip.

* **Images** – :func:`as_rgb_images` accepts PIL images or uint8 HWC/NHWC arrays. The resize and
  centre-crop helpers reproduce torchvision's semantics on PIL images (shorter side to ``size``, the
  longer one truncated; crop offsets rounded half-to-even) or transformers' (crop offsets floored),
  selected explicitly by the caller. :func:`tensor_resize_shorter` is torchvision's tensor resize
  (``interpolate(..., align_corners=False, antialias=<flag>)``, no clamping on float tensors).
* **Tokenisers** – :func:`bytes_to_unicode` and :func:`build_clip_bpe_files` turn OpenAI CLIP's
  ``bpe_simple_vocab_16e6.txt.gz`` into the ``vocab.json``/``merges.txt`` pair that
  :class:`transformers.CLIPTokenizer` reads; :func:`clip_token_ids` tokenises with the open_clip /
  OpenAI ``tokenize`` rules (context 77, truncation that keeps EOT last, zero padding).
* **Weights** – :func:`load_state_dict_file` reads ``.safetensors`` or torch checkpoints (plain or
  ``{'state_dict': ...}``) with ``weights_only=True`` unless told otherwise;
  :func:`open_clip_to_clip_state_dict` converts an open_clip CLIP state dict into a
  :class:`transformers.CLIPModel` config and state dict; :func:`load_clip_model` loads a
  ``from_pretrained`` folder, a transformers-named state-dict file or an open_clip state-dict file,
  and raises :class:`MissingWeightsError` naming every missing key.
* **Scorer base** – :class:`PairScorer` batches, validates inputs, runs under ``inference_mode`` and
  builds the result-record entry (``value`` plus the protocol fields of spec §12).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import math
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

PathType = str | PathLike

# OpenAI CLIP normalisation constants (spec §3).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_CONTEXT_LENGTH = 77
CLIP_SOT_TOKEN = "<|startoftext|>"
CLIP_EOT_TOKEN = "<|endoftext|>"

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

ImagesInput = Sequence[Image.Image] | Sequence[np.ndarray] | np.ndarray


# --------------------------------------------------------------------------------------------------
# errors and load reports
# --------------------------------------------------------------------------------------------------


class ScorerLoadError(RuntimeError):
    """A scorer's weights, config or tokenizer could not be loaded."""


class MissingWeightsError(ScorerLoadError):
    """A checkpoint lacks parameters the model needs; the message lists every missing key."""

    def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str] = ()) -> None:
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        lines = [f"{source}: {len(self.missing)} missing key(s): {', '.join(self.missing)}"]
        if self.unexpected:
            lines.append(f"unexpected key(s) also present: {', '.join(self.unexpected)}")
        super().__init__("\n".join(lines))


@dataclass
class LoadReport:
    """What happened when a checkpoint was mapped onto a model (source-side key names)."""

    source: str
    source_format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def check(self) -> LoadReport:
        """Log unexpected keys; raise on missing or shape-mismatched ones."""
        if self.unexpected:
            logger.warning(
                "%s: %d unexpected key(s) not used by the model: %s",
                self.source,
                len(self.unexpected),
                ", ".join(self.unexpected),
            )
        if self.ignored:
            logger.info("%s: ignored non-parameter key(s): %s", self.source, ", ".join(self.ignored))
        if self.mismatched:
            raise ScorerLoadError(f"{self.source}: shape mismatch for key(s): {', '.join(self.mismatched)}")
        if self.missing:
            raise MissingWeightsError(self.source, self.missing, self.unexpected)
        return self


# --------------------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------------------


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sha256_file(path: PathType, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# What transformers' from_pretrained reads from a folder, in its order of preference.
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _folder_weight_files(path: Path) -> list[Path]:
    for name in _HF_WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    for name in _HF_WEIGHT_INDEXES:
        if (path / name).is_file():
            shards = set(json.loads((path / name).read_text())["weight_map"].values())
            return sorted(path / shard for shard in shards)
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_FILE_SUFFIXES)


def sha256_weights(path: PathType) -> str:
    """sha256 of a weights file, or of the weights a ``from_pretrained`` folder loads.

    In a folder: ``model.safetensors``, else ``pytorch_model.bin``, else the shards of an index,
    else every weights file. One file gets its own hash (so it matches a manifest entry for the
    file); several get the sha256 of the sorted ``"<relative name>  <sha256>\\n"`` lines.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    files = _folder_weight_files(path)
    if not files:
        raise ScorerLoadError(f"no weights file ({', '.join(WEIGHT_FILE_SUFFIXES)}) under {path}")
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{p.relative_to(path).as_posix()}  {sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def embedding_from_output(output: Any) -> torch.Tensor:
    """The projected embedding from ``get_text_features``/``get_image_features``.

    transformers 4.x returns a tensor; 5.x returns ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` holds the projected embedding (and a tuple ``(last_hidden_state,
    pooler_output, ...)`` when ``return_dict=False``).
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(output, tuple) and len(output) >= 2 and isinstance(output[1], torch.Tensor):
        return output[1]
    raise TypeError(f"cannot find an embedding in a {type(output).__name__}")


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def as_rgb_images(images: ImagesInput) -> list[Image.Image]:
    """PIL images or uint8 arrays (one NHWC array, or a list of HWC/HW arrays) → RGB PIL images."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"an image array must be NHWC, got shape {images.shape}")
        images = list(images)
    out = []
    for i, image in enumerate(images):
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise TypeError(f"image {i}: arrays must be uint8, got {image.dtype}")
            if image.ndim == 3 and image.shape[-1] == 1:
                image = image[..., 0]
            if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
                raise ValueError(f"image {i}: expected HW, HWC with C in (1, 3, 4), got {image.shape}")
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"image {i}: expected a PIL image or a uint8 array, got {type(image).__name__}")
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


def resized_shorter_side(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``size``; the longer side is truncated.

    Same rule in torchvision's ``Resize(int)`` and transformers' ``shortest_edge`` resize.
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_offsets(
    height: int, width: int, crop_height: int, crop_width: int, rounding: str = "round"
) -> tuple[int, int]:
    """(top, left) of a centred crop.

    ``rounding="round"``: torchvision, ``int(round((H - h) / 2))`` with Python's half-to-even round.
    ``rounding="floor"``: transformers' image processors, ``(H - h) // 2``.
    """
    if crop_height > height or crop_width > width:
        raise ValueError(f"crop {crop_height}x{crop_width} larger than the image {height}x{width}")
    if rounding == "round":
        return round((height - crop_height) / 2.0), round((width - crop_width) / 2.0)
    if rounding == "floor":
        return (height - crop_height) // 2, (width - crop_width) // 2
    raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")


def pil_center_crop(
    image: Image.Image, crop_height: int, crop_width: int, rounding: str = "round"
) -> Image.Image:
    top, left = center_crop_offsets(image.height, image.width, crop_height, crop_width, rounding)
    return image.crop((left, top, left + crop_width, top + crop_height))


def pil_resize_shorter(
    image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC
) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: ``image.resize((w, h), resample)``."""
    height, width = resized_shorter_side(image.height, image.width, size)
    return image.resize((width, height), resample)


def to_float_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision ``ToTensor`` on an RGB uint8 image: CHW float32 in [0, 1]."""
    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div(255)


def normalise_chw(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean_t) / std_t


def pil_clip_transform(
    image: Image.Image,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    resample: int = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """OpenAI CLIP / open_clip validation transform on PIL (torchvision semantics).

    Resize(size, bicubic) → CenterCrop(size) (offsets rounded) → RGB → ToTensor → Normalize.
    """
    image = pil_center_crop(pil_resize_shorter(image, size, resample), size, size, "round")
    return normalise_chw(to_float_tensor(image.convert("RGB")), mean, std)


def tensor_resize_shorter(x: torch.Tensor, size: int, antialias: bool, mode: str = "bicubic") -> torch.Tensor:
    """torchvision ``Resize(size)`` on a float CHW/NCHW tensor (no clamping for float tensors)."""
    squeeze = x.ndim == 3
    if squeeze:
        x = x.unsqueeze(0)
    height, width = resized_shorter_side(x.shape[-2], x.shape[-1], size)
    align = False if mode in ("bilinear", "bicubic") else None
    out = F.interpolate(x, size=(height, width), mode=mode, align_corners=align, antialias=antialias)
    return out[0] if squeeze else out


def tensor_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = center_crop_offsets(x.shape[-2], x.shape[-1], size, size, "round")
    return x[..., top : top + size, left : left + size]


# --------------------------------------------------------------------------------------------------
# CLIP BPE tokenizer files and tokenisation
# --------------------------------------------------------------------------------------------------


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte → printable-character table of GPT-2/CLIP byte-level BPE.

    Bytes that are printable, non-space Latin-1 characters map to themselves, in three ranges
    ("!".."~", "¡".."¬", "®".."ÿ"); the remaining 68 bytes map, in increasing byte order, to
    U+0100, U+0101, ... The dict is ordered as the vocabulary orders it: the three ranges first,
    then the remapped bytes.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    next_code = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_code)
            next_code += 1
    return table


def build_clip_bpe_files(bpe_gz: PathType, out_dir: PathType) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for :class:`transformers.CLIPTokenizer`.

    Input: OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (shipped e.g. inside the open-clip-torch
    wheel). Lines 1..48894 of the decompressed text are the merges (line 0 is a header); the
    vocabulary is the 256 byte symbols, the same with ``</w>``, each merge's concatenation, then
    ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 entries, ids = positions.
    """
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    vocab_list += [CLIP_SOT_TOKEN, CLIP_EOT_TOKEN]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab_list)}, ensure_ascii=False), "utf-8"
    )
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    return vocab_path, merges_path


def load_clip_tokenizer(source: Any, *, fallback_dir: PathType | None = None) -> Any:
    """A CLIP BPE tokenizer from a tokenizer object, a tokenizer folder or a ``bpe_simple_vocab`` gz.

    ``source=None`` uses ``fallback_dir`` (e.g. a ``from_pretrained`` model folder that carries its
    tokenizer files). Folders load with ``local_files_only=True``.
    """
    from transformers import AutoTokenizer, CLIPTokenizer

    if source is None:
        if fallback_dir is None or not _has_tokenizer_files(Path(fallback_dir)):
            raise ScorerLoadError(
                "no CLIP tokenizer: pass tokenizer=<folder with vocab.json+merges.txt or tokenizer.json>, "
                "a bpe_simple_vocab_16e6.txt.gz file, or a tokenizer object"
            )
        source = fallback_dir
    if not isinstance(source, (str, PathLike)):
        return source
    path = Path(source)
    if path.is_dir():
        if not _has_tokenizer_files(path):
            raise ScorerLoadError(f"{path}: no tokenizer files (vocab.json+merges.txt or tokenizer.json)")
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=CLIP_CONTEXT_LENGTH)
    if path.is_file() and path.name.endswith(".gz"):
        with tempfile.TemporaryDirectory() as tmp:
            vocab, merges = build_clip_bpe_files(path, tmp)
            return CLIPTokenizer(str(vocab), str(merges), model_max_length=CLIP_CONTEXT_LENGTH)
    raise ScorerLoadError(f"{path}: not a tokenizer folder or a .gz BPE vocabulary")


def _has_tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )


def clip_token_ids(
    tokenizer: Any, prompts: Sequence[str], context_length: int = CLIP_CONTEXT_LENGTH
) -> torch.Tensor:
    """Token ids as OpenAI/open_clip ``tokenize`` makes them: ``[B, context_length]`` int64.

    ``[SOT] + BPE(prompt) + [EOT]``; a longer sequence is cut to ``context_length`` and its last
    token set to EOT; shorter ones are padded with 0.
    """
    eot = tokenizer.eos_token_id
    if eot is None:
        raise ValueError("the CLIP tokenizer has no eos_token_id")
    encoded = tokenizer(list(prompts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    out = torch.zeros(len(encoded), context_length, dtype=torch.long)
    for row, ids in enumerate(encoded):
        ids = list(ids)
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------


def load_state_dict_file(path: PathType, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from ``.safetensors`` or a torch checkpoint.

    Torch checkpoints may be plain state dicts or ``{'state_dict': {...}}`` (other top-level entries
    are dropped). A common ``module.`` prefix (DDP) is stripped. ``torch.load`` runs with
    ``weights_only=True`` unless ``allow_pickle=True`` (only for files from a trusted source).
    """
    path = Path(path)
    if not path.is_file():
        raise ScorerLoadError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as err:
            if allow_pickle:
                raise
            raise ScorerLoadError(
                f"{path}: torch.load(weights_only=True) refused the file ({err}); if it comes from a "
                "trusted source, load it with allow_pickle=True"
            ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ScorerLoadError(f"{path}: expected a state dict, got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    dropped = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if dropped:
        logger.info("%s: dropped non-tensor entries: %s", path, ", ".join(dropped))
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KeyRule:
    """``target[dst] = transform(source[src])``."""

    src: str
    dst: str
    transform: Transform | None = None


def apply_key_rules(
    state: Mapping[str, torch.Tensor],
    rules: Iterable[KeyRule],
    *,
    source: str,
    source_format: str,
    ignorable: Callable[[str], bool] = lambda key: False,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename/transform a source state dict; report missing source keys (source-side names)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for rule in rules:
        if rule.src not in state:
            if rule.src not in missing:
                missing.append(rule.src)
            continue
        used.add(rule.src)
        tensor = state[rule.src]
        out[rule.dst] = rule.transform(tensor) if rule.transform else tensor
    leftover = [k for k in state if k not in used]
    report = LoadReport(
        source=source,
        source_format=source_format,
        missing=missing,
        unexpected=[k for k in leftover if not ignorable(k)],
        ignored=[k for k in leftover if ignorable(k)],
    )
    return out, report


def load_converted(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], report: LoadReport
) -> LoadReport:
    """Load an already-renamed state dict; fail on missing/mismatched keys (in report terms)."""
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            report.mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(expected[key].shape)}")
    if not report.mismatched and not report.missing:
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys:  # a conversion rule set that does not cover the model: a bug
            report.missing.extend(f"<target> {k}" for k in result.missing_keys)
    return report.check()


# --------------------------------------------------------------------------------------------------
# CLIP models (transformers CLIPModel) from folders, HF-named files or open_clip files
# --------------------------------------------------------------------------------------------------

# Head counts and activation of open_clip architectures (not recoverable from tensor shapes).
OPEN_CLIP_ARCHS: dict[str, dict[str, Any]] = {
    "ViT-H-14": {"vision_heads": 16, "text_heads": 16, "hidden_act": "gelu"},
    "ViT-g-14": {"vision_heads": 16, "text_heads": 16, "hidden_act": "gelu"},
    "ViT-bigG-14": {"vision_heads": 16, "text_heads": 20, "hidden_act": "gelu"},
    "ViT-L-14": {"vision_heads": 16, "text_heads": 12, "hidden_act": "gelu"},
    "ViT-L-14-quickgelu": {"vision_heads": 16, "text_heads": 12, "hidden_act": "quick_gelu"},
    "ViT-B-32": {"vision_heads": 12, "text_heads": 8, "hidden_act": "gelu"},
    "ViT-B-32-quickgelu": {"vision_heads": 12, "text_heads": 8, "hidden_act": "quick_gelu"},
    "ViT-B-16": {"vision_heads": 12, "text_heads": 8, "hidden_act": "gelu"},
}

_OPEN_CLIP_BLOCK = (
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
)
# Buffers some open_clip / OpenAI exports carry; not parameters.
_OPEN_CLIP_IGNORABLE = re.compile(r"^(attn_mask|input_resolution|context_length|vocab_size|.*position_ids)$")


def is_open_clip_state_dict(state: Mapping[str, torch.Tensor]) -> bool:
    return "visual.conv1.weight" in state or "visual.class_embedding" in state


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _chunk(t: torch.Tensor, index: int) -> torch.Tensor:
    return t.chunk(3, dim=0)[index].contiguous()


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _block_rules(src_prefix: str, dst_prefix: str) -> list[KeyRule]:
    rules = [KeyRule(f"{src_prefix}.{s}", f"{dst_prefix}.{d}") for s, d in _OPEN_CLIP_BLOCK]
    for index, name in enumerate("qkv"):
        chunk = functools.partial(_chunk, index=index)
        rules.append(
            KeyRule(f"{src_prefix}.attn.in_proj_weight", f"{dst_prefix}.self_attn.{name}_proj.weight", chunk)
        )
        rules.append(
            KeyRule(f"{src_prefix}.attn.in_proj_bias", f"{dst_prefix}.self_attn.{name}_proj.bias", chunk)
        )
    return rules


def open_clip_to_clip_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    arch: str | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str | None = None,
    source: str = "open_clip state dict",
    bos_token_id: int = 49406,
    eos_token_id: int = 49407,
) -> tuple[Any, dict[str, torch.Tensor], LoadReport]:
    """Convert an open_clip CLIP state dict to a :class:`transformers.CLIPConfig` + state dict.

    Sizes come from tensor shapes; head counts and the activation from ``arch`` (a key of
    :data:`OPEN_CLIP_ARCHS`) or the explicit arguments. The mapping: token/positional embeddings,
    resblocks (``in_proj`` split into q/k/v in that order), ``ln_final``, ``text_projection``
    (transposed, used as ``x @ P`` in open_clip), ``visual.conv1`` (no bias), ``class_embedding``,
    ``positional_embedding``, ``ln_pre``/``ln_post``, ``visual.proj`` (transposed), ``logit_scale``.
    The report's missing/unexpected keys use open_clip names.
    """
    from transformers import CLIPConfig

    preset = dict(OPEN_CLIP_ARCHS.get(arch, {})) if arch else {}
    if arch and not preset and None in (vision_heads, text_heads):
        raise ScorerLoadError(f"unknown open_clip architecture {arch!r}; known: {sorted(OPEN_CLIP_ARCHS)}")
    vision_heads = vision_heads or preset.get("vision_heads")
    text_heads = text_heads or preset.get("text_heads")
    hidden_act = hidden_act or preset.get("hidden_act", "gelu")
    if not vision_heads or not text_heads:
        raise ScorerLoadError("open_clip conversion needs arch=<name> or vision_heads= and text_heads=")
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight")
    required += ("positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight")
    required += ("transformer.resblocks.0.mlp.c_fc.weight",)
    absent = [k for k in required if k not in state]
    if absent:
        raise MissingWeightsError(source, absent)

    conv = state["visual.conv1.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    vocab_size, text_width = state["token_embedding.weight"].shape
    context = state["positional_embedding"].shape[0]
    embed_dim = state["text_projection"].shape[1]
    vision_layers = _count_blocks(state, "visual.transformer.resblocks.")
    text_layers = _count_blocks(state, "transformer.resblocks.")
    config = CLIPConfig(
        text_config={
            "vocab_size": int(vocab_size),
            "hidden_size": int(text_width),
            "intermediate_size": int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_hidden_layers": text_layers,
            "num_attention_heads": int(text_heads),
            "max_position_embeddings": int(context),
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
            "projection_dim": int(embed_dim),
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": int(vision_width),
            "intermediate_size": int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_hidden_layers": vision_layers,
            "num_attention_heads": int(vision_heads),
            "image_size": int(grid * patch),
            "patch_size": int(patch),
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
            "projection_dim": int(embed_dim),
        },
        projection_dim=int(embed_dim),
    )
    rules = [
        KeyRule("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        KeyRule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        KeyRule("ln_final.weight", "text_model.final_layer_norm.weight"),
        KeyRule("ln_final.bias", "text_model.final_layer_norm.bias"),
        KeyRule("text_projection", "text_projection.weight", _transpose),
        KeyRule("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        KeyRule("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        KeyRule("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        KeyRule("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
        KeyRule("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
        KeyRule("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
        KeyRule("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
        KeyRule("visual.proj", "visual_projection.weight", _transpose),
        KeyRule("logit_scale", "logit_scale"),
    ]
    for i in range(text_layers):
        rules += _block_rules(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    for i in range(vision_layers):
        rules += _block_rules(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    converted, report = apply_key_rules(
        state,
        rules,
        source=source,
        source_format="open_clip",
        ignorable=lambda k: bool(_OPEN_CLIP_IGNORABLE.match(k)),
    )
    return config, converted, report


@dataclass
class LoadedClip:
    model: Any  # transformers.CLIPModel
    report: LoadReport
    source_format: str  # "from_pretrained" | "transformers_state_dict" | "open_clip"
    path: Path


def load_clip_model(
    path: PathType,
    *,
    arch: str | None = None,
    config: Any = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str | None = None,
    bos_token_id: int = 49406,
    eos_token_id: int = 49407,
    allow_pickle: bool = False,
) -> LoadedClip:
    """A :class:`transformers.CLIPModel` (float32, eval mode, on CPU) from a local path.

    * a folder: ``CLIPModel.from_pretrained(folder, local_files_only=True)``;
    * a file with open_clip names (``visual.conv1.weight`` ...): converted with
      :func:`open_clip_to_clip_state_dict` (``arch`` or head counts required; the text model pools
      at the first ``eos_token_id``, the tokenizer's EOT, as open_clip's argmax does for CLIP BPE);
    * a file with transformers names: needs ``config`` (a ``CLIPConfig``, a dict or a
      ``config.json`` path) or a ``config.json`` beside the file.

    Missing or shape-mismatched keys raise :class:`ScorerLoadError`; unexpected keys are logged.
    """
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ScorerLoadError(f"{path}: not a from_pretrained folder (no config.json)")
        model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
        report = LoadReport(
            source=str(path),
            source_format="from_pretrained",
            missing=sorted(info.get("missing_keys", [])),
            unexpected=sorted(k for k in info.get("unexpected_keys", []) if not k.endswith("position_ids")),
            mismatched=[str(m) for m in info.get("mismatched_keys", [])],
        ).check()
        return LoadedClip(model.float().eval(), report, "from_pretrained", path)

    state = load_state_dict_file(path, allow_pickle=allow_pickle)
    if is_open_clip_state_dict(state):
        clip_config, converted, report = open_clip_to_clip_state_dict(
            state,
            arch=arch,
            vision_heads=vision_heads,
            text_heads=text_heads,
            hidden_act=hidden_act,
            source=str(path),
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
        model = CLIPModel(clip_config)
        load_converted(model, converted, report)
        return LoadedClip(model.float().eval(), report, "open_clip", path)

    if config is None and (path.parent / "config.json").is_file():
        config = path.parent / "config.json"
    if config is None:
        raise ScorerLoadError(
            f"{path}: a transformers-named state dict needs config= (CLIPConfig or config.json)"
        )
    if isinstance(config, (str, PathLike)):
        config = json.loads(Path(config).read_text())
    if isinstance(config, Mapping):
        config = CLIPConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    model = CLIPModel(config)
    expected = model.state_dict()
    report = LoadReport(source=str(path), source_format="transformers_state_dict")
    report.unexpected = sorted(k for k in state if k not in expected and not k.endswith("position_ids"))
    report.missing = sorted(k for k in expected if k not in state)
    usable = {k: v for k, v in state.items() if k in expected}
    load_converted(model, usable, report)
    return LoadedClip(model.float().eval(), report, "transformers_state_dict", path)


def check_text_pooling(model: Any, tokenizer: Any) -> None:
    """Refuse a text model that would pool at a token other than the tokenizer's EOT.

    transformers' CLIP text model pools at the first ``eos_token_id`` of its config, or at the
    highest token id when that is the legacy value 2 (open_clip's argmax rule).
    """
    eos = getattr(model.config.text_config, "eos_token_id", None)
    if eos not in (2, tokenizer.eos_token_id):
        raise ValueError(
            f"the text model pools at token id {eos} but the tokenizer's EOT is {tokenizer.eos_token_id}: "
            "model and tokenizer do not belong together"
        )


def clip_image_embeds(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    return embedding_from_output(model.get_image_features(pixel_values=pixel_values))


def clip_text_embeds(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    return embedding_from_output(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


# --------------------------------------------------------------------------------------------------
# scorer base
# --------------------------------------------------------------------------------------------------


class PairScorer:
    """Scores (image, prompt) pairs; subclasses implement :meth:`_score_batch` and :meth:`protocol`."""

    metric = "pair_score"
    default_batch_size = 16

    def __init__(
        self,
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype,
        weights_path: PathType | None,
        weights_sha256: str | None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self._weights_sha256 = weights_sha256

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the weights (given at load time, or computed once on first access)."""
        if self._weights_sha256 is None and self.weights_path is not None:
            self._weights_sha256 = sha256_weights(self.weights_path)
            logger.info("%s weights %s sha256 %s", self.metric, self.weights_path, self._weights_sha256)
        return self._weights_sha256

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def protocol(self) -> dict[str, Any]:
        raise NotImplementedError

    def score(self, images: ImagesInput, prompts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """One score per (image, prompt) pair, as a float64 array of length ``len(images)``."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, one per image")
        pil_images = as_rgb_images(images)
        prompts = [str(p) for p in prompts]
        if len(pil_images) != len(prompts):
            raise ValueError(f"{len(pil_images)} images but {len(prompts)} prompts")
        batch_size = batch_size or self.default_batch_size
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                stop = start + batch_size
                values = self._score_batch(pil_images[start:stop], prompts[start:stop])
                chunks.append(values.detach().to(torch.float64).cpu().numpy().reshape(-1))
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float64)

    def result(self, scores: Sequence[float] | np.ndarray) -> dict[str, Any]:
        """The result-record entry (spec §12): ``value`` (mean score) plus the protocol fields."""
        scores = np.asarray(scores, dtype=np.float64)
        value = float(scores.mean()) if scores.size else None
        return {"value": value, "n": int(scores.size), **self.protocol()}
