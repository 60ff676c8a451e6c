"""Distribution metrics: Fréchet distance between Gaussian fits of feature sets (the core of FID)."""

from senseflow.metrics.frechet import FeatureStats, fid_from_features, fid_from_stats, frechet_distance

__all__ = ["FeatureStats", "fid_from_features", "fid_from_stats", "frechet_distance"]
