"""Teacher families: one package per family (its adapter, folder layout and data), registered by name."""
