"""Image-quality metrics from mergeable statistics: FID, KID and Inception Score.

Every metric is computed from statistics that add up: featurise any slice of an image set,
keep its statistics, merge the slices' statistics in any order, and get the same numbers as one
process featurising the whole set. No slice ever holds more than a batch of features.

- FID: ``FeatureStats`` (count, sum, sum of outer products, float64) give the mean and the
  unbiased covariance; the Frechet distance is clean-fid's own function.
- KID: needs features themselves. ``FeatureSample`` keeps a uniform random sample of at most
  ``capacity`` features (bottom-k by a per-image key, so merging two samples is exact); KID is
  clean-fid's estimator (polynomial kernel, unbiased MMD^2 averaged over random subsets).
- IS: ``InceptionScoreStats`` keep, per split, the count, the sum of p(y|x) and the sum of
  sum_y p log p; that is all exp(E_x KL(p(y|x) || p(y))) needs.

Pure numpy/torch: no storage, no Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cleanfid.fid import frechet_distance as _clean_fid_frechet_distance

STATS_FORMAT = "cytosynth-feature-stats/1"


def _float64(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------- FID


@dataclass
class FeatureStats:
    """Sufficient statistics of a set of D-dimensional features for its mean and covariance."""

    count: int
    sum: np.ndarray  # (D,) float64
    outer_sum: np.ndarray  # (D, D) float64: sum over features of x x^T

    @classmethod
    def empty(cls, dim: int) -> "FeatureStats":
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: np.ndarray | torch.Tensor) -> "FeatureStats":
        """Statistics of an (N, D) feature array."""
        stats = cls.empty(np.shape(features)[1])
        stats.add(features)
        return stats

    @property
    def dim(self) -> int:
        return len(self.sum)

    def add(self, features: np.ndarray | torch.Tensor) -> None:
        """Accumulate an (N, D) batch of features in place."""
        x = _float64(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) features, got shape {x.shape}")
        self.count += len(x)
        self.sum += x.sum(axis=0)
        self.outer_sum += x.T @ x

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Statistics of the union of both sets."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {self.dim}-d and {other.dim}-d feature statistics")
        return FeatureStats(self.count + other.count, self.sum + other.sum, self.outer_sum + other.outer_sum)

    def mean(self) -> np.ndarray:
        return self.sum / self.count

    def covariance(self) -> np.ndarray:
        """Unbiased sample covariance (what ``np.cov(features, rowvar=False)`` gives)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 features, got {self.count}")
        mean = self.mean()
        return (self.outer_sum - self.count * np.outer(mean, mean)) / (self.count - 1)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two feature sets: clean-fid's Frechet distance of their Gaussians."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim}")
    return float(_clean_fid_frechet_distance(a.mean(), a.covariance(), b.mean(), b.covariance()))


# --------------------------------------------------------------------------- KID


def sample_keys(ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """A uniform [0, 1) key per image id, fixed by (seed, id) alone.

    Keys decide which images a bounded KID sample keeps and which IS split an image falls in,
    so neither depends on worker count, order, or where the images are stored.
    """
    keys = np.empty(len(ids))
    for i, image_id in enumerate(ids):
        digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
        keys[i] = int.from_bytes(digest, "little") / 2.0**64
    return keys


@dataclass
class FeatureSample:
    """A uniform random sample of at most ``capacity`` features: those with the smallest keys."""

    capacity: int
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0))
    features: np.ndarray | None = None  # (k, D) float32, k <= capacity

    def add(self, keys: np.ndarray, features: np.ndarray | torch.Tensor) -> None:
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        features = np.asarray(features, dtype=np.float32)
        if self.features is not None:
            keys = np.concatenate([self.keys, keys])
            features = np.concatenate([self.features, features])
        keep = np.argsort(keys, kind="stable")[: self.capacity]
        self.keys, self.features = keys[keep], features[keep]

    def merge(self, other: "FeatureSample") -> "FeatureSample":
        merged = FeatureSample(min(self.capacity, other.capacity), self.keys, self.features)
        if other.features is not None:
            merged.add(other.keys, other.features)
        return merged

    def __len__(self) -> int:
        return len(self.keys)


