"""Training settings and their vocabularies, apart from the harness: the CLI's parsers build
their options and defaults from these, and importing `training.loop` (torch) for them would
make every `cytosynth ... --help` pay seconds and a gigabyte."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cytosynth.synth.settings import PRECISIONS  # noqa: F401  (the training jobs' vocabulary too)

OPTIMIZERS = ("adam", "adamw", "sgd")
SELECT_BY = ("fid",)  # finetune-normal's model selection (training.model_selection)
# train-detector (training.detector_task)
NUM_CLASSES = {"abnormal": 5, "nilm": 2}  # background included, as torchvision counts
PAPER_EPOCHS = 20  # Table II's training length: the default when neither --steps nor --epochs is given
DEFAULT_LR = {"fasterrcnn": 2e-4, "retinanet": 1e-3}  # Table II's SGD learning rates, per detector


@dataclass(frozen=True)
class TrainConfig:
    """What every training job shares. `steps` counts optimizer steps; each worker takes
    `batch_size` samples per step, so one step sees `batch_size * workers` samples."""

    out: str
    steps: int = 5000
    batch_size: int = 1
    lr: float = 1e-4
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    workers: int = 1
    use_gpu: bool = False
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: int = 2
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    log_every: int = 10  # metrics.jsonl is rewritten this often (object stores cannot append)
    seed: int = 0
    resume: bool = True
    ray_address: str | None = None
    progress: bool = True

    def record(self) -> dict[str, Any]:
        """The settings that change the trained model (job.json); the rest may change on resume.

        The paper's batch sizes are global: one step averages `batch_size` samples on each of
        `workers` workers. Nothing is rescaled, so a resume with other workers is refused.
        """
        keys = ("batch_size", "workers", "lr", "optimizer", "weight_decay", "max_grad_norm", "seed")
        return {**{k: getattr(self, k) for k in keys}, "global_batch_size": self.batch_size * self.workers}


@dataclass(frozen=True)
class DetectorTrainConfig(TrainConfig):
    """Everything one train-detector run needs (training.detector_task.train_detector): the
    harness settings with the paper's Table II defaults, the data and the model.

    `epochs` sets `steps` from the real set's size (shard stats): epochs x samples / (batch_size x
    workers); `steps` instead gives the count itself; neither: the paper's 20 epochs. `lr` None:
    the paper's for `arch` (DEFAULT_LR). Here, not beside the task, so that the CLI's parser takes
    its defaults without importing torch."""

    steps: int | None = None  # None: from epochs
    batch_size: int = 2
    lr: float | None = None  # None: DEFAULT_LR[arch]
    optimizer: str = "sgd"
    weight_decay: float = 1e-4
    max_grad_norm: float = 0.0  # no clipping (torchvision's detection recipe)
    real: str | None = None  # shards: a job output, a .tar, a brace pattern or a glob; or a list
    synthetic: str | None = None
    synthetic_fraction: float = 0.0  # share of synthetic samples in each epoch, in [0, 1]
    labels: str = "abnormal"  # "abnormal" (downstream detectors) | "nilm" (generate's cell detector)
    arch: str = "fasterrcnn"  # "fasterrcnn" | "retinanet" (torchvision *_resnet50_fpn)
    backbone_weights: str | None = None  # torchvision ResNet-50 ImageNet state dict (safetensors); None: scratch
    epochs: float | None = None
    image_size: int = 1024  # the detector resizes to this side (tiles are used at full resolution)
    loader_workers: int = 2  # DataLoader processes per Ray Train worker
    roi_samples: int = 512  # Faster R-CNN proposals per image that train its box head (torchvision's)
