"""The miniature's data: labelled phantom sets with known truth, written the way real data comes.

Every set is drawn by `synth.phantom_classes.draw_labelled_tile` from its own seed range, so the
sets are disjoint (held-out really is held out). Tiles are written as a user would bring them:
folders of PNGs (normal tiles for finetune-normal and generate --real-tiles) and cytosynth
shards with boxes and classes (finetune-abnormal, train-detector, eval-detector, fid --per-class).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cytosynth import storage
from cytosynth.synth.phantom_classes import BASE_STYLES, CELL_CLASSES, NILM, TARGET_STYLE, draw_labelled_tile

# The paper's magnification (x20, 1024x1024 tiles): cells as in draw_phantom_tile(seed, 1024),
# everywhere. At half of it (the first five runs) a normal nucleus was 7 px across, one latent pixel
# under the VAE's 8x downsampling, and the shipped VAE lost what tells LSIL apart (bench/RESULTS.md,
# "Sixth full run").
SCALE = 1.0
STAGE1_TILE = 256  # stage-1 tiles (32x32 latents): a 256 field of the slide, one to three cells
LABELLED_TILE = 512  # labelled tiles with abnormal cells (ACS crops, classifier, detector R and test)
EDIT_TILE = int(1024 * SCALE)  # tiles whose cells are edited: the paper's 1024 (phantom source: same scale)
PER_SHARD = 16


@dataclass(frozen=True)
class Sizes:
    """How many tiles each set holds."""

    base: int  # base-domain 256 tiles, many styles (base pretraining)
    target_nilm: int  # target-style 256 NILM tiles (finetune-normal, NILM detector)
    target_real: int  # per real-vs-real set of 256 NILM tiles (Table I), two disjoint sets
    abnormal_train: int  # labelled tiles with abnormal cells (ACS, classifier, detector R)
    detector_real: int  # R: the first tiles of abnormal_train the Table II detectors get
    abnormal_test: int  # held-out labelled tiles with abnormal cells, two halves for the floor
    edit_sources: int  # 1024 NILM tiles that generate edits (--normal-source real)


# Seed ranges: one block of 100k seeds per set, so no two sets share a tile.
SEED_BLOCKS = {"base": 0, "target_nilm": 1, "real_a": 2, "real_b": 3, "abnormal_train": 4,
               "test_a": 5, "test_b": 6, "edit_sources": 7, "classifier_val": 8,
               "detector_sources": 9}


def seeds(block: str, count: int) -> range:
    start = SEED_BLOCKS[block] * 100_000
    return range(start, start + count)


def write_png_folder(folder: str, tiles: list[np.ndarray]) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, tile in enumerate(tiles):
        Image.fromarray(tile).save(os.path.join(folder, f"tile_{i:05d}.png"))
    return folder


def base_tiles(count: int) -> tuple[list[np.ndarray], list[str]]:
    """Base-domain tiles (NILM and some abnormal cells, every base style in turn) and their captions."""
    tiles, captions = [], []
    for i, seed in enumerate(seeds("base", count)):
        style = BASE_STYLES[i % len(BASE_STYLES)]
        tiles.append(draw_labelled_tile(seed, STAGE1_TILE, scale=SCALE, style=style, abnormal=(0, 1)).image)
        captions.append(style.caption)
    return tiles, captions


def nilm_tiles(block: str, count: int, size: int) -> list:
    """Target-style tiles with NILM cells only (LabelledTile, boxes included)."""
    return [draw_labelled_tile(s, size, scale=SCALE, style=TARGET_STYLE, abnormal=(0, 0)) for s in seeds(block, count)]


def abnormal_tiles(block: str, count: int) -> list:
    """Target-style labelled tiles with 1-3 abnormal cells each among NILM cells."""
    return [draw_labelled_tile(s, LABELLED_TILE, scale=SCALE, abnormal=(1, 3)) for s in seeds(block, count)]


def write_labelled_shards(out: str, tiles: list) -> str:
    """Committed cytosynth shards: abnormal boxes + classes, NILM boxes as normal_boxes."""
    for shard in range(-(-len(tiles) // PER_SHARD)):
        writer = storage.ShardWriter(out, shard)
        for index in range(shard * PER_SHARD, min(len(tiles), (shard + 1) * PER_SHARD)):
            tile = tiles[index]
            boxes, labels = tile.abnormal()
            writer.add(index, tile.image, {"boxes": boxes, "labels": labels, "normal_boxes": tile.normal_boxes(),
                                           "source": "real", "seed": index, "style": tile.style.name})
        writer.commit()
    return out


def write_nilm_shards(out: str, tiles: list) -> str:
    """Shards of NILM-only tiles, every cell a normal box (train-detector --labels nilm)."""
    for shard in range(-(-len(tiles) // PER_SHARD)):
        writer = storage.ShardWriter(out, shard)
        for index in range(shard * PER_SHARD, min(len(tiles), (shard + 1) * PER_SHARD)):
            tile = tiles[index]
            writer.add(index, tile.image, {"boxes": [], "labels": [], "normal_boxes": tile.normal_boxes(),
                                           "source": "real", "seed": index})
        writer.commit()
    return out


def centred_crop(image: np.ndarray, box, side: int = 256) -> np.ndarray:
    """The side x side window centred on the box, glass (the tile's median colour) where it runs off.

    The classifier looks at the centre of what it is given (mini_classifier.Front); a crop clamped
    to the tile (as the ACS and fid --per-class take them) moves a cell near the tile's edge out of
    that centre: most cells of a labelled tile lie within 128 px of an edge.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    half = side // 2
    glass = np.median(image.reshape(-1, 3), axis=0).astype(image.dtype)
    padded = np.empty((image.shape[0] + side, image.shape[1] + side, 3), image.dtype)
    padded[:] = glass
    padded[half : half + image.shape[0], half : half + image.shape[1]] = image
    cx, cy = (x0 + x1) // 2 + half, (y0 + y1) // 2 + half
    return padded[cy - half : cy + half, cx - half : cx + half]


def cell_crops(tiles: list, crop: int = 256) -> tuple[list[np.ndarray], list[int]]:
    """Crops centred on every cell (`centred_crop`) and their class indices into CELL_CLASSES."""
    images, labels = [], []
    for tile in tiles:
        for box, label in zip(tile.boxes, tile.labels):
            images.append(centred_crop(tile.image, box, crop))
            labels.append(CELL_CLASSES.index(label))
    return images, labels


SETS = ("base", "target_nilm", "target_nilm_shards", "real_a", "real_a_shards", "real_b", "abnormal_train",
        "detector_real", "detector_sources", "test_a", "test_b", "test", "edit_sources")


def write_all(root: str, sizes: Sizes) -> dict[str, str]:
    """Every set under `root`; returns their paths by name. Re-running with the same sizes reuses them."""
    done = os.path.join(root, "DONE.json")
    if os.path.exists(done):
        with open(done) as fh:
            record = json.load(fh)
        if record.get("scale") == SCALE and record["sizes"] == sizes.__dict__ and set(record["paths"]) == set(SETS):
            return record["paths"]
    p = {name: os.path.join(root, name) for name in SETS}
    tiles, captions = base_tiles(sizes.base)
    write_png_folder(p["base"], tiles)
    with open(os.path.join(p["base"], "captions.json"), "w") as fh:
        json.dump(captions, fh)
    nilm = nilm_tiles("target_nilm", sizes.target_nilm, STAGE1_TILE)
    write_png_folder(p["target_nilm"], [t.image for t in nilm])
    write_nilm_shards(p["target_nilm_shards"], nilm)
    real_a = nilm_tiles("real_a", sizes.target_real, STAGE1_TILE)
    write_png_folder(p["real_a"], [t.image for t in real_a])
    write_nilm_shards(p["real_a_shards"], real_a)
    write_png_folder(p["real_b"], [t.image for t in nilm_tiles("real_b", sizes.target_real, STAGE1_TILE)])
    train = abnormal_tiles("abnormal_train", sizes.abnormal_train)
    write_labelled_shards(p["abnormal_train"], train)
    write_labelled_shards(p["detector_real"], train[: sizes.detector_real])
    half = sizes.abnormal_test // 2
    test_a, test_b = abnormal_tiles("test_a", half), abnormal_tiles("test_b", half)
    write_labelled_shards(p["test_a"], test_a)
    write_labelled_shards(p["test_b"], test_b)
    write_labelled_shards(p["test"], test_a + test_b)
    write_png_folder(p["edit_sources"], [t.image for t in nilm_tiles("edit_sources", sizes.edit_sources, EDIT_TILE)])
    # Table II's S is made from as many NILM tiles as R has, of R's size: the detector resizes every
    # tile to one side, so only then are S's cells R's size.
    write_png_folder(p["detector_sources"],
                     [t.image for t in nilm_tiles("detector_sources", sizes.detector_real, LABELLED_TILE)])
    with open(done, "w") as fh:
        json.dump({"sizes": sizes.__dict__, "scale": SCALE, "paths": p}, fh)
    return p


def count_classes(tiles: list) -> dict[str, int]:
    counts = {c: 0 for c in CELL_CLASSES}
    for tile in tiles:
        for label in tile.labels:
            counts[label] += 1
    return counts


__all__ = ["NILM", "Sizes", "write_all", "cell_crops", "centred_crop", "abnormal_tiles", "nilm_tiles", "seeds", "count_classes"]
