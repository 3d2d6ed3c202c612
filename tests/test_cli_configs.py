"""The config a command runs with is what its user typed (issue 16, item 3; jobs/options.py).

Each command is run with every option set to a value other than its default, up to the call that
would do the work (train, or run_job with the executor chosen), which is replaced by one that keeps its
arguments. Every field of the configs it gets must then hold the value asked for, so a field with
no option, or an option that reaches no config, fails here. With no options, the configs are the
dataclasses' own defaults: the parsers take theirs from the dataclasses, or agree with them.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields, is_dataclass, replace
from typing import Any

import numpy as np
import pytest

from cytosynth.generation.generate_config import GenerateConfig
from cytosynth.cluster.distributed import RayExecutor
from cytosynth.generation.runner import LocalExecutor, Runtime
from cytosynth.training.train_config import DetectorTrainConfig, TrainConfig
from cytosynth.jobs import detection, generate
from cytosynth.jobs import train_detector as train_detector_job
from cytosynth.jobs.cli import build_parser
from cytosynth.storage import ShardWriter

# Fields no option sets, on purpose.
NO_OPTION = {"keep_checkpoints", "prompt", "name", "feather"}
# Options of the training jobs whose values are local paths, made absolute for Ray workers.
TRAINING_PATHS = {"out", "real", "synthetic", "backbone_weights", "data", "coco", "images", "model_dir"}
# Values for the options whose text has a form of its own (generate's parsers; the plan is a file),
# and --device: cuda, so that use_gpu differs from its default.
TYPED = {"cells": "2-3", "class_weights": "HSIL=2", "workers": "2", "device": "cuda"}


class Captured(Exception):
    """Raised where the work would start: the test has what it came for."""


def parser_of(command: str) -> argparse.ArgumentParser:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[command]


def other_than_default(action: argparse.Action) -> str:
    if action.dest in TYPED:
        return TYPED[action.dest]
    if action.choices:  # the last other choice: a job's own default is often TrainConfig's first
        return str(next(c for c in reversed(list(action.choices)) if c != action.default))
    if action.type in (int, float):
        return str((action.default or 0) + (3 if action.type is int else 0.25))
    assert action.type is None, f"--{action.dest}: give it a value in TYPED"
    return f"given/{action.dest}"


def every_option(command: str, leave_out: set[str] = frozenset(), **values: str) -> list[str]:
    """`command` with each option (but those in `leave_out`) set to `values` or else to something
    other than its default."""
    argv = [command]
    for action in parser_of(command)._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction) or action.dest in leave_out:
            continue
        flag = max(action.option_strings, key=len)
        argv += [flag] if action.nargs == 0 else [flag, values.get(action.dest) or other_than_default(action)]
    return argv


def cli(*argv: str) -> int:
    """The command as `cytosynth` runs it, errors raised rather than printed."""
    args = build_parser().parse_args(argv)
    return args.run(args)


def run_to_the_work(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    with pytest.raises(Captured):
        args.run(args)
    return args


def asked(args: argparse.Namespace, name: str, paths: set[str]) -> Any:
    """What the user asked of field `name`: the option of that name, as typed (local paths of a
    training job absolute); the fields named for what the code does, from their flags."""
    if name == "resume":
        return not args.no_resume
    if name == "progress":
        return not args.quiet
    if name == "use_gpu":
        return args.device == "cuda"
    value = getattr(args, name)
    return os.path.abspath(value) if name in paths else value


def assert_as_asked(config: Any, args: argparse.Namespace, paths: set[str] = frozenset(),
                    unset: set[str] = frozenset(), **expected: Any) -> set[str]:
    """Every field of `config` holds what was asked (`expected`, or `asked`), not its default; the
    options the fields took."""
    taken = set()
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in NO_OPTION or f.name in unset:
            assert value == f.default, f"{type(config).__name__}.{f.name}"
            continue
        if is_dataclass(value) and f.name not in expected:  # a config in the config (GenerateConfig.synthesis)
            taken |= assert_as_asked(value, args, paths, unset)
            continue
        if f.name not in expected:
            assert f.name in ("resume", "progress", "use_gpu") or hasattr(args, f.name), \
                f"{type(config).__name__}.{f.name}: no option sets it"
        want = expected[f.name] if f.name in expected else asked(args, f.name, paths)
        assert value == want, f"{type(config).__name__}.{f.name}: {value!r}, asked {want!r}"
        assert want != f.default, f"{type(config).__name__}.{f.name}: the test left it at its default"
        taken.add(f.name)
    return taken


def assert_every_option_taken(args: argparse.Namespace, taken: set[str]) -> None:
    flags = {"no_resume": "resume", "quiet": "progress", "device": "use_gpu"}
    unused = {dest for dest in vars(args) if dest not in ("command", "run")
              and dest not in taken and flags.get(dest) not in taken}
    assert not unused, f"options that reach no config: {sorted(unused)}"


@pytest.fixture
def captured(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []

    def keep(*arguments: Any) -> None:
        calls.append(arguments)
        raise Captured()

    import cytosynth.cluster.ray_train as ray_train

    monkeypatch.setattr(train_detector_job, "train", keep)
    monkeypatch.setattr(ray_train, "train", keep)
    monkeypatch.setattr(generate, "run_job", keep)
    return calls


# --------------------------------------------------------------------------- every option reaches its field


def test_train_detector_config_holds_every_option(captured):
    args = run_to_the_work(every_option("train-detector"))
    [(config,)] = captured
    assert type(config) is DetectorTrainConfig
    assert_every_option_taken(args, assert_as_asked(config, args, TRAINING_PATHS))


def test_finetune_normal_config_and_task_hold_every_option(captured):
    from cytosynth.training.normal_lora import NormalLoraTask
    from cytosynth.training.model_selection import FidSelection

    args = run_to_the_work(every_option("finetune-normal"))
    [(config, task)] = captured
    assert type(config) is TrainConfig and type(task) is NormalLoraTask
    selection = FidSelection(os.path.abspath("given/select_real"), os.path.abspath("given/select_feature_extractor"),
                             args.select_count, "fid")
    taken = assert_as_asked(config, args, TRAINING_PATHS) | assert_as_asked(task, args, TRAINING_PATHS, selection=selection)
    assert_every_option_taken(args, taken | {"select_by", "select_real", "select_feature_extractor", "select_count"})


@pytest.mark.parametrize("data", ["data", "coco"])  # one or the other
def test_finetune_abnormal_config_and_task_hold_every_option(captured, data):
    from cytosynth.training.abnormal_cells import AbnormalCellTask

    other = {"data": "coco", "coco": "data"}[data]
    args = run_to_the_work(every_option("finetune-abnormal", leave_out={other}))
    [(config, task)] = captured
    assert type(config) is TrainConfig and type(task) is AbnormalCellTask
    taken = assert_as_asked(config, args, TRAINING_PATHS) | assert_as_asked(task, args, TRAINING_PATHS, unset={other})
    assert_every_option_taken(args, taken | {other})


def test_generate_config_runtime_and_pool_hold_every_option(captured, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"tiles": {}}', encoding="utf-8")
    args = run_to_the_work(every_option("generate", plan=str(plan)))
    [(config, runtime, executor)] = captured
    assert executor == RayExecutor(runtime, args.workers, args.ray_address, args.gpus_per_replica, args.replica_timeout)
    # The config holds the plan's text (it defines the dataset), paths as typed (no Ray worker reads them).
    taken = assert_as_asked(config, args, plan=plan.read_text()) | assert_as_asked(runtime, args)
    assert "device" in taken  # generate's --device is a torch device, not use_gpu
    assert_every_option_taken(args, taken | {"workers", "ray_address", "gpus_per_replica", "replica_timeout"})


# --------------------------------------------------------------------------- defaults: the dataclasses'


def test_without_options_each_config_is_its_dataclass_defaults(captured):
    from cytosynth.training.abnormal_cells import AbnormalCellTask
    from cytosynth.training.normal_lora import NormalLoraTask

    run_to_the_work(["train-detector", "--out", "o", "--device", "cpu"])
    run_to_the_work(["finetune-normal", "--data", "d", "--out", "o", "--device", "cpu"])
    run_to_the_work(["finetune-abnormal", "--data", "d", "--out", "o", "--device", "cpu"])
    run_to_the_work(["generate", "--out", "o"])
    out, data = os.path.abspath("o"), os.path.abspath("d")
    assert captured[0] == (DetectorTrainConfig(out=out),)  # the paper's Table II, written there only
    assert captured[1] == (TrainConfig(out=out), NormalLoraTask(data=data))
    assert captured[2] == (replace(TrainConfig(out=out), steps=50000, batch_size=4, optimizer="adamw"),
                           AbnormalCellTask(data=data))
    assert captured[3] == (GenerateConfig(out="o"), Runtime(), LocalExecutor(Runtime()))


# --------------------------------------------------------------------------- augmentation-study


def labelled_shards(url: str) -> str:
    writer = ShardWriter(url, 0)
    for tile in range(2):
        image = np.random.default_rng(tile).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        writer.add(tile, image, {"boxes": [[4, 4, 20, 24]], "labels": ["HSIL"], "normal_boxes": [[30, 30, 50, 50]],
                                 "source": "synthetic"})
    writer.commit()
    return url


def test_augmentation_study_trains_what_train_detector_would_with_each_arms_data(monkeypatch, tmp_path):
    shards = labelled_shards(str(tmp_path / "shards"))
    out = str(tmp_path / "study")
    training = every_option("train-detector", leave_out={"out"}, real=shards, synthetic=shards,
                            synthetic_fraction="0.5", arch="retinanet")[1:]
    trained = []
    monkeypatch.setattr(train_detector_job, "train", lambda config: trained.append(config) or {"artifact": "d"})
    metrics = {"mAP": 1.0, "mAP.5": 2.0, "mAP.75": 3.0, "AP": {"cell": 1.0}, "images": 2, "boxes": {"cell": 4}}
    monkeypatch.setattr(detection, "evaluate", lambda *args, **kwargs: metrics)

    assert cli("train-detector", "--out", out, *training) == 0
    assert cli("augmentation-study", "--out", out, "--test", shards, *training) == 0

    alone, *arms = trained
    assert alone.synthetic_fraction == 0.5 and alone.arch == "retinanet" and alone.image_size == 1027
    assert arms == [
        replace(alone, out=os.path.join(out, "real"), synthetic=None, synthetic_fraction=0.0),
        replace(alone, out=os.path.join(out, "real+synthetic")),
    ]
