"""Teacher-family adapters, the batch contract, shared family helpers and discriminators.

Families are chosen by ``model.family`` through the one registry of :mod:`senseflow.config.registry`
(name, recipe rules, adapter builder); the trainer never names a family.
"""

from __future__ import annotations

from senseflow.config.registry import family_spec, resolve_builder
from senseflow.config.schema import DistillConfig
from senseflow.models.adapter import FamilyAdapter, FeatureTap
from senseflow.models.batch import Batch, Conditioning


def build_adapter(cfg: DistillConfig, *, text_cache: bool = True) -> FamilyAdapter:
    """The adapter of ``model.family``, from its registry entry's builder, with the recipe's guidance
    kind, CFG convention (the schema has checked them against the family's rules) and decode chunk.

    With ``text_cache`` and a folder in ``model.text_cache`` (relative: to the working directory),
    prompts are read from that cache, checked against the adapter's text identity; the text
    encoders are then never loaded. ``text_cache=False`` encodes live (arbitrary prompts)."""
    spec = family_spec(cfg.model.family)
    if spec is None:
        raise ValueError(f"model.family: '{cfg.model.family}' is not registered")
    adapter = resolve_builder(spec, "model.family")(cfg)
    adapter.guidance_kind = cfg.method.dmd.guidance_kind
    adapter.cfg_convention = cfg.model.cfg_convention
    adapter.decode_chunk = cfg.model.decode_chunk
    adapter.vae_dtype = cfg.precision.vae_dtype
    if text_cache and cfg.model.text_cache != "live":
        from senseflow.models.text_cache import TextCache

        adapter.text_cache = TextCache.open(cfg.model.text_cache, adapter)
    return adapter


__all__ = ["Batch", "Conditioning", "FamilyAdapter", "FeatureTap", "build_adapter"]
