"""Typed recipe system: YAML recipes + dotted overrides validated by pydantic v2 schemas.

Typical use::

    from senseflow.config import load_config, save_resolved

    cfg = load_config("sd35_large", ["optim.generator.lr=2e-6", "method.ida.enabled=false"])
    save_resolved(cfg, f"{cfg.output_dir}/config.yaml")

Every recipe section (:mod:`~senseflow.config.schema`) and the registries of names a recipe may use
(:mod:`~senseflow.config.registry`) are re-exported here.
"""

from senseflow.config import loader as _loader
from senseflow.config import recipes as _recipes
from senseflow.config import registry as _registry
from senseflow.config import schema as _schema
from senseflow.config.loader import *  # noqa: F403
from senseflow.config.recipes import *  # noqa: F403
from senseflow.config.registry import *  # noqa: F403
from senseflow.config.schema import *  # noqa: F403

__all__ = [*_loader.__all__, *_recipes.__all__, *_registry.__all__, *_schema.__all__]
