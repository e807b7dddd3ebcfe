"""Evaluation metrics against closed forms, brute-force references and the reference packages (scipy, prdc, PIL)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from guidekit.evaluation import (
    RunningStatistics,
    clip_score,
    density_coverage,
    frechet_distance,
    gaussian_statistics,
    inception_score,
    kernel_inception_distance,
    prdc,
    precision_recall,
    saturation,
)

# ---------------------------------------------------------------- Frechet distance


def _random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _closed_form(mu1: np.ndarray, a: np.ndarray, mu2: np.ndarray, b: np.ndarray) -> float:
    """Covariances sharing an eigenbasis with eigenvalues a, b: tr sqrt(S1^1/2 S2 S1^1/2) = sum sqrt(a b)."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


@pytest.mark.parametrize("case", ["diagonal", "rotated", "rank_deficient"])
def test_frechet_distance_matches_closed_form(case: str) -> None:
    rng = np.random.default_rng(1)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    rotation = np.eye(d) if case == "diagonal" else _random_rotation(d, rng)
    if case == "rank_deficient":
        a[:6] = 0.0
        b[3:10] = 0.0
    s1, s2 = (rotation * a) @ rotation.T, (rotation * b) @ rotation.T
    expected = _closed_form(mu1, a, mu2, b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) * 0.3
    y = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) * 0.3 + 0.2
    (mu1, s1), (mu2, s2) = gaussian_statistics(x), gaussian_statistics(y)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- RunningStatistics


def test_running_statistics_merged_shards_equal_one_pass(tmp_path) -> None:
    rng = np.random.default_rng(3)
    data = (rng.standard_normal((1000, 16)) * rng.uniform(0.5, 2.0, 16) + rng.uniform(0, 1, 16)).astype(np.float32)
    cuts = [0, 37, 300, 301, 655, 1000]  # five uneven shards
    shards = []
    for i, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        stats = RunningStatistics(16)
        rows = [data[lo:hi], torch.from_numpy(data[lo:hi]), data[lo:hi].astype(np.float64)][i % 3]
        for start in range(0, hi - lo, 100):  # several updates per shard
            stats.update(rows[start:start + 100])
        shards.append(stats)
    merged = functools.reduce(lambda s, t: s.merge(t), [shards[i] for i in (3, 0, 4, 2, 1)])
    merged_plus = shards[4] + shards[2] + shards[0] + shards[1] + shards[3]
    reference = data.astype(np.float64)
    for stats in (merged, merged_plus):
        assert stats.count == 1000
        np.testing.assert_allclose(stats.mean, reference.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.covariance, np.cov(reference, rowvar=False), rtol=1e-12, atol=1e-12)
    path = tmp_path / "stats.npz"
    np.savez(path, **merged.to_arrays())
    with np.load(path) as arrays:
        loaded = RunningStatistics.from_arrays(arrays)
    assert loaded.count == merged.count
    np.testing.assert_array_equal(loaded.sum_outer, merged.sum_outer)
    mu, sigma = gaussian_statistics(reference)
    assert frechet_distance(loaded.mean, loaded.covariance, mu, sigma) == pytest.approx(0.0, abs=1e-10)


def test_running_statistics_errors() -> None:
    stats = RunningStatistics(4)
    with pytest.raises(ValueError, match=r"count=0"):
        _ = stats.mean
    with pytest.raises(ValueError, match=r"expected \(n, 4\)"):
        stats.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"expected \(n, 4\)"):
        stats.update(np.zeros(4))
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"count=1; expected at least 2"):
        _ = stats.covariance
    with pytest.raises(ValueError, match=r"other.dim=3"):
        stats.merge(RunningStatistics(3))
    with pytest.raises(ValueError, match=r"dim=0"):
        RunningStatistics(0)
    with pytest.raises(ValueError, match=r"sum_outer"):
        RunningStatistics.from_arrays({"count": np.array(1), "sum": np.zeros(4)})


# ---------------------------------------------------------------- precision / recall / density / coverage


