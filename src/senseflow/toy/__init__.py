"""The built-in "shapes" world: a procedural text-to-image domain that runs on a CPU."""
