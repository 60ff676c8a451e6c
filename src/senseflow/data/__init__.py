"""Training data from files: the ``data.kind`` readers and the offline latent cache.

Each kind lists its samples once at start-up (:mod:`senseflow.data.index`, ``webdataset``, ``hf``),
and one stream (:mod:`senseflow.data.streams`) gives every image kind the same order, image
pipeline, bad-sample policy, metadata and latent cache. The builders the registry names are in
:mod:`senseflow.data.kinds`; ``senseflow cache-latents`` is in :mod:`senseflow.data.cli`.
"""

from __future__ import annotations

from senseflow.data.images import BadImage, crop_geometry
from senseflow.data.streams import DataWarning, ImageStream, PromptStream, verify_latent_cache

__all__ = ["BadImage", "DataWarning", "ImageStream", "PromptStream", "crop_geometry", "verify_latent_cache"]