def _oracle(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """``prdc.compute_prdc`` (Naeem et al.'s package, ``pip install prdc``)."""
    prdc_package = pytest.importorskip("prdc")
    return {key: float(value) for key, value in prdc_package.compute_prdc(real, fake, nearest_k=k).items()}


def _brute_force(real: np.ndarray, fake: np.ndarray, k: int, strict: bool) -> dict[str, float]:
    """Full-matrix reference with ADM's radius (index k of the sorted row, self included) for integer features."""
    def squared(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # exact for integers

    inside = np.less if strict else np.less_equal
    r_real = np.sort(squared(real, real), axis=1)[:, k]
    r_fake = np.sort(squared(fake, fake), axis=1)[:, k]
    cross = squared(real, fake)
    in_real = inside(cross, r_real[:, None])
    return {"precision": in_real.any(0).mean(), "recall": inside(cross, r_fake[None, :]).any(1).mean(),
            "density": in_real.sum(0).mean() / k, "coverage": in_real.any(1).mean()}


@pytest.mark.parametrize("k", [3, 5])
def test_prdc_strict_equals_prdc_package_on_continuous_features(k: int) -> None:
    rng = np.random.default_rng(4)
    real = rng.standard_normal((300, 32)).astype(np.float32)
    fake = (rng.standard_normal((240, 32)) * 1.2 + 0.3).astype(np.float32)
    expected = _oracle(real, fake, k)
    assert prdc(real, fake, k, strict=True) == expected
    assert precision_recall(real, fake, k, strict=True) == (expected["precision"], expected["recall"])
    assert density_coverage(real, fake, k, strict=True) == (expected["density"], expected["coverage"])
    # Without ties "<" and "<=" agree, in float32 tiles too, and torch inputs give the same.
    assert prdc(torch.from_numpy(real), torch.from_numpy(fake), k, dtype=torch.float32) == expected


def test_prdc_ties_strict_and_non_strict_each_match_their_semantics() -> None:
    rng = np.random.default_rng(5)
    real = rng.integers(0, 3, size=(150, 3))  # 27 possible points: many duplicates and equal distances
    fake = rng.integers(0, 4, size=(120, 3))
    strict, loose = prdc(real, fake, 3, strict=True), prdc(real, fake, 3)
    assert strict == _oracle(real.astype(np.float64), fake.astype(np.float64), 3)
    assert strict == pytest.approx(_brute_force(real, fake, 3, strict=True), abs=1e-15)
    assert loose == pytest.approx(_brute_force(real, fake, 3, strict=False), abs=1e-15)
    assert all(loose[key] >= strict[key] for key in loose)
    assert loose != strict


def test_identical_sets_and_far_apart_clusters() -> None:
    rng = np.random.default_rng(6)
    points = rng.standard_normal((100, 8))
    assert precision_recall(points, points.copy()) == (1.0, 1.0)
    # Each point four times: with k = 3 every radius is 0, inside under "<=" (ADM), outside under "<" (prdc).
    repeated = np.repeat(rng.integers(0, 5, size=(25, 4)), 4, axis=0)
    assert precision_recall(repeated, repeated) == (1.0, 1.0)
    assert precision_recall(repeated, repeated, strict=True) == (0.0, 0.0)
    far = prdc(points, points + 100.0, 3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_blocks_smaller_than_n_give_identical_results() -> None:
    rng = np.random.default_rng(7)
    real = rng.standard_normal((130, 16))
    fake = rng.standard_normal((97, 16)) + 0.2
    ties_real, ties_fake = rng.integers(0, 3, size=(90, 3)), rng.integers(0, 3, size=(70, 3))
    for strict in (False, True):
        one_block = prdc(real, fake, 4, strict=strict, block_size=1000)
        one_block_ties = prdc(ties_real, ties_fake, 3, strict=strict, block_size=1000)
        for block_size in (3, 7, 50, 129):
            assert prdc(real, fake, 4, strict=strict, block_size=block_size) == one_block
            assert prdc(ties_real, ties_fake, 3, strict=strict, block_size=block_size) == one_block_ties


def test_prdc_errors() -> None:
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match=r"real_features with 3 rows is not accepted for k=3"):
        precision_recall(x[:3], x)
    with pytest.raises(ValueError, match=r"fake_features with 5 rows is not accepted for k=5"):
        prdc(x, x[:5])
    with pytest.raises(ValueError, match=r"expected the same feature dimension"):
        precision_recall(x, np.zeros((10, 5)))
    with pytest.raises(ValueError, match=r"block_size=0"):
        precision_recall(x, x, block_size=0)
    with pytest.raises(ValueError, match=r"k=0"):
        density_coverage(x, x, k=0)
    with pytest.raises(ValueError, match=r"non-finite"):
        precision_recall(np.full((10, 4), np.nan), x)
    with pytest.raises(ValueError, match=r"dtype=torch.float16"):
        precision_recall(x, x, dtype=torch.float16)
    # density and coverage need only the real radii
    assert density_coverage(x, x[:2], k=3) == (10 / 3, 1.0)


# ---------------------------------------------------------------- KID


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d, m, n = x.shape[1], len(x), len(y)
    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / d + 1.0) ** 3

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2.0 * k_xy.mean())


