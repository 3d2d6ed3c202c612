"""Detector evaluation: COCO AP in the paper's Table II layout (synth.detection_metrics, cytosynth eval-detector)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cytosynth.jobs.cli import main
from cytosynth.jobs.detection import format_table
from cytosynth.storage import (
    ShardWriter,
    detection_categories,
    encode_image,
    put_bytes,
    read_samples,
    shard_detection_samples,
    shard_url,
    stats_url,
    to_coco,
)
from cytosynth.synth.detector import build_fasterrcnn, save_detector
from cytosynth.synth.detection_metrics import coco_metrics, evaluate_detector

CLASSES = ("ASC-US", "ASC-H", "LSIL", "HSIL")
TILES, PER_SHARD, SIZE = 6, 3, 64


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, str]:
    """6 tiles (2 shards) with 1-3 abnormal boxes each, every class present; the same set as a
    COCO JSON plus an image folder; and a random-init 4-class Faster R-CNN file."""
    root = tmp_path_factory.mktemp("eval")
    shards, images = str(root / "shards"), str(root / "images")
    for shard in range(TILES // PER_SHARD):
        writer = ShardWriter(shards, shard)
        for tile in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
            image = np.random.default_rng(tile).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            cells = 1 + tile % 3
            writer.add(tile, image, {
                "boxes": [[4 + 20 * k, 6 + tile, 18 + 20 * k, 26 + tile + k] for k in range(cells)],
                "labels": [CLASSES[(tile + k) % 4] for k in range(cells)],
                "normal_boxes": [[40, 44, 60, 62]],
                "source": "synthetic",
            })
            put_bytes(f"{images}/{tile:09d}.png", encode_image(image))
        writer.commit()
    coco = str(root / "coco.json")
    put_bytes(coco, json.dumps(to_coco(read_samples(shards))).encode())
    torch.manual_seed(0)
    detector = str(root / "detector.safetensors")
    save_detector(build_fasterrcnn(5), detector)
    return {"shards": shards, "coco": coco, "images": images, "detector": detector, "root": str(root)}


class ReplayDetector(torch.nn.Module):
    """A detector whose outputs are fixed in advance, image after image (torchvision's output format)."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def no_detections(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}] * n


@pytest.mark.parametrize("labels", ["abnormal", "nilm"])
def test_ground_truth_detector_scores_100_and_silent_detector_scores_0(labelled, labels):
    categories = detection_categories(labels)
    samples = list(shard_detection_samples(labelled["shards"], labels))
    truth = [{**t, "scores": torch.ones(len(t["labels"]))} for _, t in samples]

    perfect = evaluate_detector(ReplayDetector(truth), samples, categories, batch_size=4, progress=False)
    assert perfect["mAP"] == perfect["mAP.5"] == perfect["mAP.75"] == 100.0
    assert set(perfect["AP"].values()) == {100.0}
    assert perfect["images"] == TILES

    silent = evaluate_detector(ReplayDetector(no_detections(TILES)), samples, categories, progress=False)
    assert silent["mAP"] == silent["mAP.5"] == silent["mAP.75"] == 0.0
    assert set(silent["AP"].values()) == {0.0}


def test_metrics_match_pycocotools_run_directly_per_class(labelled, tmp_path):
    """Noisy detections (jittered boxes, random scores, a wrong class, a spurious box) scored by
    coco_metrics and by pycocotools itself on the project's COCO export, one class at a time."""
    rng = np.random.default_rng(3)
    samples = list(read_samples(labelled["shards"]))
    ground_truth, detections, results = [], [], []
    for sample in samples:
        ann = sample["json"]
        boxes = np.asarray(ann["boxes"], float) + rng.normal(0, 1.5, (len(ann["boxes"]), 4))
        boxes = np.vstack([boxes, [30, 30, 50, 50]])
        labels = np.array([*ann["category_ids"], rng.integers(1, 5)])
        labels[0] = labels[0] % 4 + 1 if ann["tile_index"] == 4 else labels[0]  # one wrong class
        scores = rng.uniform(0.1, 1.0, len(labels))
        ground_truth.append({"width": SIZE, "height": SIZE, "boxes": ann["boxes"], "labels": ann["category_ids"]})
        detections.append({"boxes": boxes, "labels": labels, "scores": scores})
        results += [{"image_id": ann["tile_index"], "category_id": int(c), "score": float(s),
                     "bbox": [x0, y0, x1 - x0, y1 - y0]} for (x0, y0, x1, y1), c, s in zip(boxes.tolist(), labels, scores)]
    ours = coco_metrics(ground_truth, detections, detection_categories("abnormal"))

    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(to_coco(samples)))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        coco_dt = coco_gt.loadRes(results)

        def run(category_ids):
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
            evaluator.params.catIds = category_ids
            evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
            return evaluator.stats

    overall = run([1, 2, 3, 4])
    assert ours["mAP"] == pytest.approx(overall[0] * 100, abs=1e-9)
    assert ours["mAP.5"] == pytest.approx(overall[1] * 100, abs=1e-9)
    assert ours["mAP.75"] == pytest.approx(overall[2] * 100, abs=1e-9)
    for category_id, name in enumerate(CLASSES, start=1):
        assert ours["AP"][name] == pytest.approx(run([category_id])[0] * 100, abs=1e-9)
    assert 0 < ours["mAP"] < 100  # the noise made this a real test


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


