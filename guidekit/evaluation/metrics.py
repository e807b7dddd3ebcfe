"""The metrics of a finished run, from its merged shards and its reference statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from guidekit.evaluation.config import IS_SPLITS, EvalConfig


def _reference(path: str, network_identity: dict[str, Any], what: str) -> tuple[Any, dict[str, Any]]:
    """Load a reference and check it was made with the same network and preprocessing."""
    from guidekit.evaluation.reference import load_reference

    try:
        ref = load_reference(path, expected_dim=network_identity.get("dim"))
    except (OSError, ValueError) as exc:  # missing, unreadable, corrupt or of another dimension
        raise ValueError(f"{what}: {exc}") from None
    detail: dict[str, Any] = {"path": path}
    if ref.identity is None:
        detail["identity"] = "unknown (a file without guidekit's identity record, e.g. ADM's): not checked"
    else:
        keys = ("name", "dim", "preprocessing", "sha256")
        different = [k for k in keys if k in ref.identity and k in network_identity
                     and ref.identity[k] != network_identity[k]]
        if different:
            found = ", ".join(f"{k}: {ref.identity[k]!r} vs {network_identity[k]!r}" for k in different)
            raise ValueError(f"{what}={path!r} is not accepted; it was made with another feature network or "
                             f"preprocessing ({found})")
        detail["identity"] = ref.identity
    return ref, detail


def _statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from guidekit.evaluation.stats import RunningStatistics

    stats = RunningStatistics(features.shape[1])
    stats.update(features)
    return stats.mean, stats.covariance


def compute(config: EvalConfig, data: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, Any]]:
    """``(metrics, details)`` of ``config.metrics`` on the merged shard arrays ``data``."""
    from guidekit.evaluation import frechet_distance, inception_score, kernel_inception_distance
    from guidekit.evaluation.features import load_feature_network
    from guidekit.evaluation.manifold import density_coverage, precision_recall

    wanted = set(config.metrics)
    values: dict[str, float] = {}
    details: dict[str, Any] = {}
    networks = {key: load_feature_network(spec if key == "features" else f"{key}:{spec}", "cpu")
                for key, spec in config.networks().items()}
    details["networks"] = {key: net.identity() for key, net in networks.items()}
    if wanted & {"fid", "precision", "recall", "density", "coverage", "kid"}:
        features = data["features_features"]
        ref, details["reference"] = _reference(config.reference, details["networks"]["features"], "reference")
        if "fid" in wanted:
            values["fid"] = frechet_distance(*_statistics(features), ref.mu, ref.sigma)
        needs_features = wanted & {"precision", "recall", "density", "coverage", "kid"}
        if needs_features and ref.features is None:
            raise ValueError(f"reference={config.reference!r} is not accepted for {sorted(needs_features)}; it holds "
                             "only mu and sigma, and these metrics need the reference features")
        if wanted & {"precision", "recall"}:
            values["precision"], values["recall"] = precision_recall(ref.features, features, k=config.pr_k)
        if wanted & {"density", "coverage"}:
            values["density"], values["coverage"] = density_coverage(ref.features, features, k=config.dc_k)
        if "kid" in wanted:
            values["kid"], values["kid_std"] = kernel_inception_distance(
                ref.features, features, num_subsets=config.kid_subsets, subset_size=config.kid_subset_size)
    if "is" in wanted:
        if "logits" not in data:
            raise ValueError(f"metric is (Inception Score) is not accepted with feature_network="
                             f"{config.feature_network!r}: the network gives no class logits (the standard FID "
                             "Inception TorchScript has none); plug in a network with logits")
        values["is"], values["is_std"] = inception_score(data["logits"], splits=IS_SPLITS)
    for key, metric, reference in (("clip", "fd_clip", config.clip_reference),
                                   ("dinov2", "fd_dinov2", config.dinov2_reference)):
        if metric in wanted:
            if reference is None:
                raise ValueError(f"{key}_reference=None is not accepted with metric {metric}; expected reference "
                                 f"statistics of the same {key} network")
            ref, details[f"{key}_reference"] = _reference(reference, details["networks"][key], f"{key}_reference")
            values[metric] = frechet_distance(*_statistics(data[f"{key}_features"]), ref.mu, ref.sigma)
    if "clip_score" in wanted:
        from guidekit.evaluation.image_metrics import clip_score

        prompts = config.prompts() or []
        text = networks["clip"].text_features(prompts)
        image = torch.as_tensor(data["clip_features"])
        values["clip_score"] = float(np.mean(np.asarray(clip_score(image, text[data["prompt_index"]]))))
    if "saturation" in wanted:
        values["saturation"] = float(np.mean(data["saturation"]))
    return {k: float(v) for k, v in values.items()}, details
