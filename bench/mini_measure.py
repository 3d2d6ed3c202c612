"""The miniature's measurements, each made with the product's own commands on held-out phantom data.

- Table I analog: `cytosynth fid` (the cell classifier's features) of stage-1 tiles from the base
  model and from base + LoRA against real target tiles, and of a second real set (the floor).
- Edits: `cytosynth generate --normal-source real` edits real NILM tiles with the trained ACS and
  with the untrained one (`finetune-abnormal`'s initialisation: gates at zero); `cytosynth fid
  --per-class` against real crops of each class, of two disjoint real sets (their FID to each other
  is the floor; the second shows how far the reference alone moves a per-class FID); the classifier's
  accuracy on crops centred on the edited boxes (4 abnormal classes: chance 25%).
- Locality and annotation truth: every pixel outside the edited boxes equals the source tile; every
  box holds changed pixels; and a nucleus (`boxes_holding_a_nucleus`): a box of blank glass or
  cytoplasm alone is labelled abnormal but holds no cell.
- Table II analog: `cytosynth augmentation-study` (R vs R + S, Faster R-CNN, COCO AP) per seed; S
  is `generate`'s edits of held-out NILM tiles of R's size.
- The NILM detector: `cytosynth eval-detector --labels nilm` on held-out NILM tiles.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
from PIL import Image

from cytosynth import storage
from cytosynth.synth.phantom_classes import CELL_CLASSES, NILM_NUCLEUS_RADIUS
from cytosynth.synth.detector import optical_density
from cytosynth.synth.edit_check import largest_region
from cytosynth.synth.paste import edit_region
from cytosynth.synth.settings import SynthesisSettings

from mini_classifier import accuracy, predict
import mini_data

ABNORMAL_IDS = tuple(range(1, len(CELL_CLASSES)))  # CELL_CLASSES[0] is NILM


def _fid(cytosynth, real: str, fake: str, extractor: str, out: str, per_class: bool = False) -> dict:
    cytosynth("fid", "--real", real, "--fake", fake, "--feature-extractor", extractor, "--json", out,
              "--device", "cpu", "--quiet", *(["--per-class"] if per_class else []))
    with open(out) as fh:
        return json.load(fh)


def _generate(cytosynth, out: str, model_dir: str, study, *extra: str) -> str:
    cytosynth("generate", "--preset", "mini", "--model-dir", model_dir, "--out", out, "--steps",
              str(study.sample_steps), "--device", "cpu", "--quiet", *extra)
    return out


def edited_crops(url: str) -> tuple[list[np.ndarray], list[int], list[dict]]:
    """256 crops centred on every edited box of a generate output (`mini_data.centred_crop`), as the
    classifier's real crops are."""
    crops, labels, samples = [], [], []
    for sample in storage.read_samples(url):
        image, ann = sample["image"], sample["json"]
        samples.append({"image": image, "boxes": ann["boxes"], "labels": ann["labels"]})
        for box, label in zip(ann["boxes"], ann["labels"]):
            crops.append(mini_data.centred_crop(image, box))
            labels.append(CELL_CLASSES.index(label))
    return crops, labels, samples


def classifier_scores(logits: np.ndarray, labels: list[int], key: str) -> dict:
    """Accuracy 5-way over every crop, over the 4 abnormal classes on the abnormal crops, and per class."""
    labels_ = np.asarray(labels)
    abnormal = labels_ > 0
    return {key: len(labels), "accuracy_5_way": accuracy(logits, labels),
            "accuracy_4_abnormal": accuracy(logits[abnormal], list(labels_[abnormal]), ABNORMAL_IDS),
            "per_class": {CELL_CLASSES[c]: accuracy(logits[labels_ == c], [c] * int((labels_ == c).sum()), ABNORMAL_IDS)
                          for c in ABNORMAL_IDS}}


