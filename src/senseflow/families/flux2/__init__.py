"""FLUX.2: ``Flux2Pipeline`` (FLUX.2-dev, Mistral 3, guidance embedding) and ``Flux2KleinPipeline``
(FLUX.2 klein base, Qwen3, CFG)."""
