"""The metric math (synth.metrics): statistics merge exactly, and each metric equals the direct
computation on the same features (clean-fid's functions where clean-fid has one)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.linalg
from cleanfid import fid as clean_fid

from cytosynth.synth.metrics import (
    FeatureSample,
    FeatureStats,
    InceptionScoreStats,
    SetStatistics,
    compare_sets,
    frechet_distance,
    kernel_distance,
    sample_keys,
    split_of,
    statistics_from_npz,
    statistics_to_npz,
)


def features(n: int, dim: int = 6, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim))
    return (rng.normal(size=(n, dim)) @ mixing + shift).astype(np.float32)


def test_statistics_give_numpy_mean_and_covariance():
    x = features(50)
    stats = FeatureStats.of(x)
    assert stats.count == 50
    np.testing.assert_allclose(stats.mean(), np.mean(x.astype(np.float64), axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_merged_statistics_equal_single_process_statistics():
    x = features(47)
    parts = [FeatureStats.of(x[:10]), FeatureStats.of(x[10:11]), FeatureStats.of(x[11:])]
    merged = parts[2].merge(parts[0]).merge(parts[1])  # any order
    whole = FeatureStats.of(x)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-12)
    np.testing.assert_allclose(merged.outer_sum, whole.outer_sum, rtol=1e-12)
    assert frechet_distance(merged, FeatureStats.of(features(30, seed=1))) == pytest.approx(
        frechet_distance(whole, FeatureStats.of(features(30, seed=1))), rel=1e-10
    )


def test_fid_equals_clean_fid_on_the_same_features_and_is_zero_for_a_set_with_itself():
    a, b = features(40), features(35, seed=1, shift=0.5)
    expected = clean_fid.fid_from_feats(a, b)
    assert frechet_distance(FeatureStats.of(a), FeatureStats.of(b)) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(FeatureStats.of(a), FeatureStats.of(a))) < 1e-9


def with_moments(mean: np.ndarray, covariance: np.ndarray, n: int = 64, seed: int = 0) -> np.ndarray:
    """n features whose sample mean and (n-1) covariance are exactly `mean` and `covariance`."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: identity covariance
    return z @ np.linalg.cholesky(covariance).T + mean


def test_fid_of_known_gaussians_is_their_closed_form_frechet_distance():
    # Diagonal covariances commute: d^2 = |m1 - m2|^2 + sum (sqrt(s1) - sqrt(s2))^2, here 2 + 2 = 4.
    m1, m2 = np.zeros(4), np.array([1.0, 1.0, 0.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0, 1.0]), np.array([4.0, 1.0, 9.0, 1.0])
    a, b = with_moments(m1, np.diag(s1)), with_moments(m2, np.diag(s2), seed=1)
    assert frechet_distance(FeatureStats.of(a), FeatureStats.of(b)) == pytest.approx(4.0, rel=1e-9)
    # A full (non-commuting) pair against scipy's matrix square root of the textbook formula.
    rng = np.random.default_rng(2)
    c1, c2 = (q @ q.T + np.eye(4) for q in rng.normal(size=(2, 4, 4)))
    a, b = with_moments(m1, c1), with_moments(m2, c2, seed=1)
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert expected > 1.0
    assert frechet_distance(FeatureStats.of(a), FeatureStats.of(b)) == pytest.approx(expected, rel=1e-6)


def direct_kid(x: np.ndarray, y: np.ndarray) -> float:
    """KID of whole sets from its definition (Binkowski et al.): the unbiased MMD^2 estimate with
    the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3, diagonal terms left out."""
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    within = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within - 2 * k(x, y).mean())


def test_kid_on_whole_sets_is_the_unbiased_mmd_of_the_cubic_kernel():
    a, b = features(30).astype(np.float64), features(30, seed=1, shift=0.3).astype(np.float64)
    expected = direct_kid(a, b)
    assert expected > 1e-3  # the sets differ: a constant-zero KID fails
    assert kernel_distance(a, b, num_subsets=3) == pytest.approx(expected, rel=1e-9)


def test_kid_equals_clean_fid_kernel_distance_on_whole_sets():
    # With subsets as large as the sets, every subset is the whole set: no randomness left.
    a, b = features(30).astype(np.float64), features(30, seed=1, shift=0.3).astype(np.float64)
    assert kernel_distance(a, b, num_subsets=3) == pytest.approx(clean_fid.kernel_distance(a, b, num_subsets=3), rel=1e-12)


def test_kid_subsets_are_seeded():
    a, b = features(40), features(40, seed=1, shift=0.3)
    assert kernel_distance(a, b, 5, 10, seed=3) == kernel_distance(a, b, 5, 10, seed=3)
    assert kernel_distance(a, b, 5, 10, seed=3) != kernel_distance(a, b, 5, 10, seed=4)


