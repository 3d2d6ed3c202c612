"""Training data of the Abnormal Cell Synthesizer: crops, masks, prompts, grounding, and the readers
that index annotated tiles from shards and COCO files (the paper's Section IV-A data)."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import EncoderCalls

from cytosynth.storage import ShardWriter, StorageError, encode_image, shard_url, stats_url
from cytosynth.storage.annotated import coco_index, entries_for_rank, read_tiles, shard_index
from cytosynth.synth import InvalidInputError, random_bundle
from cytosynth.synth.abnormal import LATENT_SCALE, edit_cells, embed_classes, grounding_inputs, inpainting_condition
from cytosynth.synth.acs_training import GROUNDING_DROPOUT, PROMPT_DROPOUT, ACSTrainingModel
from cytosynth.synth.cell_crops import cell_crops, collate_crops, crop_batches, grown_to
from cytosynth.synth.paste import crop_origin
from cytosynth.synth.sampling import encode_images, encode_text, seeded_noise
from cytosynth.synth.ldm_training import PosteriorCache, diffusion_loss, noise_scheduler, sample_latents
from cytosynth.synth.cell_selection import BOX_SIZES
from cytosynth.training.abnormal_cells import AbnormalCellTask


def noise_tile(seed: int, width: int = 512, height: int = 512) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- crops


def test_crop_is_the_256_window_centred_on_the_box():
    tile = noise_tile(0)
    (crop,) = cell_crops(tile, [[200, 220, 260, 300]], ["HSIL"])
    # box centre (230, 260) -> window from (102, 132)
    np.testing.assert_array_equal(crop.image, tile[132:388, 102:358])
    assert crop.box == (98, 88, 158, 168)
    assert (crop.box[0] + crop.box[2]) // 2 == 128 and (crop.box[1] + crop.box[3]) // 2 == 128
    assert crop.label == "HSIL"


@pytest.mark.parametrize(
    "box, origin",
    [([0, 0, 30, 40], (0, 0)), ([490, 480, 512, 512], (256, 256)), ([5, 400, 60, 470], (0, 256)), ([300, 3, 380, 50], (212, 0))],
)
def test_crops_at_tile_edges_shift_inside_the_tile_as_the_generator_places_them(box, origin):
    tile = noise_tile(1)
    (crop,) = cell_crops(tile, [box], ["ASC-US"])
    assert crop_origin(box, 512) == origin  # the generator's own placement
    left, top = origin
    np.testing.assert_array_equal(crop.image, tile[top : top + 256, left : left + 256])
    assert crop.box == (box[0] - left, box[1] - top, box[2] - left, box[3] - top)


@pytest.mark.parametrize(
    "box, normal, grown",
    [
        ([100, 100, 140, 130], [0, 0, 100, 90], (70, 70, 170, 160)),  # about the cell's centre
        ([0, 0, 40, 30], [0, 0, 100, 90], (0, 0, 100, 90)),  # shifted inside the tile at its edge
        ([480, 490, 512, 512], [0, 0, 100, 90], (412, 422, 512, 512)),
        ([100, 100, 200, 200], [0, 0, 50, 50], (100, 100, 200, 200)),  # never smaller than the cell's own box
        ([100, 100, 140, 130], [0, 0, 60, 10], (90, 100, 150, 130)),  # per axis
    ],
)
def test_a_box_grown_to_a_normal_cell_keeps_its_centre_and_stays_inside_the_tile(box, normal, grown):
    assert grown_to(box, normal, 512, 512) == grown


def test_a_crop_grown_to_a_normal_cell_is_centred_on_the_grown_box_which_it_is_grounded_on():
    tile = noise_tile(3)
    (crop,) = cell_crops(tile, [[200, 220, 240, 250]], ["HSIL"], grow_to=[[0, 0, 120, 110]])
    # grown box (160, 180, 280, 290): centre (220, 235) -> window from (92, 107)
    np.testing.assert_array_equal(crop.image, tile[107:363, 92:348])
    assert crop.box == (68, 73, 188, 183)
    (tight,) = cell_crops(tile, [[200, 220, 240, 250]], ["HSIL"], grow_to=[None])  # a tile without normal cells
    assert tight.box == (108, 113, 148, 143)
    (kept,) = cell_crops(tile, [[200, 220, 240, 250]], ["HSIL"], grow_to=[[0, 0, 300, 300]])  # would not fit the crop
    assert kept.box == tight.box


def test_non_square_tiles_are_clamped_per_axis():
    tile = noise_tile(2, width=600, height=300)
    (crop,) = cell_crops(tile, [[580, 10, 600, 50]], ["LSIL"])
    np.testing.assert_array_equal(crop.image, tile[0:256, 344:600])
    assert crop.box == (236, 10, 256, 50)


def test_every_box_up_to_the_crop_size_lies_whole_inside_its_crop():
    rng = np.random.default_rng(3)
    tile = noise_tile(3, width=700, height=500)
    boxes = []
    for _ in range(300):
        w, h = rng.integers(1, 257, 2)
        x0, y0 = rng.integers(0, 700 - w + 1), rng.integers(0, 500 - h + 1)
        boxes.append([x0, y0, x0 + w, y0 + h])
    crops = cell_crops(tile, boxes, ["ASC-H"] * len(boxes))
    assert len(crops) == len(boxes)
    for crop in crops:
        x0, y0, x1, y1 = crop.box
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
        assert crop.image.shape == (256, 256, 3)


def test_boxes_larger_than_the_crop_are_left_out():
    crops = cell_crops(noise_tile(4), [[0, 0, 300, 100], [10, 10, 50, 50]], ["HSIL", "LSIL"])
    assert [c.label for c in crops] == ["LSIL"]


@pytest.mark.parametrize(
    "tile, boxes, labels, message",
    [
        (noise_tile(5), [[10, 10, 50, 50]], ["NILM"], "unknown class 'NILM'"),
        (noise_tile(5), [[500, 10, 520, 50]], ["LSIL"], "not inside the 512x512 tile"),
        (noise_tile(5), [[10, 10, 50]], ["LSIL"], "is not \\[x0, y0, x1, y1\\]"),
        (noise_tile(5), [[10, 10, 50, 50]], [], "1 boxes but 0 labels"),
        (noise_tile(5, 200, 512), [[10, 10, 50, 50]], ["LSIL"], "200x512, smaller than the 256x256 crop"),
    ],
)
def test_bad_annotations_are_one_line_errors(tile, boxes, labels, message):
    with pytest.raises(InvalidInputError, match=message) as err:
        cell_crops(tile, boxes, labels, where="tile 7")
    assert str(err.value).startswith("tile 7: ") and "\n" not in str(err.value)


def test_batches_are_full_and_stack_the_crops():
    crops = cell_crops(noise_tile(6), [[10, 10, 50, 50]] * 5, ["ASC-US", "ASC-H", "LSIL", "HSIL", "LSIL"])
    batches = list(crop_batches(iter(crops), 2))
    assert [len(b) for b in batches] == [2, 2]  # the fifth crop waits for a full batch
    assert batches[1].images.shape == (2, 256, 256, 3) and batches[1].images.dtype == np.uint8
    np.testing.assert_array_equal(batches[1].boxes, [crops[2].box, crops[3].box])
    assert batches[1].labels == ["LSIL", "HSIL"]


# --------------------------------------------------------------------------- conditioning


@pytest.fixture(scope="module")
def bundle():
    return random_bundle("tiny").to("cpu")


def test_condition_is_gligen_masked_latent_then_mask_zero_on_every_latent_cell_the_box_touches():
    z0 = torch.randn(1, 4, 32, 32)
    box = (98, 88, 158, 169)
    condition = inpainting_condition(z0, np.array([box]))
    mask = condition[0, 4]
    for y in range(32):
        for x in range(32):
            touches = x * LATENT_SCALE < box[2] and (x + 1) * LATENT_SCALE > box[0] and y * LATENT_SCALE < box[3] and (y + 1) * LATENT_SCALE > box[1]
            assert mask[y, x] == (0.0 if touches else 1.0), (y, x)
    torch.testing.assert_close(condition[:, :4], z0 * mask, rtol=0, atol=0)


def test_prompt_and_grounding_phrase_name_the_class(bundle):
    (crop,) = cell_crops(noise_tile(7), [[200, 220, 260, 300]], ["LSIL"])
    assert crop.prompt == "A cervical cytopathological image with LSIL cell"
    embeddings = embed_classes(bundle.tokenizer, bundle.text_encoder)
    prompt_tokens, _ = encode_text(bundle.tokenizer, bundle.text_encoder, [crop.prompt])
    _, phrase = encode_text(bundle.tokenizer, bundle.text_encoder, ["LSIL"])
    torch.testing.assert_close(embeddings.prompts(["LSIL"]), prompt_tokens)
    grounding = grounding_inputs(np.array([crop.box]), embeddings.phrases(["LSIL"]), 256)
    torch.testing.assert_close(grounding["positive_embeddings"], phrase[:, None])
    torch.testing.assert_close(grounding["boxes"], torch.tensor([[[98, 88, 158, 168]]]) / 256)
    assert grounding["masks"].tolist() == [[1.0]]


def _unet_inputs(unet, run):
    """The 9-channel input and GLIGEN kwargs of every UNet call made by `run()`."""
    seen = []

    def hook(module, args, kwargs):
        gligen = kwargs["cross_attention_kwargs"]["gligen"]
        seen.append((args[0].detach().clone(), kwargs["encoder_hidden_states"].detach().clone(),
                     {k: v.detach().clone() for k, v in gligen.items()}))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_training_conditions_the_unet_exactly_as_sampling_does(bundle):
    tile = noise_tile(8)
    batch = collate_crops(cell_crops(tile, [[200, 220, 260, 300], [0, 0, 40, 70]], ["ASC-H", "HSIL"]))
    embeddings = embed_classes(bundle.tokenizer, bundle.text_encoder)
    # No dropout here: a kept prompt and grounding token must be exactly what sampling's cond half sees.
    model = ACSTrainingModel(
        bundle.acs_unet, bundle.vae, embeddings, noise_scheduler(bundle.scheduler.config), prompt_dropout=0, grounding_dropout=0
    )

    ((x_train, context_train, grounding_train),) = _unet_inputs(model.unet, lambda: model.loss(batch))
    sampled = _unet_inputs(model.unet, lambda: edit_cells(
        model.unet, model.vae, bundle.scheduler, model.embeddings, batch.images, batch.boxes, batch.labels, [1, 2], steps=1))
    x_sample, context_sample, grounding_sample = sampled[0]
    cond = slice(2, 4)  # sampling's batch is [uncond; cond]
    assert x_train.shape[1] == x_sample.shape[1] == 9
    torch.testing.assert_close(x_train[:, 8:], x_sample[cond, 8:], rtol=0, atol=0)  # the mask, last (GLIGEN)
    torch.testing.assert_close(context_train, context_sample[cond], rtol=0, atol=0)  # the class prompt
    for name in ("boxes", "positive_embeddings", "masks"):
        torch.testing.assert_close(grounding_train[name], grounding_sample[name][cond], rtol=0, atol=0)
    # The masked latent is z0 with the box zeroed, z0 of the same crops (sampling: the posterior mean).
    z0 = encode_images(model.vae, batch.images)
    torch.testing.assert_close(x_sample[cond, 4:8], z0 * x_sample[cond, 8:])
    torch.testing.assert_close(x_sample[:2, 4:], x_sample[cond, 4:])  # both CFG halves keep the background
    assert torch.all(x_train[:, 4:8][x_train[:, 8:].expand(-1, 4, -1, -1) == 0] == 0)


def test_the_training_loss_counts_only_the_latents_inside_the_box(bundle):
    """Outside the box the UNet is given the background and the edit is not pasted there, so what it
    predicts there must not move the loss; inside, every latent pixel does."""
    batch = collate_crops(cell_crops(noise_tile(8), [[200, 220, 260, 300], [0, 0, 40, 70]], ["ASC-H", "HSIL"]))
    model = ACSTrainingModel(bundle.acs_unet, bundle.vae, embed_classes(bundle.tokenizer, bundle.text_encoder),
                             noise_scheduler(bundle.scheduler.config), prompt_dropout=0, grounding_dropout=0)
    in_box = 1.0 - inpainting_condition(torch.zeros(2, 4, 32, 32), batch.boxes)[:, -1:]

    def loss(perturbation):
        handle = model.unet.register_forward_hook(lambda module, args, out: type(out)(sample=out.sample + perturbation))
        try:
            torch.manual_seed(0)
            return model.loss(batch).item()
        finally:
            handle.remove()

    plain = loss(0.0)
    assert loss(5.0 * (1.0 - in_box)) == pytest.approx(plain, rel=1e-6)
    assert loss(5.0 * in_box) > plain + 1.0


def _drawn(fn):
    torch.manual_seed(0)
    return fn()


def test_the_posterior_cache_draws_the_latents_the_encoder_draws_and_encodes_each_crop_once(bundle):
    images = collate_crops(cell_crops(noise_tile(8), [[200, 220, 260, 300], [0, 0, 40, 70]], ["ASC-H", "HSIL"])).images
    plain = _drawn(lambda: sample_latents(bundle.vae, torch.from_numpy(images)))
    cache = PosteriorCache()
    with EncoderCalls(bundle.vae) as encoded:
        first = _drawn(lambda: cache.sample_latents(bundle.vae, images))
        again = _drawn(lambda: cache.sample_latents(bundle.vae, images))
    assert encoded == [2] and len(cache) == 2  # the second batch was not encoded
    torch.testing.assert_close(first, plain, rtol=0, atol=0)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    assert not torch.equal(cache.sample_latents(bundle.vae, images), plain)  # each draw is fresh


def test_the_posterior_cache_encodes_a_repeated_image_once_and_stops_growing_at_its_bound_in_bytes(bundle):
    a, b = (collate_crops(cell_crops(noise_tile(seed), [[200, 220, 260, 300]], ["LSIL"])).images[0] for seed in (1, 2))
    latent = bundle.vae.encode(torch.zeros(1, 3, *a.shape[:2])).latent_dist.mean
    one_posterior = 2 * latent.numel() * latent.element_size()  # its mean and its std
    cache = PosteriorCache(max_bytes=one_posterior + one_posterior // 2)
    with EncoderCalls(bundle.vae) as encoded:
        latents = cache.sample_latents(bundle.vae, np.stack([a, b, a]))
        cache.sample_latents(bundle.vae, np.stack([a, b]))
    assert encoded == [2, 1] and len(cache) == 1 and cache.nbytes == one_posterior  # b, past the bound, each time
    assert latents.shape[0] == 3 and not torch.equal(latents[0], latents[2])  # a twice: two draws


def test_the_loss_draws_the_same_noise_for_the_same_latents_however_they_are_laid_out(bundle):
    """The VAE's CPU convolutions return channels-last latents and the cache contiguous ones: the
    same seed must still train the same step (to float rounding: the UNet's CPU kernels may sum in
    another order for another layout; another noise draw moves the loss by far more)."""
    latents = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, bundle.unet.config.cross_attention_dim)
    scheduler = noise_scheduler(bundle.scheduler.config)
    losses = [_drawn(lambda z=z: diffusion_loss(bundle.unet, scheduler, z, context)).item()
              for z in (latents, latents.to(memory_format=torch.channels_last))]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=0)


def test_with_box_size_normal_a_cells_crop_is_the_same_pixels_every_epoch_so_the_cache_serves_it(tmp_path):
    """The crop is centred on the cell's box grown about its centre, so only the box changes from
    epoch to epoch: from the second epoch on, the ACS's step encodes nothing."""
    out = str(tmp_path / "data")
    write_shards(out, [[0, 1, 2], [3, 4, 5]])  # odd tiles list one normal cell
    crops = list(itertools.islice(AbnormalCellTask(data=out, box_size="normal")._crops(rank=0, world_size=1, seed=0), 12))
    epochs = [sorted(c.image.tobytes() for c in crops[i : i + 6]) for i in (0, 6)]
    assert epochs[0] == epochs[1]