SMALL = ("--image-size", "64", "--device", "cpu", "--quiet")


def test_cli_prints_table_ii_and_writes_json_the_same_from_shards_and_coco(labelled, tmp_path):
    reports = {}
    for source in ("shards", "coco"):
        data = ("--data", labelled["shards"]) if source == "shards" else ("--coco", labelled["coco"], "--images", labelled["images"])
        report = tmp_path / f"{source}.json"
        code, out, err = run_cli("eval-detector", "--detector", labelled["detector"], *data, *SMALL, "--json", str(report))
        assert code == 0, err
        header = next(line for line in out.splitlines() if line.startswith("Detector"))
        assert header.split() == ["Detector", "mAP", "mAP.5", "mAP.75", "|", *CLASSES]
        assert "detector.safetensors" in out
        reports[source] = json.loads(report.read_text())
    shards = reports["shards"]
    assert shards["images"] == TILES and shards["labels"] == "abnormal"
    assert sum(shards["boxes"].values()) == sum(1 + t % 3 for t in range(TILES))
    metrics = ("mAP", "mAP.5", "mAP.75", "AP", "images", "boxes")
    assert {m: reports["coco"][m] for m in metrics} == {m: shards[m] for m in metrics}


@pytest.fixture
def bad_inputs(labelled, tmp_path) -> dict[str, tuple[str, ...]]:
    broken_shards = str(tmp_path / "broken")
    put_bytes(shard_url(broken_shards, 0), b"not a tar archive" * 64)
    put_bytes(stats_url(broken_shards, 0), b'{"tiles": 1}')
    broken_detector = tmp_path / "broken.safetensors"
    broken_detector.write_bytes(b"\x00" * 100)
    empty_coco = tmp_path / "empty.json"
    empty_coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    detector = ("--detector", labelled["detector"])
    return {
        "no shards": (*detector, "--data", str(tmp_path / "nothing-here")),
        "empty set": (*detector, "--coco", str(empty_coco)),
        "unreadable shard": (*detector, "--data", broken_shards),
        "broken detector": ("--detector", str(broken_detector), "--data", labelled["shards"]),
        "missing annotation file": (*detector, "--coco", str(tmp_path / "missing.json")),
        "classes do not match": (*detector, "--data", labelled["shards"], "--labels", "nilm"),
    }


@pytest.mark.parametrize("case, message", [
    ("no shards", "no committed shards found"),
    ("empty set", "has no images"),
    ("unreadable shard", "cannot read shard"),
    ("broken detector", "not a readable safetensors file"),
    ("missing annotation file", "missing.json"),
    ("classes do not match", "predicts 4 object classes but --labels nilm scores 1"),
])
def test_bad_input_is_one_line_error_and_exit_2(bad_inputs, tmp_path, case, message):
    report = tmp_path / "report.json"
    code, out, err = run_cli("eval-detector", *bad_inputs[case], *SMALL, "--json", str(report))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not report.exists()  # nothing half-written


