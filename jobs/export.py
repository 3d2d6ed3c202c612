"""`cytosynth export-coco`: a dataset as a COCO detection folder (annotations.json + the images)."""

from __future__ import annotations

import argparse

from cytosynth import storage


def register(commands: argparse._SubParsersAction) -> None:
    coco = commands.add_parser("export-coco", help="write DIR/annotations.json (COCO) with the images extracted into DIR")
    coco.add_argument("out", help="dataset URL (a generate --out: a folder, s3://bucket/prefix ...)")
    coco.add_argument("--images", required=True, help="folder (or URL) the images and annotations.json go to")
    coco.add_argument("--labels", choices=storage.LABEL_SETS, default="abnormal",
                      help="abnormal: ASC-US 1 .. HSIL 4; nilm: every cell as NILM 1; all: 1-4 and NILM 5")
    coco.set_defaults(run=export_coco)


def export_coco(args: argparse.Namespace) -> int:
    url = storage.export_coco(args.out, args.images, args.labels)
    print(f"cytosynth: wrote {url}")
    return 0
