"""``senseflow export``: a trained student as files stock tools load (diffusers pipeline folders,
LoRA weights, original-layout single files), each with a model card."""