def test_the_unconditional_cfg_half_has_neither_the_prompt_nor_the_grounding_token(bundle):
    batch = collate_crops(cell_crops(noise_tile(8), [[200, 220, 260, 300], [0, 0, 40, 70]], ["ASC-H", "HSIL"]))
    embeddings = embed_classes(bundle.tokenizer, bundle.text_encoder)
    calls = _unet_inputs(bundle.acs_unet, lambda: edit_cells(
        bundle.acs_unet, bundle.vae, bundle.scheduler, embeddings, batch.images, batch.boxes, batch.labels, [1, 2], steps=2))
    assert len(calls) == 2
    for _, context, grounding in calls:
        assert grounding["masks"][:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # GLIGEN: 0 hides the token
        torch.testing.assert_close(context[:2], embeddings.uncond.expand(2, -1, -1), rtol=0, atol=0)
        torch.testing.assert_close(context[2:], embeddings.prompts(batch.labels), rtol=0, atol=0)


def test_the_edit_starts_from_z0_noised_to_the_first_timestep(bundle):
    """Section III-C: z_T comes from z0 by the forward process, not from pure noise."""
    batch = collate_crops(cell_crops(noise_tile(9), [[200, 220, 260, 300]], ["LSIL"]))
    embeddings = embed_classes(bundle.tokenizer, bundle.text_encoder)
    calls = _unet_inputs(bundle.acs_unet, lambda: edit_cells(
        bundle.acs_unet, bundle.vae, bundle.scheduler, embeddings, batch.images, batch.boxes, batch.labels, [5], steps=3))
    scheduler = copy.deepcopy(bundle.scheduler)
    scheduler.set_timesteps(3)
    z0 = encode_images(bundle.vae, batch.images)
    noise = seeded_noise([5], tuple(z0.shape[1:]), z0.device)
    expected = scheduler.add_noise(z0, noise, scheduler.timesteps[:1])
    first_input = calls[0][0]
    torch.testing.assert_close(first_input[:1, :4], expected)
    assert not torch.allclose(first_input[:1, :4], noise, atol=1e-3)  # z0 shows through


@pytest.mark.slow
def test_training_drops_the_prompt_and_the_grounding_token_at_their_rates(bundle):
    boxes = [[200, 220, 260, 300]] * 200
    batch = collate_crops(cell_crops(noise_tile(8), boxes[:1], ["HSIL"]) * 200)
    embeddings = embed_classes(bundle.tokenizer, bundle.text_encoder)

    def inputs(prompt_dropout, grounding_dropout):
        model = ACSTrainingModel(
            bundle.acs_unet, bundle.vae, embeddings, noise_scheduler(bundle.scheduler.config),
            prompt_dropout=prompt_dropout, grounding_dropout=grounding_dropout,
        )
        torch.manual_seed(0)
        ((_, context, grounding),) = _unet_inputs(model.unet, lambda: model.loss(batch))
        dropped = (context == embeddings.uncond).all(dim=(1, 2)).float()
        return dropped, 1 - grounding["masks"][:, 0]

    prompt_dropped, grounding_dropped = inputs(1.0, 0.0)
    assert prompt_dropped.tolist() == [1.0] * 200 and grounding_dropped.tolist() == [0.0] * 200
    prompt_dropped, grounding_dropped = inputs(0.0, 1.0)
    assert prompt_dropped.tolist() == [0.0] * 200 and grounding_dropped.tolist() == [1.0] * 200
    prompt_dropped, grounding_dropped = inputs(PROMPT_DROPOUT, GROUNDING_DROPOUT)
    assert (PROMPT_DROPOUT, GROUNDING_DROPOUT) == (0.5, 0.1)  # GLIGEN's rates
    # 200 independent draws: 5 standard deviations either side.
    assert 0.32 < prompt_dropped.mean() < 0.68 and 0.02 < grounding_dropped.mean() < 0.2


# --------------------------------------------------------------------------- readers


def write_shards(out: str, tiles_per_shard: list[list[int]], size: int = 288) -> dict[int, tuple[np.ndarray, dict]]:
    """Shards of noise tiles; tile i has i % 3 abnormal boxes (tile 0, 3, ... none)."""
    written = {}
    for shard, tiles in enumerate(tiles_per_shard):
        writer = ShardWriter(out, shard)
        for i in tiles:
            boxes = [[10 * k, 20, 10 * k + 40, 80] for k in range(i % 3)]
            annotation = {"boxes": boxes, "labels": ["LSIL", "ASC-US"][: len(boxes)], "seed": i, "source": "real",
                          "normal_boxes": [[100, 100 + i, 190, 200 + i]] * (i % 2)}
            image = noise_tile(i, size, size)
            writer.add(i, image, annotation)
            written[i] = (image, annotation)
        writer.commit()
    return written


def test_shard_index_lists_the_tiles_with_abnormal_boxes_and_streams_their_images(tmp_path):
    out = str(tmp_path / "data")
    written = write_shards(out, [[0, 1, 2], [3, 4, 5]])
    entries = shard_index(out)
    assert [int(e["key"]) for e in entries] == [1, 2, 4, 5]
    assert {e["source"] for e in entries} == {shard_url(out, 0), shard_url(out, 1)}
    assert entries[1]["boxes"] == [[0, 20, 40, 80], [10, 20, 50, 80]] and entries[1]["labels"] == ["LSIL", "ASC-US"]
    assert (entries[1]["width"], entries[1]["height"]) == (288, 288)
    tiles = list(read_tiles(entries))
    for tile in tiles:
        np.testing.assert_array_equal(tile["image"], written[int(tile["key"])][0])
        assert tile["normal_boxes"] == written[int(tile["key"])][1]["normal_boxes"]  # what --box-size normal grows to


def test_box_size_normal_trains_each_cell_in_a_box_grown_to_a_normal_cell_of_its_tile(tmp_path):
    out = str(tmp_path / "data")
    write_shards(out, [[0, 1, 2], [3, 4, 5]])  # odd tiles list one normal cell, 90x100
    crops = {}
    for box_size in BOX_SIZES:
        task = AbnormalCellTask(data=out, box_size=box_size)
        crops[box_size] = list(itertools.islice(task._crops(rank=0, world_size=1, seed=0), 6))  # one epoch
    sides = {size: sorted((c.box[2] - c.box[0], c.box[3] - c.box[1]) for c in crops[size]) for size in BOX_SIZES}
    assert sides["cell"] == [(40, 60)] * 6  # the paper: each cell's own box
    # tiles 1 and 5 list a normal cell: their 3 boxes grow to it; tiles 2 and 4 list none: their 3 stay
    assert sides["normal"] == [(40, 60)] * 3 + [(90, 100)] * 3


def test_shards_without_stats_are_indexed_from_their_json_members(tmp_path):
    out = str(tmp_path / "data")
    write_shards(out, [[0, 1, 2]])
    Path(stats_url(out, 0)).unlink()
    entries = shard_index(shard_url(out, 0))
    assert [int(e["key"]) for e in entries] == [1, 2]
    assert len(list(read_tiles(entries))) == 2


def test_shards_stream_from_s3(s3_bucket):
    out = s3_bucket + "/data"
    written = write_shards(out, [[1, 2], [4]])
    tiles = list(read_tiles(shard_index(out)))
    assert [int(t["key"]) for t in tiles] == [1, 2, 4]
    np.testing.assert_array_equal(tiles[2]["image"], written[4][0])


def write_coco(folder: Path, images: list[dict], annotations: list[dict], categories=None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    categories = categories or [{"id": 1, "name": "lsil"}, {"id": 2, "name": "NILM"}, {"id": 7, "name": "HSIL"}]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path)


@pytest.fixture
def coco_set(tmp_path):
    folder = tmp_path / "coco"
    (folder / "img").mkdir(parents=True)
    for name, (w, h) in {"a.png": (300, 260), "b.png": (256, 256), "c.png": (400, 400)}.items():
        (folder / "img" / name).write_bytes(encode_image(noise_tile(len(name) + w, w, h)))
    images = [
        {"id": 10, "file_name": "img/a.png", "width": 300, "height": 260},
        {"id": 11, "file_name": "img/b.png", "width": 256, "height": 256},
        {"id": 12, "file_name": "img/c.png", "width": 400, "height": 400},
    ]
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 1, "bbox": [10.4, 20.6, 30.2, 40.0]},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [100, 100, 50, 50]},
        {"id": 3, "image_id": 11, "category_id": 2, "bbox": [5, 5, 20, 20]},  # NILM: not an abnormal cell
        {"id": 4, "image_id": 12, "category_id": 7, "bbox": [0, 0, 400, 400], "iscrowd": 1},
    ]
    return folder, images, annotations


