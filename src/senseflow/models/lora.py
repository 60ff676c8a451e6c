"""LoRA mode: one frozen base network, the generator and the fake score as two adapters on it.

In full fine-tuning the teacher, the generator and the fake score are three whole networks. In LoRA
mode the teacher's weights are held once, in a *base* network whose own tensors never change; the
generator and the fake score are two peft LoRA adapters on that base (``"generator"`` and
``"fake_score"``), and the teacher is the base with every adapter disabled. Both adapters start
identical with a zero product (``B = 0``), so both roles start equal to the teacher, as the two
copies of full fine-tuning do.

* :class:`LoraSettings`: rank, alpha, target modules (the attention projections of diffusers' UNet,
  SD3 and FLUX blocks), initialisation, dropout, seed.
* :func:`attach_lora`: inject the adapters, freeze the base, make both adapters trainable.
* :class:`LoraRole`: a view of the base as one role; its forward activates its adapter (or none,
  for the teacher) for the duration of the call, and its ``parameters()`` are that adapter's own,
  so an optimiser built from a view trains only that adapter.
* :func:`use_adapter`: the same switch as a context manager.
* ``models/lora_checkpoint.py``: gradient checkpointing that recomputes each block with the adapter
  that was active when the block ran forward (see below).
* :func:`adapter_state_dict` / :func:`load_adapter_state_dict`: one adapter's tensors only, in the
  key layout of peft's ``get_peft_model_state_dict`` (safetensors-compatible).
* :func:`base_fingerprint`: a hash of every non-LoRA tensor, to check that the base stays
  bit-identical.

**Switching and ``requires_grad``.** peft's ``set_adapter`` / ``enable_adapters`` also set
``requires_grad`` (the active adapter trainable, the others frozen). Here switching never changes
``requires_grad``: both adapters stay trainable whichever role ran last, which matters for
gradient checkpointing too (a recompute only records gradients for tensors that require them).

**Gradient checkpointing.** With checkpointing, the backward pass re-runs each block's forward. If
another role's adapter is active at backward time (the fake score ran between the generator's
forward and its backward), a plain recompute uses the wrong adapter and the gradients are wrong
without any error. :func:`lora_checkpoint` wraps ``torch.utils.checkpoint.checkpoint`` with a
``context_fn`` whose recompute context re-activates, on the block's LoRA layers, the adapter state
captured at forward time, then restores the state of backward time.

The base, called directly, runs with whatever state was last set; after :func:`attach_lora` that is
"adapters disabled" (the teacher). Views hold the base by reference (it is not their child module),
so ``.to()``, ``.train()`` and ``.eval()`` are applied to the base itself, once, for all roles.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from senseflow.config.schema import LORA_TARGET_MODULES

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LORA_INITS",
    "LoraInit",
    "LoraRole",
    "LoraSettings",
    "adapter_names",
    "adapter_state_dict",
    "attach_lora",
    "base_fingerprint",
    "load_adapter_state_dict",
    "lora_layers",
    "matching_modules",
    "use_adapter",
]

# The attention projections of diffusers' blocks: self/cross attention of the UNet's transformer
# blocks and of SD3 / FLUX (to_q, to_k, to_v, to_out.0), plus the context stream's projections of the
# joint (MM-DiT) blocks where present (add_*_proj, to_add_out). Matched as peft matches names: a module
# whose full name equals an entry or ends with "." + entry.
DEFAULT_TARGET_MODULES: tuple[str, ...] = tuple(LORA_TARGET_MODULES)  # the recipe field's default

LoraInit = Literal["default", "gaussian", "orthogonal"]
# The peft ``init_lora_weights`` values that leave the base untouched and make B·A zero at the start:
# "default" (peft's True: A Kaiming-uniform as nn.Linear, B zero), "gaussian" (A ~ N(0, 1/r²), B
# zero), "orthogonal" (A and B both non-zero, with orthogonal factors so that B·A = 0; even rank).
# peft's pissa / olora / corda / loftq / mica rewrite the base weights (impossible with a base that
# is also the teacher), eva / lora_ga need data, and False makes B·A non-zero.
LORA_INITS: dict[str, bool | str] = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}

State = tuple[tuple[str, ...], bool]  # one LoRA layer's (active adapters, adapters disabled)


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapters of LoRA mode (both roles use the same settings).

    ``rank`` r and ``alpha``: the delta of a target module is ΔW = (alpha / r)·B·A with A (r × in) and
    B (out × r). ``target_modules``: module names matched as peft matches them (a module's full name
    equals the entry or ends with "." + entry); entries that match nothing in a given network are
    allowed (SD3's last block has no ``to_add_out``), but at least one must match. ``init``: one of
    :data:`LORA_INITS`. ``dropout``: LoRA dropout on the adapter's input (0: none). ``seed``: the
    adapters' initialisation is drawn from this seed, without touching the global random state.
    """

    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    init: LoraInit = "default"
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, Sequence):
            raise ValueError(f"target_modules must be a list of module names, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be non-empty names, got {self.target_modules!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if self.init not in LORA_INITS:
            raise ValueError(f"init must be one of {sorted(LORA_INITS)}, got {self.init!r}")
        if self.init == "orthogonal" and self.rank % 2:
            raise ValueError(f"init 'orthogonal' needs an even rank, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        """alpha / r, the factor of B·A in ΔW."""
        return self.alpha / self.rank

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` of one adapter."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            init_lora_weights=LORA_INITS[self.init],
            lora_dropout=self.dropout,
            bias="none",
        )


# --------------------------------------------------------------------------------- finding layers


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The peft tuner layers (``BaseTunerLayer``) inside ``module``, in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(base: nn.Module) -> list[str]:
    """The names of the adapters attached to ``base`` (sorted)."""
    names: set[str] = set()
    for layer in lora_layers(base):
        names.update(layer._get_available_adapters())
    return sorted(names)


def _containers(layers: Sequence[nn.Module]) -> set[str]:
    """Attribute names under which tuner layers keep per-adapter tensors (``lora_A``, ``lora_B``, ...)."""
    out: set[str] = set()
    for layer in layers:
        out.update(layer.adapter_layer_names)
    return out


def _adapter_of(param_name: str, containers: set[str]) -> str | None:
    """The adapter a parameter belongs to (``...to_q.lora_A.generator.weight`` -> ``generator``), or None."""
    parts = param_name.split(".")
    for i in range(1, len(parts)):
        if parts[i - 1] in containers:
            return parts[i]
    return None


def _target_matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def matching_modules(base: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Names of the modules of ``base`` that ``target_modules`` selects (peft's name matching)."""
    return [name for name, _ in base.named_modules() if name and _target_matches(name, target_modules)]


def _adaptable_names(base: nn.Module, max_listed: int = 40) -> str:
    """Short names of the Linear / Conv modules of ``base``: what ``target_modules`` could name."""
    short: dict[str, None] = {}
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            parts = name.split(".")
            short[".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]] = None
    listed = sorted(short)
    more = f", ... (+{len(listed) - max_listed} more)" if len(listed) > max_listed else ""
    return ", ".join(listed[:max_listed]) + more


# ------------------------------------------------------------------------------- switching adapters


def _adapter_params(layer: nn.Module) -> list[Tensor]:
    params: list[Tensor] = []
    for container in layer.adapter_layer_names:
        held = getattr(layer, container, None)
        if isinstance(held, nn.Module):
            params.extend(held.parameters())
    return params


def _state(layer: nn.Module) -> State:
    return tuple(layer.active_adapters), bool(layer.disable_adapters)


def _set_state(layer: nn.Module, state: State) -> None:
    """Set one tuner layer's active adapters and on/off flag, leaving every ``requires_grad`` as it was."""
    if _state(layer) == state:
        return
    active, disabled = state
    flags = [(p, p.requires_grad) for p in _adapter_params(layer)]
    layer.set_adapter(list(active))
    if disabled:
        layer.enable_adapters(False)
    elif layer.disable_adapters:
        layer.enable_adapters(True)
    for p, flag in flags:
        p.requires_grad_(flag)


def _role_state(name: str | None, layer: nn.Module) -> State:
    return ((name,), False) if name is not None else (tuple(layer.active_adapters), True)


@contextlib.contextmanager
def _states_applied(layers: Sequence[nn.Module], states: Sequence[State]) -> Iterator[None]:
    before = [_state(layer) for layer in layers]
    try:
        for layer, state in zip(layers, states, strict=True):
            _set_state(layer, state)
        yield
    finally:
        for layer, state in zip(layers, before, strict=True):
            _set_state(layer, state)


def _check_name(base_names: Sequence[str], name: str | None) -> None:
    if name is not None and name not in base_names:
        raise ValueError(f"no LoRA adapter named {name!r}; attached: {', '.join(base_names) or 'none'}")


@contextlib.contextmanager
def use_adapter(base: nn.Module, name: str | None) -> Iterator[None]:
    """Within the block, ``base`` runs with adapter ``name`` alone (None: every adapter disabled, the
    teacher); the previous state is restored on exit. ``requires_grad`` is never changed."""
    layers = lora_layers(base)
    if not layers:
        raise ValueError(f"{type(base).__name__} has no LoRA layers; call attach_lora first")
    _check_name(adapter_names(base), name)
    with _states_applied(layers, [_role_state(name, layer) for layer in layers]):
        yield


class LoraRole(nn.Module):
    """One role of LoRA mode: ``base`` run with adapter ``name``, or with none (``name=None``: the
    teacher).

    The base is held by reference, not registered as a child, so a view adds no parameters of its
    own: ``named_parameters()`` / ``parameters()`` yield the adapter's LoRA tensors only (names as in
    the base, e.g. ``transformer_blocks.0.attn.to_q.lora_A.generator.weight``; none for the
    teacher), and ``state_dict()`` / ``load_state_dict()`` hold exactly those tensors. An optimiser
    built from ``view.parameters()`` trains that adapter and nothing else.

    ``forward`` activates the role's adapter for the duration of the call and restores the previous
    state. Attributes the view lacks are read from the base (``view.config``, ``view.dtype``); such
    submodules are the shared base's, so hooks registered through one view apply to every role.
    """

    def __init__(self, base: nn.Module, name: str | None):
        super().__init__()
        layers = lora_layers(base)
        if not layers:
            raise ValueError(f"{type(base).__name__} has no LoRA layers; call attach_lora first")
        _check_name(adapter_names(base), name)
        self.__dict__["_base"] = base  # by reference: not a child module, its parameters not ours
        self.__dict__["_layers"] = layers
        self.__dict__["_containers"] = _containers(layers)
        self.adapter = name

    @property
    def base(self) -> nn.Module:
        return self.__dict__["_base"]

    @property
    def storage_dtype(self) -> torch.dtype:
        """The base's storage dtype (inputs are cast to it), not the adapters'."""
        containers = self.__dict__["_containers"]
        for name, p in self.base.named_parameters():
            if p.is_floating_point() and _adapter_of(name, containers) is None:
                return p.dtype
        return torch.float32

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        layers = self.__dict__["_layers"]
        with _states_applied(layers, [_role_state(self.adapter, layer) for layer in layers]):
            return self.base(*args, **kwargs)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        if self.adapter is None:
            return
        containers = self.__dict__["_containers"]
        for name, p in self.base.named_parameters(prefix="", remove_duplicate=remove_duplicate):
            if _adapter_of(name, containers) == self.adapter:
                yield (f"{prefix}.{name}" if prefix else name), p

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name, p in self.named_parameters():
            destination[prefix + name] = p if keep_vars else p.detach()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        own = dict(self.named_parameters())
        for name, p in own.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if tuple(value.shape) != tuple(p.shape):
                error_msgs.append(f"size mismatch for {key}: {tuple(value.shape)} vs {tuple(p.shape)}")
                continue
            with torch.no_grad():
                p.copy_(value)
        if strict:
            ours = {prefix + name for name in own}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in ours)

    def __getattr__(self, attr: str) -> Any:
        try:
            return super().__getattr__(attr)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None:
                raise
            return getattr(base, attr)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, base={type(self.base).__name__}"


# ----------------------------------------------------------------------------------------- attach


def attach_lora(
    base: nn.Module,
    settings: LoraSettings,
    names: Sequence[str] = ("generator", "fake_score"),
    *,
    adapter_dtype: torch.dtype | None = None,
) -> list[str]:
    """Attach one LoRA adapter per name to ``base`` (in place) and return the adapted modules' names.

    Uses diffusers' ``add_adapter`` when ``base`` is a diffusers model, else peft's
    ``inject_adapter_in_model``. Every adapter starts with the same tensors (the first one's,
    drawn from ``settings.seed``; B·A = 0), so every role starts equal to the teacher. Afterwards
    the base's own tensors are frozen, the new adapters' are trainable (adapters attached earlier
    keep their flags), and the base runs with its adapters disabled until a view or
    :func:`use_adapter` activates one.

    ``adapter_dtype``: the new adapters' storage dtype (e.g. float32 on a bf16 base: peft's LoRA
    layer casts its input to the adapter's dtype and the sum back to the base output's); None keeps
    peft's choice, the dtype of the base layer's weight.
    """
    names = list(names)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"names must be distinct non-empty adapter names, got {names!r}")
    existing = adapter_names(base)
    clash = [n for n in names if n in existing]
    if clash:
        raise ValueError(f"{type(base).__name__} already has adapters {clash}; attached: {existing}")
    bad = [n for n in names if "." in n]
    if bad:
        raise ValueError(f"adapter names cannot contain '.', got {bad}")
    if not matching_modules(base, settings.target_modules):
        raise ValueError(
            f"LoRA target_modules {list(settings.target_modules)} match no module of "
            f"{type(base).__name__}; its Linear/Conv modules are named: {_adaptable_names(base)}"
        )
    kept = {id(p): p.requires_grad for p in base.parameters()}  # earlier adapters keep their flags
    devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = [torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        # peft warns that a model with a peft_config gets a further adapter: that is the point here
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
        torch.manual_seed(settings.seed)
        for name in names:
            if hasattr(base, "add_adapter") and hasattr(base, "_hf_peft_config_loaded"):
                base.add_adapter(settings.peft_config(), adapter_name=name)
            else:
                from peft import inject_adapter_in_model

                inject_adapter_in_model(settings.peft_config(), base, adapter_name=name)
    layers = lora_layers(base)
    containers = _containers(layers)
    if adapter_dtype is not None:
        for layer in layers:
            for container in layer.adapter_layer_names:
                held = getattr(layer, container, None)
                if isinstance(held, nn.ModuleDict):
                    for name in names:
                        if name in held:
                            held[name].to(adapter_dtype)
    first = adapter_state_dict(base, names[0])
    for name in names[1:]:
        load_adapter_state_dict(base, name, first)
    for param_name, p in base.named_parameters():
        owner = _adapter_of(param_name, containers)
        p.requires_grad_(owner in names or (owner is not None and kept.get(id(p), False)))
    for layer in layers:
        _set_state(layer, _role_state(None, layer))
    return [name for name, m in base.named_modules() if m in set(layers)]


# ---------------------------------------------------------------------------- saving and loading


def adapter_state_dict(base: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s tensors (detached copies), keyed as peft's ``get_peft_model_state_dict``
    keys them (the adapter name removed: ``transformer_blocks.0.attn.to_q.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    _check_name(adapter_names(base), name)
    state = get_peft_model_state_dict(base, adapter_name=name)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def load_adapter_state_dict(base: nn.Module, name: str, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` (as :func:`adapter_state_dict` returns it) into adapter ``name``.

    The keys and shapes must be exactly the adapter's; the message lists what differs."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    _check_name(adapter_names(base), name)
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(base, adapter_name=name).items()}
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {expected[k]}"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != expected[k]
    ]
    problems = [
        f"{what} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for what, keys in (("missing", missing), ("unexpected", extra), ("shape mismatch", shapes))
        if keys
    ]
    if problems:
        raise ValueError(f"adapter state for {name!r} does not fit: " + "; ".join(problems))
    flags = [(p, p.requires_grad) for p in base.parameters()]
    set_peft_model_state_dict(base, dict(state), adapter_name=name)
    for p, flag in flags:
        p.requires_grad_(flag)


def base_fingerprint(base: nn.Module) -> str:
    """SHA-256 over the name, dtype, shape and bytes of every parameter and buffer of ``base`` that
    belongs to no adapter: equal fingerprints mean a bit-identical base. Names are taken without
    peft's ``base_layer`` component, so a network's fingerprint before :func:`attach_lora` equals
    its base's after.

    It reads every byte (copied to the CPU), so it is for tests and occasional checks, not for every
    step. DTensor parameters contribute their local shard."""
    containers = _containers(lora_layers(base))
    named: dict[str, Tensor] = {}
    for name, t in [*base.named_parameters(), *base.named_buffers()]:
        if _adapter_of(name, containers) is None:
            named[".".join(part for part in name.split(".") if part != "base_layer")] = t
    digest = hashlib.sha256()
    for name in sorted(named):
        t = named[name]
        local = t.to_local() if callable(getattr(t, "to_local", None)) else t
        data = local.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        digest.update(f"{name}|{local.dtype}|{tuple(local.shape)}|".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()
