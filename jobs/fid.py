"""`cytosynth fid`: FID (and KID, IS, per-class FID) of a synthetic image set against a real one."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from cytosynth import storage, synth
from cytosynth.storage.imagesets import list_image_units
from cytosynth.storage.jsonio import json_bytes
from cytosynth.synth import ABNORMAL_CLASSES, InvalidInputError

if TYPE_CHECKING:
    from cytosynth.evaluation.features import ExtractorFile
    from cytosynth.synth.metrics import SetStatistics


PREPROCESSING = "clean-fid clean: PIL bicubic resize to 299x299 per channel in float32, no re-quantisation"
CROP_SIZE = 256  # per-class crops: the editor's crop, centred on each box
# IS splits are a random partition of the fake set by image id (independent of the workers), so a
# split is only reliably non-empty with several images per split: at 10, P(an empty split) < 1e-3.
IMAGES_PER_IS_SPLIT = 10


def register(commands: argparse._SubParsersAction) -> None:
    fid = commands.add_parser("fid", help="FID/KID/IS of a synthetic image set against a real one")
    fid.add_argument("--real", help="real images: a folder of images, a job output, shard URLs; any fsspec URL")
    fid.add_argument("--fake", help="synthetic images, same forms as --real")
    fid.add_argument("--real-stats", help="statistics saved by --save-stats, used instead of featurising --real")
    fid.add_argument("--save-stats", help="write the real set's statistics to this .npz (then --fake is optional)")
    extractor = fid.add_mutually_exclusive_group()
    extractor.add_argument("--inception", help="clean-fid's Inception TorchScript file (inception-2015-12-05.pt)")
    extractor.add_argument("--feature-extractor", help="a TorchScript module or a torch.export program (.pt2)")
    fid.add_argument("--kid", action="store_true", help="also KID (keeps a sample of features per set)")
    fid.add_argument("--is", dest="inception_score", action="store_true", help="also the Inception Score of --fake")
    fid.add_argument("--per-class", action="store_true", help="also FID per class on 256x256 crops around boxes (shards)")
    fid.add_argument("--json", help="write the results to this JSON file")
    fid.add_argument("--batch-size", type=int, default=32, help="images per extractor call")
    fid.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets (clean-fid: 100)")
    fid.add_argument("--kid-subset-size", type=int, default=1000, help="KID: features per subset (clean-fid: 1000)")
    fid.add_argument("--kid-max-features", type=int, default=20_000,
                     help="KID: uniform sample of features kept per set (driver memory: N x D x 4 bytes per set)")
    fid.add_argument("--is-splits", type=int, default=10, help="IS: random splits of the fake set")
    fid.add_argument("--seed", type=int, default=0, help="seeds the KID subsets, the KID sample and the IS splits")
    fid.add_argument("--device", help="device with --workers 0 (default: cuda where available, else cpu)")
    fid.add_argument("--workers", type=int, default=0, help="0: run in this process; W >= 1: W Ray replicas")
    fid.add_argument("--ray-address", help="an existing Ray cluster (host:port, ray://host:port or auto)")
    fid.add_argument("--gpus-per-replica", type=float, help="GPUs per Ray replica, may be fractional "
                     "(default: 1 with a CUDA --device, else 0: CPU replicas)")
    fid.add_argument("--cpus-per-replica", type=int, default=1,
                     help="CPUs each replica reserves: threads resizing images (also with --workers 0)")
    fid.add_argument("--quiet", action="store_true", help="no progress bar")
    fid.set_defaults(run=run_fid)


def run_fid(args: argparse.Namespace) -> int:
    from cytosynth.cluster.feature_replicas import featurize_sets  # torch; Ray only with --workers
    from cytosynth.evaluation.features import FeatureSettings, SetOptions
    from cytosynth.synth.metrics import compare_sets, statistics_to_npz

    _check_args(args)
    device = args.device or synth.default_device()
    extractor = _read_extractor(args)
    loaded = extractor.load()  # fail fast, before Ray
    if args.inception_score and not loaded.num_classes:
        raise InvalidInputError(
            f"--is needs class logits: {extractor.name} returns features only; give --inception, "
            "or a --feature-extractor that returns (features, logits)"
        )
    fingerprint = {"kind": extractor.kind, "sha256": loaded.sha256, "dim": loaded.dim}
    real_stats = _load_real_stats(args, fingerprint) if args.real_stats else None

    sets, options = {}, {}
    if real_stats is None:
        sets["real"] = _units(args.real, args.per_class)
        options["real"] = SetOptions(args.per_class, args.kid_max_features if args.kid else 0)
    if args.fake:
        sets["fake"] = _units(args.fake, args.per_class)
        if args.inception_score:
            _check_is_splits(sets["fake"], args.is_splits, args.fake)
        options["fake"] = SetOptions(
            args.per_class, args.kid_max_features if args.kid else 0, args.is_splits if args.inception_score else 0
        )
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if device.startswith("cuda") else 0.0
    settings = FeatureSettings(args.batch_size, args.cpus_per_replica, args.seed, CROP_SIZE)
    stats = featurize_sets(
        sets, extractor, options, settings, device=device, workers=args.workers,
        ray_address=args.ray_address, gpus_per_replica=gpus, progress=not args.quiet,
    )
    real = real_stats or stats.get("real")
    if real is None:  # featurised sets are never empty (listing refuses), but a set may yield no images
        raise InvalidInputError(f"no images read from {args.real}")

    report: dict[str, Any] = {"real": _describe_set(args.real_stats or args.real, real)}
    if args.fake:
        fake = stats.get("fake")
        if fake is None:
            raise InvalidInputError(f"no images read from {args.fake}")
        try:
            metrics = compare_sets(real, fake, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                                   seed=args.seed, classes=ABNORMAL_CLASSES if args.per_class else ())
        except ValueError as err:  # too few images for a statistic
            raise InvalidInputError(str(err)) from None
        report = {**metrics, **report, "fake": _describe_set(args.fake, fake)}
    report["feature_extractor"] = {**fingerprint, "file": extractor.name}
    report["settings"] = {
        "preprocessing": PREPROCESSING, "seed": args.seed, "kid_subsets": args.kid_subsets,
        "kid_subset_size": args.kid_subset_size, "kid_max_features": args.kid_max_features,
        "per_class_crop": CROP_SIZE,
    }

    # Everything is computed: only now is anything written, each file whole.
    if args.save_stats:
        meta = {"extractor": fingerprint, "preprocessing": PREPROCESSING, "source": storage.redact(args.real),
                "per_class_crop": CROP_SIZE if args.per_class else None}
        storage.put_bytes(args.save_stats, statistics_to_npz(real, meta))
    if args.json:
        storage.put_bytes(args.json, json_bytes(storage.redact(report), indent=2) + b"\n")
    print(format_report(report, args))
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if bool(args.real) == bool(args.real_stats):
        raise InvalidInputError("give exactly one of --real URL and --real-stats FILE")
    if not args.fake and not args.save_stats:
        raise InvalidInputError("--fake URL is required (or --save-stats FILE to only featurise --real)")
    if args.save_stats and args.real_stats:
        raise InvalidInputError("--save-stats saves the statistics of --real; with --real-stats there is nothing new to save")
    if not (args.inception or args.feature_extractor):
        raise InvalidInputError(
            "no feature extractor: give --inception FILE (clean-fid's inception-2015-12-05.pt; nothing is "
            "downloaded) or --feature-extractor FILE (TorchScript or .pt2)"
        )
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--kid-subsets", args.kid_subsets, 1),
                               ("--kid-subset-size", args.kid_subset_size, 2), ("--kid-max-features", args.kid_max_features, 2),
                               ("--is-splits", args.is_splits, 1), ("--workers", args.workers, 0),
                               ("--cpus-per-replica", args.cpus_per_replica, 1)):
        if value < least:
            raise InvalidInputError(f"{flag} must be at least {least}, got {value}")


def _check_is_splits(units: list, splits: int, url: str) -> None:
    """Before any work: a fake set too small for --is-splits (when its size is known) is one line."""
    sizes = [unit.num_images for unit in units]
    if None in sizes:  # shards without stats: the count is known only once read (metrics checks again)
        return
    images, needed = sum(sizes), splits * IMAGES_PER_IS_SPLIT
    if images < needed:
        fits = max(1, images // IMAGES_PER_IS_SPLIT)
        raise InvalidInputError(
            f"--is with --is-splits {splits} needs at least {needed} fake images ({IMAGES_PER_IS_SPLIT} per split); "
            f"{url} has {images}: give --is-splits {fits}"
        )


def _read_extractor(args: argparse.Namespace) -> ExtractorFile:
    from cytosynth.evaluation.features import read_extractor_file  # torch

    if args.inception:
        return read_extractor_file(args.inception, "--inception", inception=True)
    return read_extractor_file(args.feature_extractor, "--feature-extractor")


def _units(url: str, per_class: bool) -> list:
    units = list_image_units(url)
    if per_class and units[0].kind != "shard":
        raise InvalidInputError(f"--per-class needs shards with box annotations; {url} is a folder of images")
    return units


def _load_real_stats(args: argparse.Namespace, fingerprint: dict[str, Any]) -> SetStatistics:
    from cytosynth.synth.metrics import statistics_from_npz  # torch

    path = args.real_stats
    try:
        stats, meta = statistics_from_npz(storage.get_bytes(path))
    except ValueError as err:
        raise InvalidInputError(f"--real-stats {path}: {err}") from None
    if meta.get("extractor") != fingerprint:
        saved = meta.get("extractor") or {}
        raise InvalidInputError(
            f"--real-stats {path} was computed with another feature extractor ({saved.get('kind')}, "
            f"sha256 {str(saved.get('sha256'))[:12]}..., {saved.get('dim')}-d), not this one "
            f"({fingerprint['kind']}, sha256 {fingerprint['sha256'][:12]}..., {fingerprint['dim']}-d)"
        )
    if args.kid and stats.kid_sample is None:
        raise InvalidInputError(f"--kid: {path} holds no KID features; save it with --kid")
    if args.per_class and meta.get("per_class_crop") != CROP_SIZE:
        raise InvalidInputError(f"--per-class: {path} holds no per-class statistics; save it with --per-class")
    return stats


def _describe_set(source: str, stats: SetStatistics) -> dict[str, Any]:
    return {"source": source, "images": stats.images.count}


def format_report(report: dict[str, Any], args: argparse.Namespace) -> str:
    """The one-screen summary printed at the end."""
    extractor = report["feature_extractor"]
    lines = [f"cytosynth fid ({extractor['kind']} {extractor['file']}, {extractor['dim']}-d features, clean-fid preprocessing)"]
    for side in ("real", "fake"):
        if side in report:
            lines.append(f"  {side:<6} {report[side]['images']:>8} images  {storage.redact(report[side]['source'])}")
    if "fid" in report:
        lines.append(f"  FID    {report['fid']:.6f}")
    if "kid" in report:
        lines.append(f"  KID    {report['kid']:.6f}   ({args.kid_subsets} subsets of up to {args.kid_subset_size})")
    if "is" in report:
        score = report["is"]
        lines.append(f"  IS     {score['mean']:.4f} +- {score['std']:.4f}   (fake set, {score['splits']} splits)")
    if "per_class" in report:
        lines.append(f"  per class, {CROP_SIZE}x{CROP_SIZE} crops centred on boxes:")
        lines.append(f"    {'class':<8} {'real':>6} {'fake':>6} {'FID':>12}")
        for name, row in report["per_class"].items():
            value = "-" if row["fid"] is None or math.isnan(row["fid"]) else f"{row['fid']:.4f}"
            lines.append(f"    {name:<8} {row['real_crops']:>6} {row['fake_crops']:>6} {value:>12}")
    if args.save_stats:
        lines.append(f"  saved real statistics to {storage.redact(args.save_stats)}")
    if args.json:
        lines.append(f"  wrote {storage.redact(args.json)}")
    return "\n".join(lines)
