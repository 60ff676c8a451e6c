"""The built-in "shapes" world and its teacher family: a procedural text-to-image domain for the CPU."""
