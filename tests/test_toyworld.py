"""The toy world: scenes, views, the tiny toy model, evaluation and the shipped base."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from vopd.images import load_image
from vopd.records import load_records
from vopd.toyworld.scenes import (
    COLOURS,
    HELDOUT_SEED,
    TOY_VIEW,
    SceneConfig,
    make_dataset,
    make_scene,
    scene_rng,
    view_input,
    write_dataset,
)
from vopd.views import evidence_region, teacher_view

RED = (255, 0, 0)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _black_mask(arr: np.ndarray) -> np.ndarray:
    return (arr < 40).all(axis=-1)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ------------------------------------------------------------------------------ scenes --


def test_scenes_are_deterministic_from_seed_and_prefix_stable() -> None:
    a, b = make_dataset(6, 5), make_dataset(6, 5)
    short = make_dataset(3, 5)
    other = make_dataset(6, 6)
    for x, y in zip(a, b):
        assert x.id == y.id and x.answer == y.answer and x.boxes == y.boxes
        assert np.array_equal(_pixels(x.image), _pixels(y.image))
    for x, y in zip(short, a):
        assert np.array_equal(_pixels(x.image), _pixels(y.image))
    assert sum(np.array_equal(_pixels(x.image), _pixels(y.image)) for x, y in zip(a, other)) == 0


def test_one_target_of_the_asked_shape_with_question_and_multiword_answer() -> None:
    for sample in make_dataset(60, 11):
        shape, colour = sample.meta["shape"], sample.meta["colour"]
        objects = sample.meta["objects"]
        assert 3 <= len(objects) <= 5
        assert [o["shape"] for o in objects].count(shape) == 1
        assert objects[sample.meta["target_index"]]["colour"] == colour
        assert sample.question == f"What color is the {shape}?"
        assert sample.answer == f"The {shape} is {colour}."
        assert colour in COLOURS and colour != "red"


def test_box_is_the_exact_bbox_of_the_outlined_target() -> None:
    # Only the target has black (outline) pixels, so the black pixels' bbox must equal the box.
    for sample in make_dataset(40, 3):
        arr = _pixels(sample.image)
        (box,) = sample.boxes
        assert _bbox(_black_mask(arr)) == (box.x1, box.y1, box.x2, box.y2)
        # The outline is 3 px thick: its left column band is black for 3 pixels at mid-height.
        inside = arr[int(box.y1) : int(box.y2), int(box.x1) : int(box.x2)]
        fill = np.array(COLOURS[sample.meta["colour"]])
        assert (np.abs(inside - fill).sum(axis=-1) == 0).sum() >= 10  # target colour visible
        assert 20 <= box.width <= 28 and 20 <= box.height <= 28


def test_objects_keep_their_spacing_and_do_not_overlap() -> None:
    for sample in make_dataset(60, 4):
        squares = [o["box"] for o in sample.meta["objects"]]
        centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in squares]
        for i in range(len(squares)):
            for j in range(i + 1, len(squares)):
                assert math.dist(centres[i], centres[j]) >= 36
                a, b = squares[i], squares[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_difficulty_knobs_change_the_scene() -> None:
    plain = make_scene(scene_rng(0, 0), SceneConfig(outline=False))[1]
    assert not _black_mask(_pixels(plain.image)).any()  # world "S": no outline anywhere
    crowded = SceneConfig(min_objects=5, max_objects=5, min_object_size=14, max_object_size=16, min_centre_distance=24)
    for sample in make_dataset(10, 2, crowded):
        assert len(sample.meta["objects"]) == 5 and sample.boxes[0].width <= 16
    with pytest.raises(ValueError, match="max_objects"):
        SceneConfig(min_objects=4, max_objects=3)
    with pytest.raises(ValueError, match="colour"):
        SceneConfig(colours=("red",))


# ------------------------------------------------------------------------------- views --


def test_crop_is_56px_window_zoomed_to_112_around_the_target_and_mostly_alone() -> None:
    others_inside = []
    for sample in make_dataset(200, 8):
        (box,) = sample.boxes
        region = evidence_region(sample.boxes, sample.image.size, TOY_VIEW)
        assert (region.width, region.height) == (56, 56)
        assert region.x1 <= box.x1 and region.y1 <= box.y1 and box.x2 <= region.x2 and box.y2 <= region.y2
        assert teacher_view(sample.image, sample.boxes, TOY_VIEW).size == (112, 112)
        for k, (x0, y0, x1, y1) in enumerate(o["box"] for o in sample.meta["objects"]):
            if k == sample.meta["target_index"]:
                continue
            w = max(0, min(x1, region.x2) - max(x0, region.x1))
            h = max(0, min(y1, region.y2) - max(y0, region.y1))
            others_inside.append(w * h / ((x1 - x0) * (y1 - y0)))
    # Neighbours may show at the window edge, but on average only a small part of them.
    assert float(np.mean(others_inside)) < 0.1


def test_red_box_only_in_the_boxed_student_view() -> None:
    sample = make_dataset(1, 9)[0]
    (box,) = sample.boxes
    red = {}
    for view in ("full", "crop", "boxed_full", "boxed_crop"):
        image, text = view_input(sample, view)
        red[view] = np.abs(_pixels(image) - np.array(RED)).sum(axis=-1) < 60
        assert text.startswith(sample.question) and (view.startswith("boxed") == ("red bounding box" in text))
    assert not red["full"].any() and not red["crop"].any() and red["boxed_crop"].any()
    # The line sits 3-4 px outside the target bbox (box_margin 2 + width 2).
    assert _bbox(red["boxed_full"]) == (box.x1 - 4, box.y1 - 4, box.x2 + 4, box.y2 + 4)


def test_dataset_writes_and_loads_through_records(tmp_path) -> None:
    path = write_dataset(tmp_path / "toy", 5, HELDOUT_SEED)
    loaded = load_records(path, check_images=True)
    original = make_dataset(5, HELDOUT_SEED)
    assert len(loaded) == 5
    for got, want in zip(loaded, original):
        assert (got.id, got.question, got.answer) == (want.id, want.question, want.answer)
        assert got.boxes == want.boxes
        assert got.meta["colour"] == want.meta["colour"]
        assert np.array_equal(_pixels(load_image(got.image)), _pixels(want.image))


# ------------------------------------------------------------------------------- model --


@pytest.fixture(scope="module")
def toy_model():
    from vopd.toyworld.model import build_toy_model

    return build_toy_model(seed=0)


def test_toy_model_size_and_image_tokens(toy_model) -> None:
    from vopd.models import build_prompts
    from vopd.views import prompt_text

    model, processor = toy_model
    params = sum(p.numel() for p in model.parameters())
    assert 1.25e6 < params < 1.35e6
    sample = make_dataset(1, 0)[0]
    crop = teacher_view(sample.image, sample.boxes, TOY_VIEW)
    batch = build_prompts(processor, [sample.image, crop], [prompt_text(sample, hint=False)] * 2)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == image_pad).sum(dim=1).tolist() == [36, 16]


def test_answers_are_multi_token_and_colours_single_tokens(toy_model) -> None:
    tok = toy_model[1].tokenizer
    for colour in COLOURS:
        assert len(tok(f" {colour}", add_special_tokens=False).input_ids) == 1
    for sample in make_dataset(10, 1):
        ids = tok(sample.answer, add_special_tokens=False).input_ids
        assert len(ids) >= 4
        assert tok.decode(ids) == sample.answer


def test_toy_answer_correct_reads_the_first_colour_word() -> None:
    from vopd.toyworld.model import toy_answer_correct

    sample = make_dataset(1, 0)[0]
    colour = sample.meta["colour"]
    wrong = next(c for c in COLOURS if c != colour)
    assert toy_answer_correct(f"The {sample.meta['shape']} is {colour}.", sample)
    assert toy_answer_correct(colour.upper(), sample)
    assert not toy_answer_correct(f"It is {wrong}, not {colour}.", sample)
    assert not toy_answer_correct("The the the", sample)
    no_meta = dataclasses.replace(sample, meta={})
    assert toy_answer_correct(colour, no_meta)  # falls back to the answer sentence


# ------------------------------------------------------------------ base and evaluation --


@pytest.fixture(scope="module")
def toy_base():
    from vopd.models import load_model
    from vopd.toyworld.pretrain import DEFAULT_BASE_DIR

    return load_model(str(DEFAULT_BASE_DIR))


def test_shipped_base_reads_crops_and_has_a_gap(toy_base) -> None:
    from vopd.toyworld.evaluate import evaluate_views, prepare_views

    model, processor = toy_base
    samples = make_dataset(40, HELDOUT_SEED)
    prepared = prepare_views(processor, samples, views=("full", "crop"), batch_size=16)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for view, tokens in (("full", 36), ("crop", 16)):  # the saved pixel budget survives reload
        assert (prepared.batches[view][0]["input_ids"] == image_pad).sum(dim=1).eq(tokens).all()
    result = evaluate_views(model, processor, prepared, views=("full", "crop"))
    assert len(result.correct["crop"]) == 40
    assert result.accuracy["crop"] == pytest.approx(np.mean(result.correct["crop"]))
    assert result.accuracy["crop"] >= 0.8  # chance is 1/6
    assert result.accuracy["crop"] - result.accuracy["full"] >= 0.1
    # Reusing prepared batches gives the same answers as preparing on the fly.
    again = evaluate_views(model, processor, samples[:8], views=("crop",), batch_size=5)
    assert again.responses["crop"] == result.responses["crop"][:8]


def test_shipped_base_report_matches_the_recipe() -> None:
    from vopd.toyworld.pretrain import DEFAULT_BASE_DIR

    report = json.loads((DEFAULT_BASE_DIR / "toy_base.json").read_text())
    acc = report["heldout"]["accuracy"]
    assert report["heldout"]["n"] >= 500
    assert acc["crop"] >= 0.9 and acc["crop"] - acc["full"] >= 0.15
    size = sum(p.stat().st_size for p in DEFAULT_BASE_DIR.iterdir())
    assert size < 8 * 2**20


def test_supervised_loss_of_a_fresh_model_is_near_log_vocab(toy_model) -> None:
    import torch

    from vopd.toyworld.pretrain import answer_batch, supervised_loss

    model, processor = toy_model
    samples = make_dataset(4, 0)
    ids_B_T, mask_B_T = answer_batch(processor, samples)
    eos = processor.tokenizer.eos_token_id
    assert mask_B_T.sum(dim=1).tolist() == [6, 6, 6, 6] and (ids_B_T[:, -1] == eos).all()
    with torch.no_grad():
        loss = supervised_loss(model, processor, samples, ["full", "crop", "boxed_full", "boxed_crop"])
    # Small random init: next-token distributions are close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(len(processor.tokenizer))) < 0.3


@pytest.mark.slow
def test_pretraining_is_deterministic() -> None:
    import torch

    from vopd.toyworld.pretrain import PretrainConfig, pretrain_base

    cfg = PretrainConfig(steps=3, eval_every=0, final_eval_n=0, crops=4, full=2, boxed_full=2, warmup=1, threads=1)
    model_a, _, _ = pretrain_base(cfg)
    model_b, _, _ = pretrain_base(cfg)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_write_dataset_refuses_a_negative_seed_by_name_before_claiming_the_folder(tmp_path):
    with pytest.raises(ValueError, match=r"seed \(--seed\) must be >= 0, got -1"):
        write_dataset(tmp_path / "d", 4, -1)
    assert not (tmp_path / "d").exists()


def test_write_dataset_refuses_an_empty_out_instead_of_writing_into_the_current_folder(tmp_path, monkeypatch):
    from vopd.outputs import OutputError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match=r"output folder is empty"):
        write_dataset("", 2, 0)
    assert list(tmp_path.iterdir()) == []