def test_coco_index_keeps_abnormal_categories_by_name_and_rounds_boxes_outwards(coco_set):
    folder, images, annotations = coco_set
    (entry,) = coco_index(write_coco(folder, images, annotations))
    assert entry["source"] == str(folder / "img" / "a.png") and entry["key"] is None
    assert entry["boxes"] == [[10, 20, 41, 61], [100, 100, 150, 150]]
    assert entry["labels"] == ["LSIL", "HSIL"]
    (tile,) = read_tiles([entry])
    assert tile["image"].shape == (260, 300, 3)
    assert [c.label for c in cell_crops(tile["image"], tile["boxes"], tile["labels"])] == ["LSIL", "HSIL"]
    assert tile["normal_boxes"] == []


def test_coco_nilm_boxes_are_the_normal_cells_box_size_normal_grows_to(coco_set):
    folder, images, annotations = coco_set
    nilm = {"id": 5, "image_id": 10, "category_id": 2, "bbox": [200.5, 150, 80, 90]}
    (entry,) = coco_index(write_coco(folder, images, [*annotations, nilm]))  # image b's NILM alone: still no entry
    assert entry["labels"] == ["LSIL", "HSIL"] and entry["normal_boxes"] == [[200, 150, 281, 240]]
    (tile,) = read_tiles([entry])
    assert tile["normal_boxes"] == [[200, 150, 281, 240]]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f, i, a: (f / "annotations.json").write_text(""), "is not a COCO detection file"),
        (lambda f, i, a: (f / "annotations.json").write_text("{\"images\": ["), "is not a COCO detection file"),
        (lambda f, i, a: write_coco(f, i, a, categories=[{"id": 1, "name": "cat"}]), "no annotated abnormal cell"),
        (lambda f, i, a: write_coco(f, i, [{**a[0], "bbox": ["x", 1, 2, 3]}]), "malformed bbox"),
        (lambda f, i, a: write_coco(f, [{**i[0], "file_name": "img/gone.png"}], a), "gone.png"),
        (lambda f, i, a: write_coco(f, [{**i[0], "width": 512}], a), "a.png is 300x260 but .* says 512x260"),
    ],
    ids=["empty", "truncated", "no-known-category", "bad-bbox", "missing-image", "wrong-size"],
)
def test_bad_coco_input_is_a_one_line_storage_error(coco_set, edit, message):
    folder, images, annotations = coco_set
    write_coco(folder, images, annotations)
    edit(folder, images, annotations)
    with pytest.raises(StorageError, match=message) as err:
        coco_index(str(folder / "annotations.json"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("shards, world", [([[1, 2], [4, 5], [7, 8], [10, 11], [13]], 2), ([[1, 2, 4, 5, 7]], 2), ([[1], [2, 4]], 3)])
def test_each_epoch_puts_every_tile_on_exactly_one_rank(tmp_path, shards, world):
    out = str(tmp_path / "data")
    write_shards(out, shards)
    entries = shard_index(out)
    keys = sorted(e["key"] for e in entries)
    orders = []
    for epoch in range(3):
        per_rank = [[e["key"] for e in entries_for_rank(entries, r, world, seed=5, epoch=epoch)] for r in range(world)]
        assert sorted(k for rank in per_rank for k in rank) == keys
        assert all(per_rank)
        orders.append(per_rank)
    if len(shards) > world:
        assert orders[0] != orders[1] or orders[1] != orders[2]  # reshuffled per epoch


def test_with_enough_shards_a_rank_reads_only_its_own(tmp_path):
    out = str(tmp_path / "data")
    write_shards(out, [[1, 2], [4, 5], [7, 8], [10, 11]])
    entries = shard_index(out)
    sources = [{e["source"] for e in entries_for_rank(entries, r, 2, seed=0, epoch=0)} for r in range(2)]
    assert len(sources[0]) == len(sources[1]) == 2 and not sources[0] & sources[1]