# --------------------------------------------------------------------------- augmentation-study

STUDY_TRAINING = ("--steps", "1", "--workers", "1", "--batch-size", "1", "--image-size", "64", "--device", "cpu",
                  "--loader-workers", "0", "--checkpoint-every", "10", "--sample-every", "10", "--quiet")


@pytest.fixture(scope="module")
def study(labelled) -> dict[str, object]:
    """One augmentation study on a local Ray (both train-detector runs share it): real = the labelled
    shards, synthetic = 3 more tiles, held-out set = the COCO export."""
    import ray

    synthetic = labelled["root"] + "/synthetic"
    writer = ShardWriter(synthetic, 0)
    for tile in range(100, 103):
        image = np.random.default_rng(tile).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        writer.add(tile, image, {"boxes": [[10, 10, 30, 34]], "labels": [CLASSES[tile % 4]], "source": "synthetic"})
    writer.commit()
    out = labelled["root"] + "/study"
    argv = ("augmentation-study", "--real", labelled["shards"], "--synthetic", synthetic, "--synthetic-fraction", "0.5",
            "--test-coco", labelled["coco"], "--test-images", labelled["images"], "--out", out, *STUDY_TRAINING)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=150 * 1024**2)
    try:
        code, stdout, stderr = run_cli(*argv)
    finally:
        ray.shutdown()
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "argv": argv}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_study_trains_both_arms_with_train_detector_and_reports_them(study):
    assert study["code"] == 0, study["stderr"]
    out = study["out"]
    # Each arm is a complete train-detector output, trained on its own data mix.
    jobs = {arm: json.loads((Path(out) / arm / "job.json").read_text())["config"] for arm in ("real", "real+synthetic")}
    assert {arm: job["job"] for arm, job in jobs.items()} == {"real": "train-detector", "real+synthetic": "train-detector"}
    assert jobs["real"]["synthetic_fraction"] == 0.0 and jobs["real"]["synthetic"] is None
    assert jobs["real+synthetic"]["synthetic_fraction"] == 0.5 and jobs["real+synthetic"]["synthetic"].endswith("synthetic")

    lines = study["stdout"].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Training data"))
    assert lines[header + 1].startswith("R: 6 ") and lines[header + 2].startswith("R: 6 + S: 6 ")  # f=0.5 of 6 real
    report = json.loads((Path(out) / "augmentation_study.json").read_text())
    assert [row["training_data"] for row in report["rows"]] == ["R: 6", "R: 6 + S: 6"]
    for row in report["rows"]:
        assert set(row["AP"]) == set(CLASSES) and row["images"] == TILES
        assert all(0 <= row[m] <= 100 for m in ("mAP", "mAP.5", "mAP.75"))
    with Image.open(Path(out) / "augmentation_study.png") as chart:
        assert chart.format == "PNG" and chart.width > 400 and chart.height > 200


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rerunning_the_study_skips_the_arms_already_finished(study):
    assert study["code"] == 0, study["stderr"]
    arms = [Path(study["out"]) / arm for arm in ("real", "real+synthetic")]
    trained = {path: (path.read_bytes(), path.stat().st_mtime_ns)
               for arm in arms for path in (arm / "detector.safetensors", arm / "metrics.jsonl", arm / "_SUCCESS")}
    report = json.loads((Path(study["out"]) / "augmentation_study.json").read_text())
    code, stdout, stderr = run_cli(*study["argv"])  # no Ray running: nothing may train
    assert code == 0, stderr
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in trained} == trained
    assert json.loads((Path(study["out"]) / "augmentation_study.json").read_text())["rows"] == report["rows"]


@pytest.mark.parametrize("change, message", [
    ({"--synthetic-fraction": "0"}, "strictly between 0 and 1"),
    ({"--synthetic-fraction": "1"}, "strictly between 0 and 1"),
    ({"--test": "nowhere"}, "no committed shards found at nowhere"),
])
def test_study_bad_input_fails_before_training(labelled, tmp_path, change, message):
    out = tmp_path / "study"
    options = {"--real": labelled["shards"], "--synthetic": labelled["shards"], "--synthetic-fraction": "0.5",
               "--test": labelled["shards"], "--out": str(out), **change}
    code, _, err = run_cli("augmentation-study", *(x for item in options.items() for x in item), *STUDY_TRAINING)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- coco_metrics against pycocotools