def vae_ceiling(bundle: str, crops: list[np.ndarray], labels: list[int], clf: str) -> dict:
    """The classifier on real cells passed through the bundle's VAE, as every edited crop is (encode
    the 256 crop, decode it): what an edit can score at best, whatever the ACS paints."""
    import torch

    from cytosynth.synth.models import load_bundle
    from cytosynth.synth.sampling import decode_latents, encode_images

    vae = load_bundle(bundle, preset="mini").vae.float()
    with torch.no_grad():
        rebuilt = [decode_latents(vae, encode_images(vae, np.stack(crops[i : i + 16])))
                   for i in range(0, len(crops), 16)]
    rebuilt = [c for batch in rebuilt for c in batch]
    return classifier_scores(predict(clf, rebuilt), labels, "cells")


def locality(samples: list[dict], sources: list[np.ndarray]) -> dict:
    """Pixels outside the edit regions (each box grown by the paste-back feather, synth.paste) vs
    the source tile each edited tile was made from; and how many changed pixels lie in the margins."""
    outside_changed, margin_changed, boxes_changed, boxes = 0, 0, 0, 0
    for sample in samples:
        image = sample["image"].astype(np.int16)
        size = image.shape[0]
        inside = np.zeros(image.shape[:2], bool)
        in_box = np.zeros(image.shape[:2], bool)
        painted = sample.get("painted_boxes", sample["boxes"])  # generate --boxes cell keeps them apart
        for box in painted:
            x0, y0, x1, y1 = edit_region(box, size, SynthesisSettings.feather)
            inside[y0:y1, x0:x1] = True
            in_box[box[1] : box[3], box[0] : box[2]] = True
        # The source is the real tile that matches outside the boxes (generate reads them in order).
        diffs = [np.abs(image - s.astype(np.int16)).max(axis=2) for s in sources]
        diff = min(diffs, key=lambda d: int(d[~inside].sum()))
        outside_changed += int((diff[~inside] > 0).sum())
        margin_changed += int((diff[inside & ~in_box] > 0).sum())
        for x0, y0, x1, y1 in painted:
            boxes += 1
            boxes_changed += int((diff[y0:y1, x0:x1] > 8).mean() > 0.05)
    return {"tiles": len(samples), "feather_px": SynthesisSettings.feather,
            "pixels_changed_outside_edit_regions": outside_changed,
            "pixels_changed_in_feather_margins": margin_changed, "boxes": boxes,
            "boxes_with_edited_pixels": boxes_changed}


# A nucleus: a connected region of total optical density (natural log, summed over RGB) above
# NUCLEUS_OD, halfway between the phantom's darkest cytoplasm on glass (~0.8) and its palest
# nucleus (phantom._OD_NUCLEUS, 2.45 x darkness 0.85, on glass: ~2.4), at least as large as the
# smallest normal nucleus it draws. Lymphocytes and debris (radius 5 px and less) are smaller.
NUCLEUS_OD = 1.5
MIN_NUCLEUS_AREA = np.pi * NILM_NUCLEUS_RADIUS[0] ** 2 * mini_data.SCALE**2


