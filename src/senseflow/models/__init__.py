"""Teacher-family adapters and discriminators, chosen by recipe keys through small registries.

A new family registers a builder here (``register_adapter``) and in the recipe schema
(``senseflow.config.register_family``); the trainer never names a family.
"""

from __future__ import annotations

from collections.abc import Callable

from senseflow.config.schema import DistillConfig
from senseflow.models.adapter import Conditioning, FamilyAdapter, Networks

AdapterBuilder = Callable[[DistillConfig], FamilyAdapter]
_ADAPTERS: dict[str, AdapterBuilder] = {}


def register_adapter(family: str, builder: AdapterBuilder) -> None:
    _ADAPTERS[family] = builder


def build_adapter(cfg: DistillConfig) -> FamilyAdapter:
    family = cfg.model.family
    if family not in _ADAPTERS:
        available = ", ".join(sorted(_ADAPTERS))
        raise ValueError(f"model.family: no adapter for '{family}' in this version (available: {available})")
    return _ADAPTERS[family](cfg)


def _toy(cfg: DistillConfig) -> FamilyAdapter:
    from senseflow.models.toy import ToyAdapter

    if cfg.model.revision is not None:
        raise ValueError(
            "model.revision: the toy teacher is a local folder and has no hub revision; remove it"
        )
    return ToyAdapter(cfg.model.teacher, cfg.model.anchors, cfg.model.cfg_convention)


register_adapter("toy", _toy)

__all__ = ["Conditioning", "FamilyAdapter", "Networks", "build_adapter", "register_adapter"]