def kernel_distance(
    features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> float:
    """KID as clean-fid computes it (``cleanfid.fid.kernel_distance``), with a seeded generator.

    Subsets of m = min(n1, n2, max_subset_size) features per side; kernel k(x, y) = (x.y/d + 1)^3.
    Computed in float64: the estimate is a difference of large kernel sums.
    """
    features1, features2 = _float64(features1), _float64(features2)
    rng = np.random.default_rng(seed)
    d = features1.shape[1]
    m = min(len(features1), len(features2), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per side, got {len(features1)} and {len(features2)}")
    total = 0.0
    for _ in range(num_subsets):
        x = features2[rng.choice(len(features2), m, replace=False)]
        y = features1[rng.choice(len(features1), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)


# --------------------------------------------------------------------------- IS


def split_of(keys: np.ndarray, splits: int) -> np.ndarray:
    """The IS split of each image: a random partition into ``splits`` parts (by key)."""
    return np.minimum((keys * splits).astype(np.int64), splits - 1)


@dataclass
class InceptionScoreStats:
    """Per split: image count, sum of p(y|x), and sum over images of sum_y p log p."""

    count: np.ndarray  # (S,) int64
    prob_sum: np.ndarray  # (S, C) float64
    neg_entropy_sum: np.ndarray  # (S,) float64

    @classmethod
    def empty(cls, splits: int, num_classes: int) -> "InceptionScoreStats":
        return cls(np.zeros(splits, np.int64), np.zeros((splits, num_classes)), np.zeros(splits))

    @property
    def splits(self) -> int:
        return len(self.count)

    def add(self, logits: np.ndarray | torch.Tensor, split: np.ndarray) -> None:
        """Accumulate a batch of class logits (N, C); ``split[i]`` is image i's split."""
        log_p = torch.log_softmax(torch.as_tensor(_float64(logits)), dim=1).numpy()
        p = np.exp(log_p)
        np.add.at(self.count, split, 1)
        np.add.at(self.prob_sum, split, p)
        np.add.at(self.neg_entropy_sum, split, (p * log_p).sum(axis=1))

    def merge(self, other: "InceptionScoreStats") -> "InceptionScoreStats":
        return InceptionScoreStats(
            self.count + other.count, self.prob_sum + other.prob_sum, self.neg_entropy_sum + other.neg_entropy_sum
        )

    def score(self) -> tuple[float, float]:
        """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's marginal."""
        if (self.count == 0).any():
            empty = int((self.count == 0).sum())
            raise ValueError(
                f"IS with {self.splits} splits: {empty} split(s) of the random partition got none of the "
                f"{int(self.count.sum())} fake images; give a smaller --is-splits (about 10 images per split)"
            )
        # E_x sum_y p log(p / p_bar) = E_x[sum_y p log p] - sum_y p_bar log p_bar, since E_x p = p_bar.
        marginal = self.prob_sum / self.count[:, None]
        marginal_term = np.where(marginal > 0, marginal * np.log(np.where(marginal > 0, marginal, 1.0)), 0.0)
        kl = self.neg_entropy_sum / self.count - marginal_term.sum(axis=1)
        scores = np.exp(kl)
        return float(scores.mean()), float(scores.std())


# --------------------------------------------------------------------------- one image set


@dataclass
class SetStatistics:
    """Everything the metrics need from one image set; merge the parts of a set with ``merge``."""

    images: FeatureStats
    classes: dict[str, FeatureStats] = field(default_factory=dict)  # per-class crops (--per-class)
    kid_sample: FeatureSample | None = None
    inception: InceptionScoreStats | None = None

    def merge(self, other: "SetStatistics") -> "SetStatistics":
        classes = dict(self.classes)
        for name, stats in other.classes.items():
            classes[name] = classes[name].merge(stats) if name in classes else stats
        return SetStatistics(
            self.images.merge(other.images),
            classes,
            _merge_optional(self.kid_sample, other.kid_sample),
            _merge_optional(self.inception, other.inception),
        )


def _merge_optional(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return a if b is None else b
    return a.merge(b)


def statistics_to_npz(stats: SetStatistics, meta: Mapping[str, Any]) -> bytes:
    """``.npz`` bytes of plain arrays (no pickle); ``meta`` is stored as a JSON string."""
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps({"format": STATS_FORMAT, **meta}, sort_keys=True))}
    arrays.update(_stats_arrays("images", stats.images))
    for name, class_stats in stats.classes.items():
        arrays.update(_stats_arrays(f"class/{name}", class_stats))
    if stats.kid_sample is not None and stats.kid_sample.features is not None:
        arrays["kid/keys"], arrays["kid/features"] = stats.kid_sample.keys, stats.kid_sample.features
        arrays["kid/capacity"] = np.array(stats.kid_sample.capacity)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def statistics_from_npz(data: bytes) -> tuple[SetStatistics, dict[str, Any]]:
    """Inverse of ``statistics_to_npz``; ValueError when the bytes are not such a file."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"not a feature statistics file ({type(err).__name__}: {err})") from None
    if meta.get("format") != STATS_FORMAT:
        raise ValueError(f"not a {STATS_FORMAT} file (format {meta.get('format')!r})")
    classes = {
        name.removeprefix("class/").removesuffix("/count"): _stats_from_arrays(arrays, name.removesuffix("/count"))
        for name in arrays
        if name.startswith("class/") and name.endswith("/count")
    }
    kid_sample = None
    if "kid/features" in arrays:
        kid_sample = FeatureSample(int(arrays["kid/capacity"]), arrays["kid/keys"], arrays["kid/features"])
    return SetStatistics(_stats_from_arrays(arrays, "images"), classes, kid_sample), meta


def _stats_arrays(prefix: str, stats: FeatureStats) -> dict[str, np.ndarray]:
    return {f"{prefix}/count": np.array(stats.count), f"{prefix}/sum": stats.sum, f"{prefix}/outer_sum": stats.outer_sum}


def _stats_from_arrays(arrays: Mapping[str, np.ndarray], prefix: str) -> FeatureStats:
    return FeatureStats(int(arrays[f"{prefix}/count"]), arrays[f"{prefix}/sum"], arrays[f"{prefix}/outer_sum"])


# --------------------------------------------------------------------------- comparing two sets


def compare_sets(
    real: SetStatistics,
    fake: SetStatistics,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    classes: Sequence[str] = (),
) -> dict[str, Any]:
    """``{"fid", "kid"?, "is"?, "per_class"?}`` of ``fake`` against ``real``.

    KID is computed when both sets carry a feature sample, IS when ``fake`` carries IS statistics,
    per-class FID for each of ``classes`` (``None`` for a class with fewer than two crops on a side).
    """
    for name, stats in (("real", real), ("fake", fake)):
        if stats.images.count < 2:
            raise ValueError(f"the {name} set has {stats.images.count} images; FID needs at least 2")
    result: dict[str, Any] = {"fid": frechet_distance(real.images, fake.images)}
    if real.kid_sample is not None and fake.kid_sample is not None:
        result["kid"] = kernel_distance(
            real.kid_sample.features, fake.kid_sample.features, kid_subsets, kid_subset_size, seed
        )
    if fake.inception is not None:
        mean, std = fake.inception.score()
        result["is"] = {"mean": mean, "std": std, "splits": fake.inception.splits}
    if classes:
        result["per_class"] = {}
        for name in classes:
            a, b = real.classes.get(name), fake.classes.get(name)
            counts = {"real_crops": a.count if a else 0, "fake_crops": b.count if b else 0}
            enough = min(counts.values()) >= 2
            result["per_class"][name] = {"fid": frechet_distance(a, b) if enough else None, **counts}
    return result
