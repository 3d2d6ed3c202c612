"""COCO export: loads in pycocotools with the fixed categories and xyxy -> xywh boxes."""

from __future__ import annotations

import pytest
from pycocotools.coco import COCO

from cytosynth.storage import ShardWriter, read_samples, to_coco, write_coco


def test_coco_file_loads_with_fixed_categories_and_xywh_boxes(tmp_path, make_tile):
    out = str(tmp_path / "out")
    cells = {
        0: ([[10, 20, 40, 60]], ["HSIL"]),
        1: ([[10, 20, 40, 60], [0, 0, 8, 4]], ["HSIL", "ASC-H"]),
        2: ([[0, 0, 8, 4], [5, 5, 9, 9]], ["ASC-H", "LSIL"]),
    }
    for shard, tiles in enumerate([(0, 1), (2,)]):
        writer = ShardWriter(out, shard)
        for i in tiles:
            writer.add(i, *make_tile(i, boxes=cells[i][0], labels=cells[i][1]))
        writer.commit()
    path = write_coco(out)

    coco = COCO(path)
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {1: "ASC-US", 2: "ASC-H", 3: "LSIL", 4: "HSIL"}
    assert sorted(coco.getImgIds()) == [0, 1, 2]
    assert coco.loadImgs(2)[0] == {"id": 2, "file_name": "000000002.png", "width": 64, "height": 64}
    (first,) = coco.loadAnns(coco.getAnnIds(imgIds=[0]))
    assert first["bbox"] == [10, 20, 30, 40] and first["area"] == 1200
    assert first["category_id"] == 4 and first["iscrowd"] == 0
    assert len(coco.getAnnIds(catIds=[2])) == 2  # tiles 1 and 2 each have one ASC-H box
    assert len({a["id"] for a in coco.dataset["annotations"]}) == len(coco.dataset["annotations"]) == 5


def test_to_coco_accepts_read_samples_output(tmp_path, make_tile):
    writer = ShardWriter(str(tmp_path), 0, image_format="jpg")
    writer.add(5, *make_tile(5, boxes=[[1, 2, 3, 4]], labels=["ASC-US"]))
    writer.commit()
    coco = to_coco(read_samples(str(tmp_path)), image_ext="jpg")
    assert coco["images"] == [{"id": 5, "file_name": "000000005.jpg", "width": 64, "height": 64}]
    assert coco["annotations"][0]["bbox"] == [1, 2, 2, 2]


def test_to_coco_rejects_unknown_classes():
    with pytest.raises(ValueError, match="unknown cell class 'NILM'"):
        to_coco([{"tile_index": 0, "width": 8, "height": 8, "boxes": [[0, 0, 1, 1]], "labels": ["NILM"]}])
