"""senseflow: distil text-to-image teachers into few-step generators with SenseFlow."""

__version__ = "0.1.0"
