"""vopd.records: boxes, sample validation, JSONL reading and writing."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from vopd.images import load_image
from vopd.records import (
    Box,
    RecordError,
    Sample,
    load_records,
    validate_sample,
    write_records,
)


def _save(path, size=(40, 30), color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- Box --


def test_box_formats_convert_to_pixel_xyxy():
    assert Box.from_format([10, 20, 30, 40]) == Box(10, 20, 30, 40)
    assert Box.from_format([10, 20, 30, 40], "xywh") == Box(10, 20, 40, 60)
    assert Box.from_format([0.1, 0.2, 0.5, 1.0], normalized=True, image_size=(200, 100)) == Box(20, 20, 100, 100)
    assert Box.from_format([0.25, 0.5, 0.5, 0.25], "xywh", normalized=True, image_size=(200, 100)) == Box(
        50, 50, 150, 75
    )
    assert Box.from_format([0.5, 0.5, 0.2, 0.4], "cxcywh", normalized=True, image_size=(100, 50)) == Box(40, 15, 60, 35)


@pytest.mark.parametrize(
    ("values", "kwargs", "field", "pattern"),
    [
        ([1, 2, 3, 4], {"fmt": "yxyx"}, "box_format", "unknown box format"),
        ([1, 2, 3], {}, "box", "4 numbers"),
        ("1234", {}, "box", "4 numbers"),
        ([1, 2, float("nan"), 4], {}, "box", "finite"),
        ([1, 2, True, 4], {}, "box", "finite"),
        ([0.1, 0.1, 0.2, 0.2], {"normalized": True}, "box", "image size"),
        ([10, 20, 300, 400], {"normalized": True, "image_size": (500, 500)}, "box", "pixel coordinates"),
    ],
)
def test_box_from_format_errors(values, kwargs, field, pattern):
    with pytest.raises(RecordError, match=pattern) as info:
        Box.from_format(values, **kwargs)
    assert info.value.field == field


def test_box_geometry():
    box = Box(10, 20, 40, 30)
    assert (box.width, box.height, box.area, box.center) == (30, 10, 300, (25, 25))
    assert Box(-5, -5, 10, 10).clip((8, 6)) == Box(0, 0, 8, 6)
    assert Box(50, 50, 60, 60).clip((40, 40)).area == 0
    assert Box.union([Box(10, 10, 20, 20), Box(5, 15, 12, 40)]) == Box(5, 10, 20, 40)
    assert box.as_list() == [10.0, 20.0, 40.0, 30.0]
    assert Box(5, 5, 1, 9).area == 0  # inverted box has no area
    with pytest.raises(ValueError):
        Box.union([])


# -------------------------------------------------------------------- validate_sample --


def _sample(**kw):
    base = dict(id="s1", image="x.png", question="What colour?", boxes=[Box(10, 10, 20, 20)])
    base.update(kw)
    return Sample(**base)


def test_partly_outside_box_is_clipped_and_reported():
    sample = _sample(boxes=[Box(10, 10, 20, 20), Box(90, -10, 120, 30)])
    out, warnings = validate_sample(sample, (100, 50))
    assert out.boxes == [Box(10, 10, 20, 20), Box(90, 0, 100, 30)]
    assert sample.boxes[1] == Box(90, -10, 120, 30)  # the input is untouched
    assert len(warnings) == 1 and warnings[0].startswith("boxes[1]: clipped")


def test_reject_policy_and_always_rejected_boxes():
    with pytest.raises(RecordError, match="extends outside") as info:
        validate_sample(_sample(boxes=[Box(90, 10, 120, 30)]), (100, 50), out_of_bounds="reject")
    assert info.value.field == "boxes[0]"
    with pytest.raises(RecordError, match="entirely outside") as info:
        validate_sample(_sample(boxes=[Box(1, 1, 5, 5), Box(150, 10, 160, 30)]), (100, 50))
    assert "field 'boxes[1]'" in str(info.value)
    for bad in (Box(10, 10, 10, 20), Box(10, 30, 20, 10)):
        with pytest.raises(RecordError, match="zero or negative area") as info:
            validate_sample(_sample(boxes=[bad]), (100, 50))
        assert info.value.field == "boxes[0]"
    # Fractions given as pixels: a sub-pixel box, with the fix in the message.
    with pytest.raises(RecordError, match="box_normalized"):
        validate_sample(_sample(boxes=[Box(0.1, 0.1, 0.4, 0.5)]), (100, 50))


def test_validate_fields():
    with pytest.raises(RecordError, match="field 'question'"):
        validate_sample(_sample(question="  "), None)
    with pytest.raises(RecordError, match=r"field 'options\[1\]'"):
        validate_sample(_sample(options=["red", ""]), None)
    with pytest.raises(RecordError, match="field 'answer'.*A-C"):
        validate_sample(_sample(options=["a", "b", "c"], answer="D"), None)
    out, warnings = validate_sample(_sample(options=["a", "b"], answer="B"), None)
    assert warnings == [] and out.answer == "B"
    # Without an image size only the size-free checks run.
    out, _ = validate_sample(_sample(boxes=[Box(500, 500, 600, 600)]), None)
    assert out.boxes == [Box(500, 500, 600, 600)]


# ------------------------------------------------------------------------ load_records --


def test_load_resolves_relative_paths_and_defaults(tmp_path):
    _save(tmp_path / "imgs" / "a.png")
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"image": "imgs/a.png", "question": "Q1?", "boxes": [[1, 2, 11, 12]]},
            {
                "id": "b",
                "image": "imgs/a.png",
                "question": "Q2?",
                "options": ["x", "y"],
                "answer": "A",
                "boxes": [[1, 2, 10, 10]],
                "box_format": "xywh",
                "category": "color",
                "meta": {"src": "unit"},
            },
        ],
    )
    recs = load_records(path)
    assert len(recs) == 2 and recs.layout == "vopd" and not recs.skipped
    first, second = recs
    assert first.id == "data-1"
    assert first.image == str((tmp_path / "imgs" / "a.png").resolve())
    assert first.boxes == [Box(1, 2, 11, 12)]
    assert second.boxes == [Box(1, 2, 11, 12)]
    assert (second.options, second.answer, second.category, second.meta) == (["x", "y"], "A", "color", {"src": "unit"})


def test_normalized_boxes_read_the_image_size(tmp_path):
    _save(tmp_path / "a.png", size=(200, 100))
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"image": "a.png", "question": "Q?", "boxes": [[0.1, 0.2, 0.5, 1.0]], "box_normalized": True}],
    )
    assert load_records(path)[0].boxes == [Box(20, 20, 100, 100)]


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ('{"image": "a.png", "question": "Q?"', r"d\.jsonl:3: invalid JSON"),
        ('["a.png"]', r"d\.jsonl:3: expected a JSON object"),
        ({"image": "a.png"}, r"d\.jsonl:3: field 'question': missing"),
        ({"image": "a.png", "question": "Q?", "questoin": "typo"}, r"d\.jsonl:3: field 'questoin': unknown field"),
        (
            {"image": "a.png", "question": "Q?", "boxes": [[1, 2, 3]]},
            r"d\.jsonl:3: field 'boxes\[0\]': expected 4 numbers",
        ),
        (
            {"image": "a.png", "question": "Q?", "boxes": [[5, 5, 1, 9]]},
            r"d\.jsonl:3: field 'boxes\[0\]': .*negative area",
        ),
        (
            {"image": "a.png", "question": "Q?", "box_format": "yolo", "boxes": [[1, 2, 3, 4]]},
            r"d\.jsonl:3: field 'box_format'",
        ),
        ({"image": "http://x/a.png", "question": "Q?"}, r"d\.jsonl:3: field 'image': URLs"),
        ({"id": "a", "image": "a.png", "question": "Q?"}, r"d\.jsonl:3: field 'id': duplicate"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, pattern):
    good = {"id": "a", "image": "a.png", "question": "Q?"}
    # Row 2 is blank: row numbers are file line numbers, so the bad row is row 3.
    path = _write_jsonl(tmp_path / "d.jsonl", [good, "", row])
    with pytest.raises(RecordError, match=pattern):
        load_records(path)


def test_skip_mode_counts_and_locates_bad_rows(tmp_path):
    _save(tmp_path / "a.png", size=(100, 50))
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"image": "a.png", "question": "ok?", "boxes": [[10, 10, 20, 20]]},
            {"image": "a.png", "question": "clipped?", "boxes": [[90, 10, 130, 20]]},
            {"image": "a.png", "question": "outside?", "boxes": [[150, 10, 160, 20]]},
            "{broken",
            {"image": "missing.png", "question": "missing image?"},
        ],
    )
    recs = load_records(path, on_error="skip", check_images=True)
    assert [s.question for s in recs] == ["ok?", "clipped?"]
    assert recs[1].boxes == [Box(90, 10, 100, 20)]
    assert [(i.row, i.reason.split(":")[0]) for i in recs.skipped] == [
        (3, "boxes[0]"),
        (4, "invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
        (5, "image"),
    ]
    assert str(recs.skipped[0]).startswith(f"{path}:3: boxes[0]")
    assert [i.row for i in recs.clipped] == [2]
    assert "2 samples" in recs.summary() and "3 rows skipped" in recs.summary()
    assert recs.report.splitlines()[1:] == [f"  skipped: {i}" for i in recs.skipped] + [
        f"  clipped: {path}:2: boxes[0]: clipped [90.0, 10.0, 130.0, 20.0] to [90.0, 10.0, 100.0, 20.0]"
    ]
    # Without image checks neither the missing file nor the boxes' bounds are checked
    # (the views clamp later); only the broken JSON row is skipped.
    lazy = load_records(path, on_error="skip")
    assert len(lazy) == 4 and not lazy.clipped and [i.row for i in lazy.skipped] == [4]
    with pytest.raises(RecordError, match=r"d\.jsonl:2: field 'boxes\[0\]'.*reject"):
        load_records(path, check_images=True, out_of_bounds="reject")


def test_check_images_reports_missing_image_field(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "nope.png", "question": "Q?"}])
    with pytest.raises(RecordError, match=r"d\.jsonl:1: field 'image': .*nope\.png"):
        load_records(path, check_images=True)


def test_folder_and_empty_file(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"image": "a.png", "question": "Q?"}])
    assert load_records(tmp_path).source == tmp_path / "train.jsonl"
    empty = tmp_path / "e" / "empty.jsonl"
    empty.parent.mkdir()
    empty.write_text("\n")
    with pytest.raises(RecordError, match="no usable records"):
        load_records(empty)
    with pytest.raises(RecordError, match="no such file"):
        load_records(tmp_path / "absent.jsonl")


# ----------------------------------------------------------------------- write_records --


def test_write_load_round_trip_with_relative_paths(tmp_path):
    src = _save(tmp_path / "src" / "photo.png", size=(40, 30), color=(1, 2, 3))
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (4, 5, 6)).save(buf, format="JPEG")
    pil = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    samples = [
        Sample(
            id="p/1",
            image=str(src.resolve()),
            question="Q1?",
            options=["a", "b"],
            answer="B",
            boxes=[Box(1, 2, 30, 20)],
            category="c",
            meta={"k": [1, 2]},
        ),
        Sample(id="bytes", image=buf.getvalue(), question="Q2?", boxes=[Box(0, 0, 4, 4)]),
        Sample(id="pil", image=pil, question="Q3?", teacher_image=pil.resize((8, 8))),
    ]
    out = write_records(samples, tmp_path / "out" / "data.jsonl")
    text = out.read_text()
    assert str(tmp_path) not in text  # no absolute paths baked in
    rows = [json.loads(line) for line in text.splitlines()]
    assert rows[0]["image"] == "../src/photo.png"
    assert rows[1]["image"] == "images/bytes.jpg" and rows[2]["image"] == "images/pil.png"
    assert rows[2]["teacher_image"] == "images/pil.teacher.png"
    # Move everything: relative paths still resolve.
    shutil.move(tmp_path / "out", tmp_path / "moved" / "out")
    shutil.move(tmp_path / "src", tmp_path / "moved" / "src")
    back = load_records(tmp_path / "moved" / "out" / "data.jsonl", check_images=True)
    for orig, got in zip(samples, back, strict=True):
        assert (got.id, got.question, got.options, got.answer, got.boxes, got.category, got.meta) == (
            orig.id,
            orig.question,
            orig.options,
            orig.answer,
            orig.boxes,
            orig.category,
            orig.meta,
        )
    np.testing.assert_array_equal(np.asarray(load_image(back[2].image)), np.asarray(pil))
    assert load_image(back[0].image).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(back[1].image).size == (8, 6)
    assert load_image(back[2].teacher_image).size == (8, 8)


def test_write_rejects_unserialisable_meta_and_relative_memory_paths(tmp_path):
    with pytest.raises(RecordError, match="field 'meta'"):
        write_records([_sample(image=str(tmp_path / "x.png"), meta={"f": object()})], tmp_path / "d.jsonl")
    with pytest.raises(RecordError, match="field 'image'.*ambiguous"):
        write_records([_sample(image="rel.png")], tmp_path / "d.jsonl")
    assert not (tmp_path / "d.jsonl").exists()