def test_kid_full_subset_equals_direct_unbiased_mmd() -> None:
    rng = np.random.default_rng(8)
    real, fake = rng.standard_normal((150, 20)), rng.standard_normal((150, 20)) * 1.1 + 0.1
    mean, std = kernel_inception_distance(real, fake, num_subsets=1, subset_size=150)
    assert mean == pytest.approx(_unbiased_mmd2(fake, real), rel=1e-12)
    assert std == 0.0
    # subset_size is clipped to the smaller set, as in StyleGAN2-ADA and clean-fid
    assert kernel_inception_distance(real, fake, num_subsets=1, subset_size=10_000)[0] == pytest.approx(mean)


def test_kid_same_distribution_near_zero_shifted_positive() -> None:
    rng = np.random.default_rng(9)
    real = rng.standard_normal((600, 32))
    same = rng.standard_normal((600, 32))
    shifted = rng.standard_normal((600, 32)) + 0.5
    same_mean, same_std = kernel_inception_distance(real, same, num_subsets=20, subset_size=300)
    shifted_mean, _ = kernel_inception_distance(torch.from_numpy(real), torch.from_numpy(shifted),
                                                num_subsets=20, subset_size=300)
    assert abs(same_mean) < 0.02 and same_std > 0
    assert shifted_mean > 0.2
    assert kernel_inception_distance(real, same, num_subsets=3, subset_size=50, seed=1) == \
        kernel_inception_distance(real, same, num_subsets=3, subset_size=50, seed=1)
    with pytest.raises(ValueError, match=r"subset_size=1"):
        kernel_inception_distance(real, same, subset_size=1)


# ---------------------------------------------------------------- Inception Score


def test_inception_score() -> None:
    assert inception_score(np.zeros((1000, 1008))) == pytest.approx((1.0, 0.0), abs=1e-12)
    confident = np.full((1000, 10), -30.0)
    confident[np.arange(1000), np.arange(1000) % 10] = 30.0  # every split holds each class equally often
    mean, std = inception_score(torch.from_numpy(confident).float(), splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # against the Salimans et al. formula written with probabilities
    logits = np.random.default_rng(10).standard_normal((300, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    parts = [p[i * 100:(i + 1) * 100] for i in range(3)]
    scores = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1))) for q in parts]
    assert inception_score(logits, splits=3) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-12)
    with pytest.raises(ValueError, match=r"logits=None .* needs the classifier logits"):
        inception_score(None)
    with pytest.raises(ValueError, match=r"splits=11"):
        inception_score(np.zeros((10, 3)), splits=11)


# ---------------------------------------------------------------- saturation and CLIP score


def test_saturation_matches_pil_hsv() -> None:
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, size=(4, 17, 23, 3), dtype=np.uint8)
    images[0, :5] = 0  # black pixels have S = 0
    pil = np.array([np.asarray(Image.fromarray(image).convert("HSV"))[..., 1].mean() / 255 for image in images])
    ours = saturation(images)
    assert ours.shape == (4,) and ours.dtype == np.float64
    assert np.all(ours >= pil - 1e-12) and np.all(ours - pil <= 1 / 255)  # PIL truncates 255 * S
    np.testing.assert_allclose(saturation(torch.from_numpy(images).permute(0, 3, 1, 2)), ours, rtol=1e-12)
    np.testing.assert_allclose(saturation(images.astype(np.float32) / 255, chunk_size=3), ours, rtol=1e-6)


def test_saturation_gray_and_errors() -> None:
    gray = np.repeat(np.random.default_rng(12).integers(0, 256, size=(2, 1, 8, 8), dtype=np.uint8), 3, axis=1)
    np.testing.assert_array_equal(saturation(gray), [0.0, 0.0])
    pure_red = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    pure_red[..., 0] = 200
    np.testing.assert_array_equal(saturation(pure_red), [1.0])
    with pytest.raises(ValueError, match=r"ambiguous; pass layout"):
        saturation(np.zeros((1, 3, 5, 3), dtype=np.uint8))
    assert saturation(np.zeros((1, 3, 5, 3), dtype=np.uint8), layout="NCHW").shape == (1,)
    with pytest.raises(ValueError, match=r"expected \(N, 3, H, W\) or \(N, H, W, 3\)"):
        saturation(np.zeros((2, 4, 4), dtype=np.uint8))


def test_clip_score() -> None:
    image = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    text = np.array([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 3.0**0.5]])
    np.testing.assert_allclose(clip_score(image, text), [100.0, 0.0, 0.0, 50.0], atol=1e-12)
    np.testing.assert_allclose(clip_score(torch.tensor(image), torch.tensor(text)), clip_score(image, text))
    with pytest.raises(ValueError, match=r"expected the same shape"):
        clip_score(image, text[:2])