def pycocotools_ap(ground_truth: list[dict], detections: list[dict], category_ids: list[int]) -> np.ndarray:
    """COCOeval's own summary (stats[0..2]: AP, AP.5, AP.75 at all areas, 100 detections) on the
    same boxes, built without the project's code."""
    images = [{"id": i, "width": g["width"], "height": g["height"]} for i, g in enumerate(ground_truth, 1)]
    annotations, results = [], []
    for image_id, (g, d) in enumerate(zip(ground_truth, detections), 1):
        for (x0, y0, x1, y1), c in zip(np.asarray(g["boxes"], float).tolist(), g["labels"]):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(c),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for (x0, y0, x1, y1), c, s in zip(np.asarray(d["boxes"], float).tolist(), d["labels"], d["scores"]):
            results.append({"image_id": image_id, "category_id": int(c), "score": float(s),
                            "bbox": [x0, y0, x1 - x0, y1 - y0]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations,
                           "categories": [{"id": i, "name": CLASSES[i - 1]} for i in range(1, 5)]}
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.params.catIds = category_ids
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    return evaluator.stats * 100


def crowded_large_set(missing_class: int | None = None) -> tuple[list[dict], list[dict]]:
    """4 images of 512 px with 12 boxes each, small (16 px), medium (48 px) and large (150 px), and
    30 detections per image: the true boxes jittered, scored *below* 18 confident false boxes, so
    a cap of 10 (or 1) detections per image, or one area range, scores differently from COCO's
    "all areas, 100 detections". `missing_class`: that class has no ground truth (its detections stay)."""
    rng = np.random.default_rng(7)
    ground_truth, detections = [], []
    for _ in range(4):
        boxes, labels = [], []
        for k in range(12):
            side = (16, 48, 150)[k % 3]
            x0, y0 = (k % 4) * 128 + rng.uniform(0, 128 - min(side, 120)), (k // 4) * 170 + rng.uniform(0, 10)
            boxes.append([x0, y0, x0 + side, y0 + side])
            labels.append(1 + (k * 5 + int(rng.integers(0, 2))) % 4)
        boxes, labels = np.array(boxes), np.array(labels)
        found = boxes + rng.normal(0, 2.0, boxes.shape)
        false = rng.uniform(0, 400, (18, 2))
        false = np.hstack([false, false + rng.uniform(10, 100, (18, 2))])
        keep = labels != missing_class
        ground_truth.append({"width": 512, "height": 512, "boxes": boxes[keep], "labels": labels[keep]})
        detections.append({"boxes": np.vstack([found, false]),
                           "labels": np.concatenate([labels, rng.integers(1, 5, 18)]),
                           "scores": np.concatenate([rng.uniform(0.05, 0.5, 12), rng.uniform(0.6, 1.0, 18)])})
    return ground_truth, detections


def test_metrics_count_every_box_size_and_100_detections_per_image_as_pycocotools_does():
    ground_truth, detections = crowded_large_set()
    ours = coco_metrics(ground_truth, detections, detection_categories("abnormal"))
    overall = pycocotools_ap(ground_truth, detections, [1, 2, 3, 4])
    assert [ours[m] for m in ("mAP", "mAP.5", "mAP.75")] == pytest.approx(overall[:3].tolist(), abs=1e-9)
    for category_id, name in enumerate(CLASSES, start=1):
        assert ours["AP"][name] == pytest.approx(pycocotools_ap(ground_truth, detections, [category_id])[0], abs=1e-9)
    assert ours["mAP.5"] > 30  # the low-scored true boxes count: with 10 detections per image it is far lower


def test_a_class_without_boxes_has_no_ap_and_is_left_out_of_the_means():
    ground_truth, detections = crowded_large_set(missing_class=4)
    ours = coco_metrics(ground_truth, detections, detection_categories("abnormal"))
    assert ours["AP"]["HSIL"] is None and ours["boxes"]["HSIL"] == 0
    present = [ours["AP"][name] for name in CLASSES[:3]]
    assert all(ap > 5 for ap in present)
    assert ours["mAP"] == pytest.approx(np.mean(present), abs=1e-9)
    assert ours["mAP"] == pytest.approx(pycocotools_ap(ground_truth, detections, [1, 2, 3])[0], abs=1e-9)
    table = format_table([("detector.safetensors", ours)], "Detector").splitlines()[-1].split()
    assert table[-1] == "-" and table[1] == f"{ours['mAP']:.1f}"


def remapped_coco(coco: dict, drop: str | None = None) -> dict:
    """The same set with other category ids (names kept, order reversed), an extra "bacteria"
    class whose boxes sit on the cells, and optionally one class's boxes dropped."""
    new_ids = {1: 14, 2: 13, 3: 12, 4: 11}
    annotations = [{**a, "category_id": new_ids[a["category_id"]]} for a in coco["annotations"]
                   if drop is None or a["category_id"] != CLASSES.index(drop) + 1]
    bacteria = [{**a, "id": 1000 + a["id"], "category_id": 3} for a in coco["annotations"]]
    categories = [{"id": 3, "name": "bacteria"}] + [{"id": new_ids[c["id"]], "name": c["name"].lower()}
                                                     for c in coco["categories"]]
    return {**coco, "annotations": annotations + bacteria, "categories": categories}


def detector_ap_directly(labelled) -> np.ndarray:
    """AP of the labelled detector file on the image folder: torchvision's forward and pycocotools,
    none of the project's reading or scoring."""
    from cytosynth.synth.detection_metrics import load_detection_model

    coco = json.loads(Path(labelled["coco"]).read_text())
    model = load_detection_model(labelled["detector"], min_size=SIZE, max_size=SIZE)
    ground_truth, detections = [], []
    for info in coco["images"]:
        pixels = np.asarray(Image.open(Path(labelled["images"]) / info["file_name"]).convert("RGB"))
        with torch.inference_mode():
            out = model([torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255])[0]
        boxes = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        ground_truth.append({"width": SIZE, "height": SIZE, "labels": [a["category_id"] for a in boxes],
                             "boxes": [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in boxes)]})
        detections.append({k: out[k].numpy() for k in ("boxes", "labels", "scores")})
    return pycocotools_ap(ground_truth, detections, [1, 2, 3, 4])


def test_cli_map_is_the_detectors_coco_ap_and_coco_categories_are_matched_by_name(labelled, tmp_path):
    expected = detector_ap_directly(labelled)
    assert expected[1] > 0  # the random detector does find a box at IoU 0.5: a real number to match
    coco = tmp_path / "remapped.json"
    coco.write_text(json.dumps(remapped_coco(json.loads(Path(labelled["coco"]).read_text()))))
    for data in (("--data", labelled["shards"]), ("--coco", str(coco), "--images", labelled["images"])):
        report = tmp_path / "report.json"
        code, _, err = run_cli("eval-detector", "--detector", labelled["detector"], *data, *SMALL, "--json", str(report))
        assert code == 0, err
        metrics = json.loads(report.read_text())
        assert [metrics[m] for m in ("mAP", "mAP.5", "mAP.75")] == pytest.approx(expected[:3].tolist(), abs=1e-6)
        assert metrics["boxes"] == {name: 3 for name in CLASSES}  # no bacteria counted, none lost


def test_cli_shows_a_class_without_boxes_as_a_dash_and_leaves_it_out_of_the_means(labelled, tmp_path):
    coco = tmp_path / "no-hsil.json"
    coco.write_text(json.dumps(remapped_coco(json.loads(Path(labelled["coco"]).read_text()), drop="HSIL")))
    report = tmp_path / "report.json"
    code, out, err = run_cli("eval-detector", "--detector", labelled["detector"], "--coco", str(coco), "--images",
                             labelled["images"], *SMALL, "--json", str(report))
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("detector.safetensors")).split()
    assert row[-1] == "-" and "-" not in row[:-1]
    metrics = json.loads(report.read_text())
    assert metrics["AP"]["HSIL"] is None and metrics["boxes"]["HSIL"] == 0
    assert metrics["mAP"] == pytest.approx(np.mean([metrics["AP"][c] for c in CLASSES[:3]]), abs=1e-9)
