"""`cytosynth fid` end to end: parity with clean-fid, Ray replicas (one killed mid-run), KID, IS,
per-class FID, saved statistics, and bad input.

Images are small (64x64 "blobs": a random colour, gradient and noise per image; the fake set is
brighter) and few (20 per side); every extractor is a tiny random conv net scripted in this file.
clean-fid resizes everything to 299x299 all the same, which is where the CPU time goes.
One local Ray session serves the whole module.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cleanfid import fid as clean_fid
from PIL import Image
from conftest import FAKE_CREDENTIALS
from ray_processes import actor_processes
from test_metrics import direct_kid

from cytosynth import storage
from cytosynth.cluster.feature_replicas import featurize_sets
from cytosynth.evaluation.features import ExtractorFile, FeatureSettings, SetOptions
from cytosynth.jobs.cli import main
from cytosynth.storage.imagesets import list_image_units
from cytosynth.synth.extractors import clean_preprocess, load_feature_extractor
from cytosynth.synth.metrics import FeatureStats, sample_keys, split_of, statistics_from_npz

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

IMAGES_PER_SET, TILES_PER_SHARD, SIZE = 20, 5, 64
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- extractors


class TinyFeatures(torch.nn.Module):
    """12 features: mean and std of 6 random conv channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 5, stride=4)
        self.conv2 = torch.nn.Conv2d(6, 6, 3, stride=4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x / 128 - 1))))
        return 10 * torch.cat([h.mean((2, 3)), h.std((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class TinyFeaturesAndLogits(TinyFeatures):
    """(12 features, 5 class logits): the extractor contract that gives IS."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return features, self.head(features)


class InceptionShaped(torch.nn.Module):
    """Laid out like clean-fid's inception-2015-12-05.pt: `layers` (to N x 2048 x 1 x 1) and `output`."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(8, 2048, 1)
        )
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.layers(x).flatten(1))


def seeded(make: type[torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)  # TinyFeaturesAndLogits gets the same conv weights as TinyFeatures
    return make().eval()


def scripted(make: type[torch.nn.Module], path: Path) -> str:
    torch.jit.script(seeded(make)).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def extractors(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("extractors")
    exported = torch.export.export(
        seeded(TinyFeaturesAndLogits), (torch.zeros(2, 3, 299, 299),), dynamic_shapes=({0: torch.export.Dim("n")},)
    )
    torch.export.save(exported, str(folder / "tiny.pt2"))
    (folder / "broken.pt").write_bytes(b"this is not a TorchScript archive")
    return {
        "features": scripted(TinyFeatures, folder / "tiny.pt"),
        "logits": scripted(TinyFeaturesAndLogits, folder / "tiny_logits.pt"),
        "inception": scripted(InceptionShaped, folder / "inception-2015-12-05.pt"),
        "export": str(folder / "tiny.pt2"),
        "broken": str(folder / "broken.pt"),
    }


# --------------------------------------------------------------------------- image sets


def blob(rng: np.random.Generator, brighter: float, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 200, 3) + brighter
    gradient = rng.normal(0, 60, (2, 3))
    image = base + xx[..., None] * gradient[0] + yy[..., None] * gradient[1] + rng.normal(0, 20, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_set(root: Path, images: list[np.ndarray], annotations: list[dict] | None = None) -> dict[str, str]:
    """The same images as a folder of PNGs (`files`) and as a job output's shards (`shards`)."""
    (root / "files").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "files" / f"{i:03d}.png")
    write_shards(str(root / "shards"), images, annotations)
    return {"files": str(root / "files"), "shards": str(root / "shards")}


def write_shards(out: str, images: list[np.ndarray], annotations: list[dict] | None = None) -> None:
    for shard, start in enumerate(range(0, len(images), TILES_PER_SHARD)):
        writer = storage.ShardWriter(out, shard)
        for i in range(start, min(start + TILES_PER_SHARD, len(images))):
            writer.add(i, images[i], annotations[i] if annotations else {"boxes": [], "labels": []})
        writer.commit()


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("sets")
    real = [blob(np.random.default_rng(100 + i), 0) for i in range(IMAGES_PER_SET)]
    fake = [blob(np.random.default_rng(200 + i), 40) for i in range(IMAGES_PER_SET)]
    return {"real": write_set(root / "real", real), "fake": write_set(root / "fake", fake)}


@pytest.fixture(scope="module")
def ray_session():
    with pytest.MonkeyPatch.context() as env:  # replicas inherit credentials; runtime_env never holds them
        for name, value in FAKE_CREDENTIALS.items():
            env.setenv(name, value)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False,
                 logging_level="ERROR")
    yield
    ray.shutdown()


def clean_fid_score(real_dir: str, fake_dir: str, extractor_path: str) -> float:
    """clean-fid's own FID of two folders with a custom TorchScript extractor."""
    model = torch.jit.load(extractor_path).eval()
    return float(clean_fid.compute_fid(real_dir, fake_dir, mode="clean", custom_feat_extractor=model, device=CPU,
                                       num_workers=0, batch_size=8, verbose=False, use_dataparallel=False))


def direct_features(folder: str, extractor_path: str) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """(file names, features, logits) of a folder, computed here without the job."""
    names = sorted(os.listdir(folder))
    images = [np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names]
    with torch.no_grad():
        out = torch.jit.load(extractor_path)(clean_preprocess(images))
    features, logits = out if isinstance(out, tuple) else (out, None)
    return names, features.double().numpy(), None if logits is None else logits.double().numpy()


def fid_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "fid.json"
    assert main(["fid", *args, "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


def assert_rejected(code: int, capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """Exit 2 with one `error: ...` line naming each fragment."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0]
    return err[0]


# --------------------------------------------------------------------------- parity and merging


def test_two_ray_replicas_over_shards_equal_clean_fid_and_merge_to_one_process_statistics(
    ray_session, sets, extractors, s3_bucket, tmp_path
):
    fake_on_s3 = s3_bucket + "/fake"
    write_shards(fake_on_s3, [np.asarray(Image.open(p)) for p in sorted(Path(sets["fake"]["files"]).glob("*.png"))])
    saved = tmp_path / "real.npz"
    report = fid_json(tmp_path, "--real", sets["real"]["shards"], "--fake", fake_on_s3, "--workers", "2",
                      "--feature-extractor", extractors["features"], "--batch-size", "4", "--kid",
                      "--kid-max-features", "8", "--save-stats", str(saved))
    expected = clean_fid_score(sets["real"]["files"], sets["fake"]["files"], extractors["features"])
    assert expected > 1.0  # the sets differ: a relative comparison means something
    assert report["fid"] == pytest.approx(expected, rel=1e-6)
    assert report["real"]["images"] == report["fake"]["images"] == IMAGES_PER_SET

    # The real set's statistics, merged from the replicas, equal those of one process.
    merged, _ = statistics_from_npz(saved.read_bytes())
    extractor = ExtractorFile("torchscript", extractors["features"], Path(extractors["features"]).read_bytes())
    units = {"real": list_image_units(sets["real"]["shards"])}
    one = featurize_sets(units, extractor, {"real": SetOptions(kid_sample=8)}, FeatureSettings(batch_size=3),
                         progress=False)["real"]
    assert merged.images.count == one.images.count == IMAGES_PER_SET
    np.testing.assert_allclose(merged.images.sum, one.images.sum, rtol=1e-6)
    np.testing.assert_allclose(merged.images.outer_sum, one.images.outer_sum, rtol=1e-6)
    assert np.array_equal(merged.kid_sample.keys, one.kid_sample.keys)  # the same 8 images kept for KID


def test_fid_of_a_set_with_itself_is_zero(sets, extractors, tmp_path):
    report = fid_json(tmp_path, "--real", sets["real"]["files"], "--fake", sets["real"]["shards"],
                      "--feature-extractor", extractors["features"])
    assert abs(report["fid"]) < 1e-6


def test_folders_in_process_equal_clean_fid_and_the_export_program_equals_its_torchscript(sets, extractors, tmp_path):
    args = ("--real", sets["real"]["files"], "--fake", sets["fake"]["files"])
    scripted_report = fid_json(tmp_path, *args, "--feature-extractor", extractors["logits"])
    exported_report = fid_json(tmp_path, *args, "--feature-extractor", extractors["export"])
    expected = clean_fid_score(sets["real"]["files"], sets["fake"]["files"], extractors["features"])
    # TinyFeaturesAndLogits shares TinyFeatures' first layers and seed: the same features.
    assert scripted_report["fid"] == pytest.approx(expected, rel=1e-6)
    assert exported_report["fid"] == pytest.approx(expected, rel=1e-5)
    assert exported_report["feature_extractor"]["kind"] == "export"


def opening_a_fifo(pid: int) -> bool:
    """Whether a thread of `pid` is blocked opening a FIFO (Linux: waiting for the other end)."""
    try:
        return any(Path(f"/proc/{pid}/task/{tid}/wchan").read_text() == "wait_for_partner"
                   for tid in os.listdir(f"/proc/{pid}/task"))
    except OSError:  # the process or thread ended while looking
        return False


def test_a_replica_killed_mid_run_costs_nothing_but_time(ray_session, extractors, tmp_path):
    out = str(tmp_path / "single-tile-shards")
    for shard in range(12):
        writer = storage.ShardWriter(out, shard)
        writer.add(shard, blob(np.random.default_rng(shard), 0), {"boxes": [], "labels": []})
        writer.commit()
    units = {"fake": list_image_units(out)}
    extractor = ExtractorFile("torchscript", extractors["features"], Path(extractors["features"]).read_bytes())
    # The test holds one shard: in its place a FIFO, whose open waits until the test lets go. The
    # replica opening it is caught busy for certain, however fast or slow the machine.
    held, real = Path(out) / "shards" / "000005.tar", Path(out) / "shards" / "000005.tar.held"
    os.replace(held, real)
    os.mkfifo(held)
    killed: list[int] = []

    def kill_the_replica_reading_the_held_shard() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            reader = next((pid for pid, _ in actor_processes("FeatureReplica") if opening_a_fifo(pid)), None)
            if reader is not None:
                os.replace(real, held)  # first: the shard's retry opens the real file, not the FIFO
                os.kill(reader, signal.SIGKILL)
                killed.append(reader)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_replica_reading_the_held_shard, daemon=True)
    killer.start()
    options = {"fake": SetOptions(kid_sample=5)}
    survived = featurize_sets(units, extractor, options, FeatureSettings(batch_size=2), workers=2, progress=False)["fake"]
    killer.join(timeout=5)
    assert killed, "no replica was found reading the held shard"
    reference = featurize_sets(units, extractor, options, FeatureSettings(batch_size=2), progress=False)["fake"]
    assert survived.images.count == reference.images.count == 12  # every image exactly once
    np.testing.assert_allclose(survived.images.outer_sum, reference.images.outer_sum, rtol=1e-6)
    assert np.array_equal(survived.kid_sample.keys, reference.kid_sample.keys)


# --------------------------------------------------------------------------- KID and IS


def test_kid_and_is_equal_direct_computation_on_the_same_features(sets, extractors, tmp_path):
    report = fid_json(tmp_path, "--real", sets["real"]["files"], "--fake", sets["fake"]["files"],
                      "--feature-extractor", extractors["logits"], "--kid", "--is", "--is-splits", "2", "--seed", "7")
    _, real_features, _ = direct_features(sets["real"]["files"], extractors["logits"])
    names, fake_features, fake_logits = direct_features(sets["fake"]["files"], extractors["logits"])
    # Subsets of 1000 > 20 images: each subset is the whole set, so clean-fid's estimate is exact.
    assert report["kid"] == pytest.approx(clean_fid.kernel_distance(real_features, fake_features), rel=1e-5)

    split = split_of(sample_keys(names, seed=7), 2)  # the documented split rule: by image id and seed
    p = np.exp(fake_logits - fake_logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(p[split == s] * (np.log(p[split == s]) - np.log(p[split == s].mean(0))), 1)))
              for s in range(2)]
    assert report["is"]["mean"] == pytest.approx(np.mean(scores), rel=1e-5)
    assert report["is"]["std"] == pytest.approx(np.std(scores), rel=1e-4)
    assert report["is"]["splits"] == 2


def test_kid_sample_bounds_the_features_kept(sets, extractors, tmp_path):
    report = fid_json(tmp_path, "--real", sets["real"]["files"], "--fake", sets["fake"]["files"],
                      "--feature-extractor", extractors["features"], "--kid", "--kid-max-features", "10",
                      "--kid-subsets", "5")
    names, real_features, _ = direct_features(sets["real"]["files"], extractors["features"])
    _, fake_features, _ = direct_features(sets["fake"]["files"], extractors["features"])
    keep = np.argsort(sample_keys(names, seed=0))[:10]  # same file names on both sides: same ranks
    # Subsets of 10 of the 10 kept: every subset is the whole sample, so KID is its exact MMD.
    assert report["kid"] == pytest.approx(direct_kid(real_features[keep], fake_features[keep]), rel=1e-5)
    assert abs(report["kid"] - direct_kid(real_features, fake_features)) > 1e-6  # the bound took effect


def test_clean_fid_inception_file_gives_clean_fid_features_and_bias_free_logits(extractors):
    from cleanfid.inception_torchscript import InceptionV3W

    path = extractors["inception"]
    ours = load_feature_extractor(Path(path).read_bytes(), "inception", path)
    theirs = InceptionV3W(os.path.dirname(path), download=False, resize_inside=False).eval()
    batch = torch.rand(3, 3, 299, 299) * 255
    features, logits = ours(batch)
    with torch.no_grad():
        assert torch.allclose(features, theirs(batch), rtol=1e-6, atol=1e-6)
    base = torch.jit.load(path)
    assert torch.allclose(logits, features @ base.output.weight.T, rtol=1e-5, atol=1e-5)
    assert (ours.dim, ours.num_classes) == (2048, 1008)


# --------------------------------------------------------------------------- saved statistics


def test_saved_real_statistics_give_the_same_scores(sets, extractors, tmp_path):
    stats = tmp_path / "real.npz"
    args = ("--fake", sets["fake"]["files"], "--feature-extractor", extractors["features"], "--kid")
    direct = fid_json(tmp_path, "--real", sets["real"]["files"], *args, "--save-stats", str(stats))
    reused = fid_json(tmp_path, "--real-stats", str(stats), *args)
    assert reused["fid"] == pytest.approx(direct["fid"], rel=1e-12)
    assert reused["kid"] == pytest.approx(direct["kid"], rel=1e-12)
    assert reused["real"]["images"] == IMAGES_PER_SET


def test_statistics_of_another_extractor_are_refused(sets, extractors, tmp_path, capsys):
    stats = tmp_path / "real.npz"
    assert main(["fid", "--real", sets["real"]["files"], "--save-stats", str(stats),
                 "--feature-extractor", extractors["features"], "--quiet"]) == 0
    capsys.readouterr()
    code = main(["fid", "--real-stats", str(stats), "--fake", sets["fake"]["files"],
                 "--feature-extractor", extractors["logits"], "--quiet"])
    assert_rejected(code, capsys, "another feature extractor")


# --------------------------------------------------------------------------- per class


def box_tile(rng: np.random.Generator, boxes: list[list[int]], brighter: float) -> np.ndarray:
    tile = blob(rng, 0, size=320)
    for x0, y0, x1, y1 in boxes:  # a visible "cell" inside each box
        tile[y0:y1, x0:x1] = np.clip(tile[y0:y1, x0:x1].astype(int) + int(brighter) - 60, 0, 255)
    return tile


PER_CLASS_BOXES = [  # per tile: boxes (one on an edge, so its crop is shifted inside) and their classes
    ([[10, 12, 50, 60], [200, 180, 260, 240]], ["ASC-US", "HSIL"]),
    ([[150, 150, 190, 200]], ["ASC-US"]),
    ([[270, 5, 318, 40], [30, 250, 80, 300], [100, 100, 140, 150]], ["HSIL", "ASC-US", "LSIL"]),
    ([[120, 20, 170, 60]], ["HSIL"]),
]


def expected_crop(tile: np.ndarray, box: list[int], size: int = 256) -> np.ndarray:
    """The 256x256 window centred on the box, moved inside the tile at its edges."""
    height, width = tile.shape[:2]
    left = min(max((box[0] + box[2]) // 2 - size // 2, 0), width - size)
    top = min(max((box[1] + box[3]) // 2 - size // 2, 0), height - size)
    return tile[top : top + size, left : left + size]


@pytest.fixture(scope="module")
def boxed_sets(tmp_path_factory) -> dict[str, tuple[str, list[np.ndarray]]]:
    root = tmp_path_factory.mktemp("boxed")
    found = {}
    for side, seed, brighter in (("real", 1, 0), ("fake", 2, 80)):
        rng = np.random.default_rng(seed)
        tiles = [box_tile(rng, boxes, brighter) for boxes, _ in PER_CLASS_BOXES * 2]
        annotations = [{"boxes": boxes, "labels": labels} for boxes, labels in PER_CLASS_BOXES * 2]
        write_shards(str(root / side), tiles, annotations)
        found[side] = (str(root / side), tiles)
    return found


def test_per_class_statistics_are_those_of_exactly_the_crops_of_that_class(boxed_sets, extractors):
    url, tiles = boxed_sets["fake"]
    extractor = ExtractorFile("torchscript", extractors["features"], Path(extractors["features"]).read_bytes())
    stats = featurize_sets({"fake": list_image_units(url)}, extractor, {"fake": SetOptions(per_class=True)},
                           FeatureSettings(batch_size=4, threads=2), progress=False)["fake"]
    model = torch.jit.load(extractors["features"])
    assert set(stats.classes) == {"ASC-US", "HSIL", "LSIL"}
    for label, class_stats in stats.classes.items():
        crops = [expected_crop(tile, box) for tile, (boxes, labels) in zip(tiles, PER_CLASS_BOXES * 2)
                 for box, lab in zip(boxes, labels) if lab == label]
        with torch.no_grad():
            expected = FeatureStats.of(model(clean_preprocess(crops)))
        assert class_stats.count == len(crops)
        np.testing.assert_allclose(class_stats.sum, expected.sum, rtol=1e-5)
        np.testing.assert_allclose(class_stats.outer_sum, expected.outer_sum, rtol=1e-5)
    assert stats.images.count == len(tiles)  # whole tiles are featurised in the same pass


def test_per_class_table_and_json(boxed_sets, extractors, tmp_path, capsys):
    report = fid_json(tmp_path, "--real", boxed_sets["real"][0], "--fake", boxed_sets["fake"][0],
                      "--feature-extractor", extractors["features"], "--per-class")
    rows = report["per_class"]
    assert set(rows) == {"ASC-US", "ASC-H", "LSIL", "HSIL"}
    assert (rows["ASC-US"]["real_crops"], rows["ASC-US"]["fake_crops"]) == (6, 6)
    assert rows["ASC-US"]["fid"] > 0 and rows["HSIL"]["fid"] > 0
    assert rows["ASC-H"] == {"fid": None, "real_crops": 0, "fake_crops": 0}
    table = capsys.readouterr().out
    assert "FID" in table and "ASC-US" in table and len(table.splitlines()) < 25


# --------------------------------------------------------------------------- bad input


def test_empty_set_is_refused(extractors, sets, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["fid", "--real", str(tmp_path / "empty"), "--fake", sets["fake"]["files"],
                 "--feature-extractor", extractors["features"], "--json", str(tmp_path / "out.json")])
    assert_rejected(code, capsys, "no images", "empty")
    assert not (tmp_path / "out.json").exists()


def test_missing_inception_file_names_the_flag(sets, tmp_path, capsys):
    code = main(["fid", "--real", sets["real"]["files"], "--fake", sets["fake"]["files"],
                 "--inception", str(tmp_path / "inception-2015-12-05.pt")])
    assert_rejected(code, capsys, "--inception", "no such file")


def test_broken_extractor_file_is_refused(sets, extractors, capsys):
    code = main(["fid", "--real", sets["real"]["files"], "--fake", sets["fake"]["files"],
                 "--feature-extractor", extractors["broken"]])
    assert_rejected(code, capsys, "cannot load feature extractor", "broken.pt")


def test_is_without_logits_is_refused(sets, extractors, capsys):
    code = main(["fid", "--real", sets["real"]["files"], "--fake", sets["fake"]["files"],
                 "--feature-extractor", extractors["features"], "--is"])
    assert_rejected(code, capsys, "--is needs class logits")


def test_is_on_a_set_too_small_for_its_splits_names_the_minimum_before_any_work(sets, extractors, tmp_path, capsys):
    # 20 fake images: the default 10 splits need 100 (10 per split of the random partition).
    code = main(["fid", "--real", sets["real"]["files"], "--fake", sets["fake"]["files"],
                 "--feature-extractor", extractors["logits"], "--is", "--json", str(tmp_path / "out.json")])
    assert_rejected(code, capsys, "--is-splits 10 needs at least 100 fake images", "has 20: give --is-splits 2")
    assert not (tmp_path / "out.json").exists()


def test_per_class_needs_shards_and_tiles_as_large_as_the_crop(sets, extractors, capsys):
    code = main(["fid", "--real", sets["real"]["files"], "--fake", sets["fake"]["files"],
                 "--feature-extractor", extractors["features"], "--per-class"])
    assert_rejected(code, capsys, "--per-class needs shards")
    code = main(["fid", "--real", sets["real"]["shards"], "--fake", sets["fake"]["shards"],
                 "--feature-extractor", extractors["features"], "--per-class", "--quiet"])
    assert_rejected(code, capsys, "64x64", "smaller than the 256x256 crop")


def test_unreadable_shard_fails_the_ray_job_with_one_line(ray_session, sets, extractors, tmp_path, capsys):
    broken = tmp_path / "broken"
    write_shards(str(broken), [blob(np.random.default_rng(i), 0) for i in range(10)])
    (broken / "shards" / "000001.tar").write_bytes(b"\0garbage, not a tar" * 50)
    code = main(["fid", "--real", sets["real"]["shards"], "--fake", str(broken), "--workers", "2",
                 "--feature-extractor", extractors["features"], "--json", str(tmp_path / "out.json"), "--quiet"])
    assert_rejected(code, capsys, "cannot read shard", "000001.tar")
    assert not (tmp_path / "out.json").exists()
