"""Both stages on the tiny preset: determinism, locality, grounding, boxes (docs/design.md §4)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cytosynth.synth import (
    ABNORMAL_CLASSES,
    CATEGORY_IDS,
    AbnormalCellSynthesizer,
    NormalTileGenerator,
    SynthesisSettings,
    build_synthesizer,
    draw_phantom_tile,
    random_bundle,
    tile_seed,
)
from cytosynth.synth.errors import InvalidInputError
from cytosynth.synth.paste import crop_origin, edit_region, feather_alpha, paste_back
from cytosynth.synth.schedule import StageClock, Stages, pipelined
from cytosynth.synth.edit_plan import plan_from_json

FAST = SynthesisSettings(steps=3)


@pytest.fixture(scope="module")
def bundle():
    return random_bundle("tiny").to("cpu")


@pytest.fixture(scope="module")
def phantom_synthesizer(bundle):
    return build_synthesizer(bundle, FAST, "phantom")


def seeds(indices, job_seed=0):
    return [tile_seed(job_seed, i) for i in indices]


def outside_edits_mask(annotation, feather):
    keep = np.ones((annotation["height"], annotation["width"]), bool)
    for box in annotation["boxes"]:
        x0, y0, x1, y1 = edit_region(box, annotation["width"], feather)
        keep[y0:y1, x0:x1] = False
    return keep


def test_normal_tiles_are_deterministic_per_seed(bundle):
    gen = NormalTileGenerator(bundle.unet, bundle.vae, bundle.text_encoder, bundle.tokenizer, bundle.scheduler,
                              tile_size=256, steps=2)
    a, b, c = gen([1, 2]), gen([1, 2]), gen([3, 2])
    assert a.shape == (2, 256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], c[0])
    # Tile 2 alone vs in a batch: same noise, same model; CPU kernels may round differently per batch.
    alone = gen([2])[0].astype(int)
    assert np.abs(alone - a[1]).max() <= 2


def test_the_same_seeds_give_the_same_bytes(phantom_synthesizer):
    first = phantom_synthesizer([0, 1], seeds([0, 1]))
    again = phantom_synthesizer([0, 1], seeds([0, 1]))
    for x, y in zip(first, again):
        assert np.array_equal(x.image, y.image)
        assert x.annotation == y.annotation


def test_a_tiles_plan_does_not_depend_on_its_batch(phantom_synthesizer):
    batch = phantom_synthesizer([0, 1, 2], seeds([0, 1, 2]))
    alone = phantom_synthesizer([2], seeds([2]))[0]
    assert batch[2].annotation == alone.annotation
    assert np.abs(batch[2].image.astype(int) - alone.image).max() <= 2  # float rounding of batched kernels


def test_only_edit_regions_change_the_normal_tile(phantom_synthesizer):
    for sample in phantom_synthesizer([0, 1, 2], seeds([0, 1, 2])):
        normal = draw_phantom_tile(sample.seed, 1024)[0]
        keep = outside_edits_mask(sample.annotation, FAST.feather)
        assert np.array_equal(sample.image[keep], normal[keep])
        assert not np.array_equal(sample.image, normal)  # and the edits did change something


def test_annotations_follow_the_data_contract(phantom_synthesizer):
    for sample in phantom_synthesizer([0, 1, 2, 3], seeds([0, 1, 2, 3])):
        ann = sample.annotation
        assert 1 <= len(ann["boxes"]) <= 8
        assert len(ann["labels"]) == len(ann["boxes"]) == len(ann["category_ids"])
        assert all(label in ABNORMAL_CLASSES for label in ann["labels"])
        assert ann["category_ids"] == [CATEGORY_IDS[label] for label in ann["labels"]]
        for x0, y0, x1, y1 in ann["boxes"] + ann["normal_boxes"]:
            assert 0 <= x0 < x1 <= 1024 and 0 <= y0 < y1 <= 1024
        assert ann["source"] == "synthetic" and ann["width"] == ann["height"] == 1024
        assert ann["params"]["steps"] == 3 and ann["params"]["guidance"] == 5.0
        assert ann["seed"] == sample.seed


def test_the_editor_follows_class_and_box(bundle):
    editor = AbnormalCellSynthesizer(bundle.acs_unet, bundle.vae, bundle.text_encoder, bundle.tokenizer,
                                     bundle.scheduler, steps=3)
    crop = draw_phantom_tile(5, 1024)[0][:256, :256]
    crops = np.stack([crop] * 3)
    boxes = np.array([[90, 90, 170, 160], [90, 90, 170, 160], [20, 30, 100, 90]])
    out = editor(crops, boxes, ["ASC-US", "HSIL", "ASC-US"], [1, 1, 1])
    assert out.shape == crops.shape and out.dtype == np.uint8
    assert not np.array_equal(out[0], out[2])  # the box reaches the UNet
    again = editor(crops[:1], boxes[:1], ["ASC-US"], [1])
    assert np.abs(again[0].astype(int) - out[0]).max() <= 2  # batching changes only rounding
    # The class reaches the UNet (prompt and grounding): the same crop, box and seed, alone in its
    # batch, with another class differs far beyond rounding (measured: max 10-11 grey levels, mean
    # 0.6-0.7 on the tiny random model; the same call repeated differs by 0).
    assert np.array_equal(editor(crops[:1], boxes[:1], ["ASC-US"], [1]), again)
    for other in ("HSIL", "LSIL"):
        changed = np.abs(editor(crops[:1], boxes[:1], [other], [1]).astype(int) - again)
        assert changed.max() >= 5 and changed.mean() > 0.2, (other, changed.max(), changed.mean())


@pytest.mark.parametrize("box, origin", [((0, 0, 50, 40), (0, 0)), ((990, 1000, 1024, 1024), (768, 768)),
                                         ((500, 20, 560, 70), (402, 0)), ((400, 400, 500, 480), (322, 312))])
def test_crops_are_centred_on_the_box_and_shifted_inside_the_tile(box, origin):
    assert crop_origin(box, 1024, 256) == origin


def test_feathered_paste_changes_nothing_beyond_the_margin():
    tile = np.full((512, 512, 3), 100, np.uint8)
    before = tile.copy()
    box, feather = (200, 200, 260, 250), 12
    origin = crop_origin(box, 512, 256)
    paste_back(tile, np.full((256, 256, 3), 200, np.uint8), origin, box, feather)
    x0, y0, x1, y1 = edit_region(box, 512, feather)
    outside = np.ones((512, 512), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(tile[outside], before[outside])
    assert (tile[200:250, 200:260] == 200).all()  # the box itself is fully edited
    alpha = feather_alpha((10, 10, 20, 20), 64, feather)
    assert alpha[15, 15] == 1 and 0 < alpha[15, 21] < 1 and alpha[15, 20 + feather - 1 + 1] == 0


def test_a_neighbours_margin_never_paints_over_an_edited_cell():
    tile = np.zeros((512, 512, 3), np.uint8)
    first, second = (100, 100, 150, 150), (155, 100, 205, 150)
    paste_back(tile, np.full((256, 256, 3), 50, np.uint8), crop_origin(first, 512), first, 12, keep_out=[second])
    paste_back(tile, np.full((256, 256, 3), 250, np.uint8), crop_origin(second, 512), second, 12, keep_out=[first])
    assert (tile[100:150, 100:150] == 50).all() and (tile[100:150, 155:205] == 250).all()


def test_diffusion_source_runs_both_stages(bundle):
    synthesizer = build_synthesizer(bundle, SynthesisSettings(tile_size=256, steps=2, cells=(1, 2)), "diffusion")
    sample = synthesizer([0], seeds([0]))[0]
    assert sample.image.shape == (256, 256, 3)
    assert 1 <= len(sample.annotation["boxes"]) <= 2


# --------------------------------------------------------------------------- the replica pipeline


def cpu_stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("cpu-stages")]


def logged_stages(log: list, fail: tuple[str, int] | None = None, after: tuple[str, int] | None = None) -> Stages:
    """Stages that log (stage, batch, thread) and hand the batch on; `fail` raises in one stage of
    one batch; with `after`, detection of batch 0 waits until that stage of that batch has run."""
    ran = threading.Event()

    def stage(name):
        def run(k):
            if after and (name, k) == ("detection", 0):
                assert ran.wait(10), f"detection of batch 0 waited in vain for {after}"
            log.append((name, k, threading.current_thread().name))
            if (name, k) == after:
                ran.set()
            if (name, k) == fail:
                raise InvalidInputError(f"tile {k}: bad input in {name}")
            return k
        return run

    return Stages(stage("stage1"), stage("detection"), stage("stage2"), stage("paste_back"))


def test_the_device_makes_stage_1_of_the_next_batch_while_the_cpu_detects_this_one():
    log = []
    # Detection of batch 0 finishes only once stage 1 of batch 1 has run: in series this would hang.
    stages = logged_stages(log, after=("stage1", 1))
    assert list(pipelined(range(4), stages, StageClock(), depth=1)) == [0, 1, 2, 3]
    device = [(name, k) for name, k, _ in log if name.startswith("stage")]
    assert device == [("stage1", 0), ("stage1", 1), ("stage2", 0), ("stage1", 2), ("stage2", 1),
                      ("stage1", 3), ("stage2", 2), ("stage2", 3)]
    main = threading.current_thread().name
    assert all((thread == main) == name.startswith("stage") for name, _, thread in log)
    assert not cpu_stage_threads()


def test_depth_0_runs_every_stage_of_a_batch_in_series_on_the_calling_thread():
    log = []
    assert list(pipelined(range(2), logged_stages(log), StageClock(), depth=0)) == [0, 1]
    order = ["stage1", "detection", "stage2", "paste_back"]
    assert log == [(name, k, threading.current_thread().name) for k in range(2) for name in order]


@pytest.mark.parametrize("stage", ["stage1", "detection", "stage2", "paste_back"])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_an_error_in_any_stage_is_raised_as_is_and_leaves_no_thread_behind(stage, depth):
    with pytest.raises(InvalidInputError, match=f"^tile 2: bad input in {stage}$"):
        list(pipelined(range(5), logged_stages([], fail=(stage, 2)), StageClock(), depth=depth))
    assert not cpu_stage_threads()


def test_the_clock_has_each_stages_busy_seconds_and_its_waits_for_the_stage_before():
    def slow(k):
        time.sleep(0.2)
        return k

    clock = StageClock()
    assert list(pipelined(range(3), Stages(lambda k: k, slow, lambda k: k, lambda k: k), clock)) == [0, 1, 2]
    assert clock.busy["detection"] >= 0.6 and clock.busy["stage1"] < 0.1
    # Nothing else to run: the device waited for every detection, almost all of it.
    assert clock.idle["stage2"] >= 0.5
    assert set(clock.idle) == {"detection", "stage2", "paste_back"}


@pytest.fixture(scope="module")
def diffusion_settings():
    return SynthesisSettings(tile_size=256, steps=2, cells=(1, 3))


def test_the_pipeline_gives_the_bytes_of_every_stage_in_series(bundle, diffusion_settings):
    synthesizer = build_synthesizer(bundle, diffusion_settings, "diffusion")
    batches = [([i], seeds([i])) for i in range(3)]
    runs = {depth: [s for batch in synthesizer.pipeline(batches, depth=depth) for s in batch] for depth in (0, 1, 2)}
    for depth in (1, 2):
        assert [s.annotation for s in runs[depth]] == [s.annotation for s in runs[0]]
        assert all(np.array_equal(a.image, b.image) for a, b in zip(runs[depth], runs[0]))
    assert not cpu_stage_threads()


def test_bad_input_found_by_detection_stops_the_pipeline_with_its_one_line(bundle, diffusion_settings):
    plan = plan_from_json('{"tiles": {"1": [{"detected": 4000, "label": "LSIL"}]}}')
    synthesizer = build_synthesizer(bundle, diffusion_settings, "diffusion", plan=plan)
    with pytest.raises(InvalidInputError, match="^plan: tile 1: detected cell 4000 out of range"):
        list(synthesizer.pipeline([([i], seeds([i])) for i in range(3)]))
    assert not cpu_stage_threads()
