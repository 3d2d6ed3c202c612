"""Feature-extraction throughput for `cytosynth fid`: images/s per replica and scaling over replicas.

The extractor is Inception-v3-sized: torchvision's Inception-v3 with random weights, laid out like
clean-fid's TorchScript file (`layers` to the 2048-d pool, `output` 2048 -> 1008) and loaded
through the same `--inception` path. Random weights cost exactly what the real ones cost.

Each measurement featurises the same folder of images (clean-fid resize to 299x299, extractor,
statistics accumulated in the replica), after the replicas have loaded the extractor, so model
loading and Ray start-up are not timed. CPU replicas get one CPU each (Ray sets 1 torch thread).

    python bench/features.py --images 48 --image-size 1024 --replicas 1,2,4
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from cytosynth.cluster.feature_replicas import FeatureReplica
from cytosynth.evaluation.features import ExtractorFile, FeatureSettings, SetFeaturizer, SetOptions, Slice
from cytosynth.storage.imagesets import list_image_units
from cytosynth.synth.extractors import clean_preprocess


class InceptionLike(torch.nn.Module):
    """torchvision Inception-v3 (random init) in clean-fid's file layout: `layers` and `output`."""

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
        tower = [name for name, _ in net.named_children() if name not in ("dropout", "fc")]
        self.layers = torch.nn.Sequential(*(getattr(net, name) for name in tower))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.layers((x - 128) / 128).flatten(1))


def write_images(folder: Path, count: int, size: int) -> None:
    """Smooth random colour fields with noise: PNGs of realistic size and decode cost."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        field = rng.uniform(0, 200, 3) + xx[..., None] * rng.normal(0, 60, 3) + yy[..., None] * rng.normal(0, 60, 3)
        noisy = field + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.png")


def time_in_process(extractor: ExtractorFile, images: list[np.ndarray], batch_size: int) -> dict[str, float]:
    """Seconds per image for the clean-fid resize and for the extractor, on one torch thread."""
    torch.set_num_threads(1)
    loaded = extractor.load()
    start = time.perf_counter()
    batch = clean_preprocess(images[:batch_size])
    resize = (time.perf_counter() - start) / len(batch)
    start = time.perf_counter()
    loaded(batch)
    forward = (time.perf_counter() - start) / len(batch)
    return {"resize_s_per_image": resize, "extractor_s_per_image": forward}


def time_replicas(extractor: ExtractorFile, slices: list[Slice], replicas: int, settings: FeatureSettings) -> float:
    """Images/s of `replicas` Ray CPU replicas over all slices (dealt round-robin), after loading."""
    import ray

    actor_class = ray.remote(num_cpus=1, max_restarts=0)(FeatureReplica)
    extractor_ref = ray.put(extractor)
    actors = [actor_class.remote(extractor_ref, {"bench": SetOptions()}, settings, "cpu") for _ in range(replicas)]
    ray.get([actor.take_results.remote() for actor in actors])  # wait until every replica has loaded
    start = time.perf_counter()
    refs = [actors[i % replicas].add.remote(work) for i, work in enumerate(slices)]
    images = sum(ray.get(refs))
    seconds = time.perf_counter() - start
    for actor in actors:
        ray.kill(actor)
    return images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images in the folder featurised per measurement")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the square PNG images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--replicas", default="1,2,4", help="replica counts to measure")
    parser.add_argument("--files-per-slice", type=int, default=4, help="images per slice (unit of work)")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        folder, model_file = Path(tmp) / "images", Path(tmp) / "inception-like.pt"
        write_images(folder, args.images, args.image_size)
        torch.manual_seed(0)
        torch.jit.script(InceptionLike().eval()).save(str(model_file))
        extractor = ExtractorFile("inception", str(model_file), model_file.read_bytes())
        units = list_image_units(str(folder), files_per_unit=args.files_per_slice)
        slices = [Slice("bench", unit) for unit in units]

        sample = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))[: args.batch_size]]
        costs = time_in_process(extractor, sample, args.batch_size)
        counts = [int(c) for c in args.replicas.split(",")]
        ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            settings = FeatureSettings(batch_size=args.batch_size)
            rates = {count: time_replicas(extractor, slices, count, settings) for count in counts}
        finally:
            ray.shutdown()
        # In-process worker with every core, for comparison with the replicas.
        torch.set_num_threads(os.cpu_count() or 1)
        worker = SetFeaturizer(extractor.load(),
                               {"bench": SetOptions()}, FeatureSettings(args.batch_size, threads=os.cpu_count() or 1))
        start = time.perf_counter()
        in_process = sum(worker.add(work) for work in slices) / (time.perf_counter() - start)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print(f"workload: {args.images} PNG images {args.image_size}x{args.image_size}, batch {args.batch_size}, "
          f"Inception-v3-sized extractor (random weights)")
    print(f"one thread, per image: clean-fid resize {costs['resize_s_per_image'] * 1e3:.1f} ms, "
          f"extractor {costs['extractor_s_per_image'] * 1e3:.1f} ms")
    print(f"in-process, {os.cpu_count()} threads: {in_process:.2f} images/s")
    print("| replicas (1 CPU each) | images/s | images/s per replica | speed-up |")
    print("| --- | --- | --- | --- |")
    for count, rate in rates.items():
        print(f"| {count} | {rate:.2f} | {rate / count:.2f} | {rate / rates[counts[0]]:.2f}x |")


if __name__ == "__main__":
    main()
