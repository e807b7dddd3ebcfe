"""Evaluation: distances between feature distributions."""

from guidekit.evaluation.frechet import frechet_distance, gaussian_statistics

__all__ = ["frechet_distance", "gaussian_statistics"]