def largest_nucleus(image: np.ndarray, box) -> int:
    """Pixels in the largest nucleus-dark region inside `box` (0 when none)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return largest_region(optical_density(image[y0:y1, x0:x1]) > NUCLEUS_OD)


def boxes_holding_a_nucleus(samples: list[dict]) -> dict:
    """Per class: boxes, and how many hold a nucleus of at least MIN_NUCLEUS_AREA (every class's
    cell has one: ASC-US's is 2.5-3 x a normal one). Blank glass, cytoplasm alone or a speck: none."""
    counts = {c: {"boxes": 0, "with_nucleus": 0} for c in CELL_CLASSES[1:]}
    for sample in samples:
        for box, label in zip(sample["boxes"], sample["labels"]):
            if label in counts:
                counts[label]["boxes"] += 1
                counts[label]["with_nucleus"] += int(largest_nucleus(sample["image"], box) >= MIN_NUCLEUS_AREA)
    return counts


def _per_class(report: dict) -> dict:
    return {c: (row or {}).get("fid") for c, row in report.get("per_class", {}).items()}


def measure(out: str, paths: dict, study, cytosynth, log) -> dict:
    from miniature import threads_per_process

    m = os.path.join(out, "measure")
    os.makedirs(m, exist_ok=True)
    res: dict = {}
    # Table II's detectors train in the background while everything else is measured: three
    # one-thread processes share the two cores (RESULTS.md, tenth run: the study's 60 minutes).
    table2 = table2_started(m, paths, os.path.join(out, "bundle"), study, cytosynth)
    try:
        with threads_per_process(1):
            _measure_all_but_table2(out, paths, study, cytosynth, log, res)
    except BaseException:
        for _, process in table2:
            process.terminate()
        raise
    res["table2"] = table2_finished(table2)
    res["annotation_truth"]["Table II's S"] = boxes_holding_a_nucleus(edited_crops(os.path.join(m, "edits_detector"))[2])
    _save_partial(m, res)
    figures(out, res)
    return {k: v for k, v in res.items() if not k.startswith("_")}


def _measure_all_but_table2(out: str, paths: dict, study, cytosynth, log, res: dict) -> None:
    clf = os.path.join(out, "classifier.pt2")
    bundle, bundle_base = os.path.join(out, "bundle"), os.path.join(out, "bundle_base")
    m = os.path.join(out, "measure")
    # Table I: stage-1 tiles, base vs base + LoRA vs the real-vs-real floor.
    stage1 = ["--normal-source", "diffusion", "--tile-size", str(mini_data.STAGE1_TILE), "--cells", "0-0",
              "--num-tiles", str(study.table1_tiles), "--seed", "1"]
    for arm, model in (("base", bundle_base), ("base+lora", bundle)):
        _generate(cytosynth, os.path.join(m, f"stage1_{arm}"), model, study, *stage1)
    res["table1"] = {
        arm: _fid(cytosynth, paths["real_a"], fake, clf, os.path.join(m, f"fid_stage1_{arm}.json"))["fid"]
        for arm, fake in (("base", os.path.join(m, "stage1_base")), ("base+lora", os.path.join(m, "stage1_base+lora")),
                          ("real vs real", paths["real_b"]))
    }
    log(f"Table I: {res['table1']}")
    _save_partial(m, res)

    # Edits of real NILM tiles: trained ACS vs untrained ACS.
    edit = ["--normal-source", "real", "--real-tiles", paths["edit_sources"], "--tile-size",
            str(mini_data.EDIT_TILE), "--cells", study.edit_cells, "--tiles-per-shard", "8", "--seed", "2"]
    _generate(cytosynth, os.path.join(m, "edits_trained"), bundle, study, *edit)
    _generate(cytosynth, os.path.join(m, "edits_untrained"), bundle, study, *edit,
              "--acs-unet", os.path.join(out, "acs_untrained"))
    fids, acc, truth = {}, {}, {}
    for arm in ("trained", "untrained"):
        fids[arm] = _fid(cytosynth, paths["test_a"], os.path.join(m, f"edits_{arm}"), clf,
                         os.path.join(m, f"fid_edits_{arm}.json"), per_class=True)
        crops, labels, samples = edited_crops(os.path.join(m, f"edits_{arm}"))
        acc[arm] = classifier_scores(predict(clf, crops), labels, "edits")
        truth[arm] = boxes_holding_a_nucleus(samples)
        if arm == "trained":
            sources = [np.asarray(Image.open(os.path.join(paths["edit_sources"], n)).convert("RGB"))
                       for n in sorted(os.listdir(paths["edit_sources"]))]
            res["locality"] = locality(samples, sources)
            res["_grid_edits"] = (crops, labels)
        else:
            res["_grid_untrained"] = (crops, labels)
    # The same edits with `generate --empty-edits drop`: what a user who wants only boxes that hold a
    # cell gets (an edit that paints no nucleus is not pasted and its cell stays a NILM box).
    _generate(cytosynth, os.path.join(m, "edits_trained_drop"), bundle, study, *edit, "--empty-edits", "drop")
    crops, labels, samples = edited_crops(os.path.join(m, "edits_trained_drop"))
    truth["trained, --empty-edits drop"] = boxes_holding_a_nucleus(samples)
    if crops:
        acc["trained, --empty-edits drop"] = classifier_scores(predict(clf, crops), labels, "edits")
    fids["floor"] = _fid(cytosynth, paths["test_a"], paths["test_b"], clf, os.path.join(m, "fid_edits_floor.json"),
                         per_class=True)
    # The same edits against the floor's other real set: with 6-15 real crops a class, a per-class
    # FID moves by several units with its reference (RESULTS.md, the eleventh run's probes), so a
    # gap between the arms counts only where both references agree on its sign.
    for arm in ("trained", "untrained"):
        fids[f"{arm}, against test_b"] = _fid(cytosynth, paths["test_b"], os.path.join(m, f"edits_{arm}"), clf,
                                              os.path.join(m, f"fid_edits_{arm}_test_b.json"), per_class=True)
    res["edit_fid"] = {arm: {"all": r.get("fid"), **_per_class(r)} for arm, r in fids.items()}
    test_tiles = mini_data.abnormal_tiles("test_a", study.sizes.abnormal_test // 2)
    real_crops, real_labels = mini_data.cell_crops(test_tiles)
    acc["real held-out"] = classifier_scores(predict(clf, real_crops), real_labels, "cells")
    acc["real held-out, through the VAE"] = vae_ceiling(bundle, real_crops, real_labels, clf)
    res["edit_accuracy"] = acc
    truth["real held-out"] = boxes_holding_a_nucleus(
        [{"image": t.image, "boxes": t.boxes, "labels": t.labels} for t in test_tiles])
    res["annotation_truth"] = truth
    res["_grid_real"] = ([c for c, l in zip(real_crops, real_labels) if l > 0], [l for l in real_labels if l > 0])
    log(f"edits: FID {res['edit_fid']}, accuracy {acc}")

    # The demo: the README's command on the shipped-to-be bundle, and the full two-stage path.
    _generate(cytosynth, os.path.join(m, "demo_phantom"), bundle, study, "--normal-source", "phantom",
              "--tile-size", str(mini_data.EDIT_TILE), "--num-tiles", "8")
    _generate(cytosynth, os.path.join(m, "demo_diffusion"), bundle, study, "--normal-source", "diffusion",
              "--tile-size", str(mini_data.STAGE1_TILE), "--num-tiles", "8", "--cells", "1-2",
              "--detector", os.path.join(out, "nilm_detector", "detector.safetensors"))
    figures(out, res)
    _save_partial(m, res)

    # The NILM detector, on held-out NILM tiles.
    nilm_json = os.path.join(m, "nilm_detector.json")
    cytosynth("eval-detector", "--detector", os.path.join(out, "nilm_detector", "detector.safetensors"),
              "--data", paths["real_a_shards"], "--labels", "nilm", "--image-size", str(mini_data.STAGE1_TILE),
              "--device", "cpu", "--json", nilm_json, "--quiet")
    res["nilm_detector"] = {k: v for k, v in json.load(open(nilm_json)).items() if k in ("mAP", "mAP.5", "AP", "images")}
    _save_partial(m, res)


def table2_started(m: str, paths: dict, bundle: str, study, cytosynth) -> list[tuple[str, "subprocess.Popen"]]:
    """Start `cytosynth augmentation-study` for every seed side by side, one thread each (R vs R + S,
    Faster R-CNN from scratch, COCO AP on the held-out tiles); (folder, process) per seed.

    S: edits of NILM tiles of R's size with as many abnormal cells as R's tiles hold (1-3), so that
    both reach the detector at one scale (it resizes every tile to --image-size), boxed as R is: each
    cell's own extent (--boxes cell), not the normal cell's box it was painted in. Each arm trains the
    paper's 20 epochs over R, S's share on top, so R + S takes twice R's steps (RESULTS.md, ninth run)."""
    from miniature import cytosynth_started, harness_options, threads_per_process

    synthetic = _generate(cytosynth, os.path.join(m, "edits_detector"), bundle, study, "--normal-source", "real",
                          "--real-tiles", paths["detector_sources"], "--tile-size", str(mini_data.LABELLED_TILE),
                          "--cells", "1-3", "--boxes", "cell", "--seed", "3")
    started = []
    with threads_per_process(1):
        for seed in study.detector_seeds:
            folder = os.path.join(m, f"table2_seed{seed}")
            started.append((folder, cytosynth_started(
                f"{folder}.log", "augmentation-study", "--real", paths["detector_real"], "--synthetic", synthetic,
                "--synthetic-fraction", "0.5", "--labels", "abnormal", "--image-size", "256", "--loader-workers", "1",
                "--test", paths["test"], "--out", folder,
                *harness_options(2, study.detector_lr, epochs=study.detector_epochs),
                "--max-grad-norm", str(study.detector_max_grad_norm),
                "--roi-samples", str(study.detector_roi_samples), "--seed", str(seed))))
    return started


def table2_finished(started: list[tuple[str, "subprocess.Popen"]]) -> list[dict]:
    """Wait for every seed's augmentation-study; their reports, in seed order."""
    reports = []
    for folder, process in started:
        if process.wait() != 0:
            raise subprocess.CalledProcessError(process.returncode, process.args, f"see {folder}.log")
        with open(os.path.join(folder, "augmentation_study.json")) as fh:
            reports.append(json.load(fh))
    return reports


def _save_partial(folder: str, res: dict) -> None:
    """What is measured so far (a run stopped mid-way still leaves its figures)."""
    with open(os.path.join(folder, "partial.json"), "w") as fh:
        json.dump({k: v for k, v in res.items() if not k.startswith("_")}, fh, indent=2, default=str)


def figures(out: str, res: dict) -> None:
    from PIL import ImageDraw

    fig = os.path.join(out, "figures")
    os.makedirs(fig, exist_ok=True)
    for name in ("demo_phantom", "demo_diffusion", "stage1_base", "stage1_base+lora"):
        src = os.path.join(out, "measure", name, "preview.png")
        if os.path.exists(src):
            shutil.copy2(src, os.path.join(fig, f"{name}.png"))
    # One row per abnormal class: real crops | trained-ACS edits | untrained-ACS edits (centre 128 px).
    k, px = 4, 128
    sets = [res["_grid_real"], res["_grid_edits"], res["_grid_untrained"]]
    grid = Image.new("RGB", (3 * k * px + 2 * 8 + 70, len(ABNORMAL_IDS) * px + 20), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(("real", "edited (trained ACS)", "edited (untrained ACS)")):
        draw.text((70 + j * (k * px + 8), 4), title, fill="black")
    for r, cls in enumerate(ABNORMAL_IDS):
        draw.text((4, 20 + r * px + px // 2), CELL_CLASSES[cls], fill="black")
        for j, (crops, labels) in enumerate(sets):
            chosen = [c for c, l in zip(crops, labels) if l == cls][:k]
            for i, crop in enumerate(chosen):
                centre = crop[64:192, 64:192]
                grid.paste(Image.fromarray(np.ascontiguousarray(centre)), (70 + j * (k * px + 8) + i * px, 20 + r * px))
    grid.save(os.path.join(fig, "edits_per_class.png"))
    # AP bars: the product's Table II chart, with each arm's mean over the seeds.
    if res.get("table2"):
        from cytosynth.jobs.detection import ap_bar_chart

        with open(os.path.join(fig, "table2_ap.png"), "wb") as fh:
            fh.write(ap_bar_chart(mean_rows(res["table2"])))


def mean_rows(table2: list[dict]) -> list[tuple[str, dict]]:
    """(label, metrics) per arm with mAP and per-class AP averaged over the seeds (None stays None)."""
    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    rows = []
    for i, row in enumerate(table2[0]["rows"]):
        arms = [t["rows"][i] for t in table2]
        label = f"{row['training_data']} (mean of {len(table2)} seeds)"
        rows.append((label, {"mAP": mean([a["mAP"] for a in arms]),
                             "AP": {c: mean([a["AP"][c] for a in arms]) for c in row["AP"]}}))
    return rows


def report(records: dict) -> str:
    """results.md: the tables in markdown."""
    r = records["measure"]
    lines = ["| Table I analog (FID, classifier features; lower is better) | FID |", "| --- | --- |"]
    lines += [f"| {arm} | {v:.2f} |" for arm, v in r["table1"].items()]
    lines += ["", "| edits: per-class FID vs real crops | all | " + " | ".join(CELL_CLASSES[1:]) + " |",
              "| --- |" + " --- |" * (len(CELL_CLASSES))]
    for arm, row in r["edit_fid"].items():
        lines.append(f"| {arm} | " + " | ".join("-" if row.get(c) is None else f"{row[c]:.2f}" for c in ("all", *CELL_CLASSES[1:])) + " |")
    lines += ["", "| classifier accuracy | crops | 4 abnormal classes (chance 25%) | 5-way | "
              + " | ".join(CELL_CLASSES[1:]) + " |", "| --- |" + " --- |" * (3 + len(ABNORMAL_IDS))]
    for arm, row in r["edit_accuracy"].items():
        n = row.get("edits", row.get("cells"))
        per_class = [f"{row['per_class'][CELL_CLASSES[c]]:.0%}" for c in ABNORMAL_IDS]
        lines.append(f"| {arm} | {n} | {row['accuracy_4_abnormal']:.1%} | {row['accuracy_5_way']:.1%} | "
                     + " | ".join(per_class) + " |")
    lines += ["", f"locality: {r.get('locality')}", ""]
    lines += annotation_truth_lines(r.get("annotation_truth", {}))
    lines += ["", f"NILM detector: {r.get('nilm_detector')}", ""]
    lines += table2_lines(r.get("table2", []))
    return "\n".join(lines) + "\n"


def annotation_truth_lines(truth: dict) -> list[str]:
    if not truth:
        return []
    lines = ["| boxes holding a nucleus (annotation truth) | all | " + " | ".join(CELL_CLASSES[1:]) + " |",
             "| --- |" + " --- |" * len(CELL_CLASSES)]
    for arm, counts in truth.items():
        held, boxes = (sum(c[k] for c in counts.values()) for k in ("with_nucleus", "boxes"))
        lines.append(f"| {arm} | {held}/{boxes} | "
                     + " | ".join(f"{c['with_nucleus']}/{c['boxes']}" for c in counts.values()) + " |")
    return lines


def table2_lines(table2: list[dict]) -> list[str]:
    if not table2:
        return []
    classes = list(table2[0]["rows"][0]["AP"])
    lines = ["| Table II analog (AP x 100, mean ± sd over seeds) | mAP | mAP.5 | " + " | ".join(classes) + " |",
             "| --- |" + " --- |" * (2 + len(classes))]
    for i, row in enumerate(table2[0]["rows"]):
        def stat(get):
            values = [get(t["rows"][i]) for t in table2]
            values = [v for v in values if v is not None]
            return "-" if not values else f"{np.mean(values):.1f} ± {np.std(values):.1f}"

        cells = [stat(lambda x: x["mAP"]), stat(lambda x: x.get("mAP.5"))]
        cells += [stat(lambda x, c=c: x["AP"][c]) for c in classes]
        lines.append(f"| {row['training_data']} | " + " | ".join(cells) + " |")
    return lines