def direct_inception_score(logits: np.ndarray, split: np.ndarray, splits: int) -> tuple[float, float]:
    """The original IS (Salimans et al.): exp(mean KL(p(y|x) || p(y))) per split, then mean and std."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    scores = []
    for s in range(splits):
        part = p[split == s]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("splits", [1, 4])
def test_inception_score_equals_direct_computation(splits):
    logits = np.random.default_rng(0).normal(scale=3.0, size=(60, 7))
    keys = sample_keys([f"img{i}" for i in range(60)])
    split = split_of(keys, splits)
    stats = [InceptionScoreStats.empty(splits, 7) for _ in range(2)]
    stats[0].add(logits[:25], split[:25])  # two workers' shares, merged
    stats[1].add(logits[25:], split[25:])
    mean, std = stats[0].merge(stats[1]).score()
    expected_mean, expected_std = direct_inception_score(logits, split, splits)
    assert mean == pytest.approx(expected_mean, rel=1e-10)
    assert std == pytest.approx(expected_std, rel=1e-8, abs=1e-12)


def test_inception_score_of_confident_distinct_classes_is_the_class_count():
    logits = np.full((40, 4), -50.0)
    logits[np.arange(40), np.arange(40) % 4] = 50.0
    mean, _ = InceptionScoreStats.empty(1, 4).merge(_is_stats(logits)).score()
    assert mean == pytest.approx(4.0, rel=1e-9)


def _is_stats(logits: np.ndarray) -> InceptionScoreStats:
    stats = InceptionScoreStats.empty(1, logits.shape[1])
    stats.add(logits, np.zeros(len(logits), np.int64))
    return stats


def test_split_keys_depend_on_image_ids_alone():
    ids = [f"{i:06d}.tar/{i:09d}" for i in range(1000)]
    keys = sample_keys(ids, seed=5)
    assert np.array_equal(keys, sample_keys(ids, seed=5))
    assert np.array_equal(keys[500:], sample_keys(ids[500:], seed=5))
    assert not np.array_equal(keys, sample_keys(ids, seed=6))
    assert ((keys >= 0) & (keys < 1)).all()
    sizes = np.bincount(split_of(keys, 10), minlength=10)
    assert sizes.min() > 50  # a random partition: about 100 each


def test_kid_sample_merged_from_parts_is_the_sample_of_the_whole():
    x = features(100)
    keys = sample_keys([str(i) for i in range(100)])
    whole = FeatureSample(capacity=30)
    whole.add(keys, x)
    parts = [FeatureSample(capacity=30) for _ in range(3)]
    for part, rows in zip(parts, np.array_split(np.arange(100), 3)):
        for chunk in np.array_split(rows, 4):  # batch by batch
            part.add(keys[chunk], x[chunk])
    merged = parts[2].merge(parts[0]).merge(parts[1])
    assert len(merged) == 30
    assert np.array_equal(merged.keys, whole.keys)
    assert np.array_equal(merged.features, whole.features)
    assert np.array_equal(whole.keys, np.sort(keys)[:30])  # the 30 smallest keys: a uniform sample


def test_compare_sets_reports_every_requested_class():
    real = SetStatistics(FeatureStats.of(features(20)), {"ASC-US": FeatureStats.of(features(5, seed=2))})
    fake = SetStatistics(FeatureStats.of(features(20, seed=1)), {"ASC-US": FeatureStats.of(features(6, seed=3)),
                                                                    "HSIL": FeatureStats.of(features(1, seed=4))})
    result = compare_sets(real, fake, classes=("ASC-US", "HSIL", "LSIL"))
    assert result["fid"] == pytest.approx(frechet_distance(real.images, fake.images))
    assert result["per_class"]["ASC-US"] == {
        "fid": pytest.approx(frechet_distance(real.classes["ASC-US"], fake.classes["ASC-US"])),
        "real_crops": 5, "fake_crops": 6,
    }
    assert result["per_class"]["HSIL"] == {"fid": None, "real_crops": 0, "fake_crops": 1}
    assert result["per_class"]["LSIL"] == {"fid": None, "real_crops": 0, "fake_crops": 0}
    assert "kid" not in result and "is" not in result


def test_too_few_images_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        compare_sets(SetStatistics(FeatureStats.of(features(1))), SetStatistics(FeatureStats.of(features(5))))


def test_statistics_file_round_trip_without_pickle():
    sample = FeatureSample(capacity=8)
    x = features(12)
    sample.add(sample_keys([str(i) for i in range(12)]), x)
    stats = SetStatistics(FeatureStats.of(x), {"LSIL": FeatureStats.of(x[:4])}, sample)
    data = statistics_to_npz(stats, {"extractor": {"sha256": "abc"}})
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # plain arrays only
        assert all(npz[name].dtype != object for name in npz.files)
    loaded, meta = statistics_from_npz(data)
    assert meta["extractor"] == {"sha256": "abc"}
    assert loaded.images.count == 12 and np.array_equal(loaded.images.outer_sum, stats.images.outer_sum)
    assert np.array_equal(loaded.classes["LSIL"].sum, stats.classes["LSIL"].sum)
    assert np.array_equal(loaded.kid_sample.features, sample.features) and loaded.kid_sample.capacity == 8
    with pytest.raises(ValueError, match="not a feature statistics file"):
        statistics_from_npz(b"not an npz file")
