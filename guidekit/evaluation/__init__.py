"""Evaluation: feature networks, reference statistics, metrics, and the ``guidekit eval`` / ``sweep`` runners."""

from guidekit.evaluation.features import (
    ClipFeatures,
    Dinov2Features,
    FeatureNetwork,
    FeatureOutput,
    InceptionFeatures,
    TorchFeatures,
    load_feature_network,
    locate_inception,
)
from guidekit.evaluation.frechet import frechet_distance, gaussian_statistics
from guidekit.evaluation.image_metrics import clip_score, saturation
from guidekit.evaluation.inception_score import inception_score
from guidekit.evaluation.kid import kernel_inception_distance
from guidekit.evaluation.manifold import density_coverage, prdc, precision_recall
from guidekit.evaluation.reference import (
    ReferenceStatistics,
    load_reference,
    reference_from_folder,
    reference_from_npz_images,
    save_reference,
)
from guidekit.evaluation.stats import RunningStatistics

__all__ = [
    "ClipFeatures",
    "Dinov2Features",
    "FeatureNetwork",
    "FeatureOutput",
    "InceptionFeatures",
    "ReferenceStatistics",
    "RunningStatistics",
    "TorchFeatures",
    "clip_score",
    "density_coverage",
    "frechet_distance",
    "gaussian_statistics",
    "inception_score",
    "kernel_inception_distance",
    "load_feature_network",
    "load_reference",
    "locate_inception",
    "prdc",
    "precision_recall",
    "reference_from_folder",
    "reference_from_npz_images",
    "saturation",
    "save_reference",
]
