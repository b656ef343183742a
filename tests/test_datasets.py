"""vopd.datasets.visionopd6k: import and export of the released Vision-OPD-6K layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vopd.config import ViewConfig
from vopd.datasets import parse_problem, write_visionopd6k
from vopd.images import load_image
from vopd.records import Box, RecordError, Sample, load_records
from vopd.views import HINT, INSTRUCTION, make_views, prompt_text, teacher_view

PROBLEM = f"<image>\nWhat color is the car?\n\n{HINT}\n\nA. red\nB. blue\nC. green\nD. white\n\n{INSTRUCTION}"


def _fake_release(root, rows=None):
    """A tiny data folder in the released layout: three image folders + train.jsonl."""
    clean = Image.new("RGB", (64, 48), (0, 90, 200))
    for folder, im in (
        ("original_images", clean),
        ("images", clean),
        ("teacher_images", clean.crop((8, 8, 24, 24)).resize((32, 32))),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        im.save(root / folder / "0001.png")
    row = {
        "problem": PROBLEM,
        "images": ["images/0001.png"],
        "teacher_images": ["teacher_images/0001.png"],
        "original_images": ["original_images/0001.png"],
        "bbox": [8, 8, 24, 24],
        "answer": "B",
    }
    rows = rows if rows is not None else [row, {**row, "answer": "D", "source": "sa1b"}]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return row


def test_import_release_layout(tmp_path):
    _fake_release(tmp_path)
    recs = load_records(tmp_path)  # the folder: finds train.jsonl
    assert recs.layout == "visionopd6k" and len(recs) == 2
    s = recs[0]
    assert s.id == "train-1"
    assert s.image == str((tmp_path / "original_images" / "0001.png").resolve())  # clean image
    assert s.teacher_image == str((tmp_path / "teacher_images" / "0001.png").resolve())
    assert s.meta["boxed_image"] == str((tmp_path / "images" / "0001.png").resolve())
    assert s.boxes == [Box(8, 8, 24, 24)]
    assert s.question == "What color is the car?"
    assert s.options == ["red", "blue", "green", "white"]
    assert s.answer == "B"
    # The rendered prompt with the hint is the released problem text without the placeholder.
    assert prompt_text(s, hint=True) == PROBLEM.replace("<image>\n", "")
    assert recs[1].meta["source"] == "sa1b" and recs[1].answer == "D"  # extra columns kept
    # The released crop is the default teacher view.
    _, teacher, text = make_views(s, ViewConfig(hint=True))
    assert teacher.size == (32, 32) and text == prompt_text(s, hint=True)


def test_problem_variants():
    # No newline after the placeholder, CRLF line ends: still parsed, same question.
    q, opts, hint = parse_problem(PROBLEM.replace("<image>\n", "<image>").replace("\n", "\r\n"))
    assert (q, opts, hint) == ("What color is the car?", ["red", "blue", "green", "white"], True)
    # Without the hint.
    q, opts, hint = parse_problem(f"<image>Count the birds.\n\nA. 1\nB. 2\n\n{INSTRUCTION}")
    assert (q, opts, hint) == ("Count the birds.", ["1", "2"], False)
    # Options that do not re-render identically fall back to one question text, hint removed.
    odd = f"<image>Which sign?\n{HINT}\n(A) stop (B) yield\n{INSTRUCTION}"
    q, opts, hint = parse_problem(odd)
    assert opts is None and hint is True
    assert q == f"Which sign?\n(A) stop (B) yield\n{INSTRUCTION}"
    # Letters out of order are not options.
    q, opts, _ = parse_problem(f"Q?\n\nA. x\nC. y\n\n{INSTRUCTION}")
    assert opts is None and q.startswith("Q?")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"original_images": None}, r"train\.jsonl:2: field 'original_images': missing"),
        ({"bbox": [8, 8, 24]}, r"train\.jsonl:2: field 'bbox': expected 4 numbers"),
        ({"images": ["a.png", "b.png"]}, r"train\.jsonl:2: field 'images': .*exactly one"),
        ({"problem": ""}, r"train\.jsonl:2: field 'problem'"),
    ],
)
def test_release_row_errors_name_row_and_field(tmp_path, change, pattern):
    row = _fake_release(tmp_path)
    bad = {k: v for k, v in {**row, **change}.items() if v is not None}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=pattern):
        load_records(tmp_path / "train.jsonl")


def test_release_bbox_checked_against_image(tmp_path):
    row = _fake_release(tmp_path, rows=[])
    rows = [row, {**row, "bbox": [100, 100, 120, 120]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_records(tmp_path, check_images=True, on_error="skip")
    assert len(recs) == 1 and recs.skipped[0].row == 2 and "entirely outside" in recs.skipped[0].reason


def test_write_release_layout_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    arr[..., 0] = 0  # no red anywhere in the clean image
    samples = [
        Sample(
            id="a/1",
            image=Image.fromarray(arr),
            question="Which digit?",
            options=["1", "7", "9"],
            answer="C",
            boxes=[Box(20, 10, 40, 30)],
        ),
        Sample(
            id="b",
            image=Image.fromarray(arr),
            question="Open question.",
            boxes=[Box(5, 5, 10, 10), Box(50, 40, 60, 50)],
        ),
    ]
    path = write_visionopd6k(samples, tmp_path / "export")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["problem"] == "<image>\n" + prompt_text(samples[0], hint=True)
    assert rows[0]["images"] == ["images/a_1.png"]
    assert rows[1]["bbox"] == [5.0, 5.0, 60.0, 50.0]  # union of the two boxes
    back = load_records(path, check_images=True)
    assert back.layout == "visionopd6k"
    assert [(s.id, s.question, s.options, s.answer) for s in back] == [
        ("a/1", "Which digit?", ["1", "7", "9"], "C"),
        ("b", "Open question.", None, None),
    ]
    assert back[0].boxes == [Box(20, 10, 40, 30)]
    np.testing.assert_array_equal(np.asarray(load_image(back[0].image)), arr)
    boxed = np.asarray(load_image(back[0].meta["boxed_image"]))
    assert np.all(boxed == (255, 0, 0), axis=-1).sum() > 0  # the student copy has the box
    crop = load_image(back[0].teacher_image)
    # Default export: tight crop, zoom 2, as in the release; identical to teacher_view.
    assert crop.size == (40, 40)
    expected = teacher_view(Image.fromarray(arr), [Box(20, 10, 40, 30)], ViewConfig(context=0, min_side=1, zoom=2))
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected))
    assert int(np.asarray(crop)[..., 0].max()) == 0


def test_write_release_needs_boxes(tmp_path):
    with pytest.raises(RecordError, match="field 'boxes'"):
        write_visionopd6k([Sample(id="x", image=Image.new("RGB", (4, 4)), question="Q?")], tmp_path)
