"""Every loader reads its published schema (written here synthetically) with the right answers."""

import json

import numpy as np
import pytest
from support.synthetic import COLOURS, write_synthetic

from vopd.evaluation.benchmarks import BENCHMARKS, get_benchmark
from vopd.evaluation.benchmarks.files import BenchmarkFormatError


def _colour(image):
    """The colour of the square, read from the pixels (independent of the loader)."""
    arr = np.asarray(image).astype(int)
    shares = {n: np.mean(np.all(np.abs(arr - np.array(c)) < 40, axis=-1)) for n, c in COLOURS.items()}
    return max(shares, key=shares.get)


EXPECTED_ROWS = {"hrbench_4k": 24, "hrbench_8k": 24}


@pytest.mark.parametrize("fmt", sorted(set(BENCHMARKS) | {"vstar_original"}))  # not "records"
def test_loader_reads_schema_with_correct_answers(tmp_path, fmt):
    name = "vstar" if fmt == "vstar_original" else fmt
    path = write_synthetic(fmt, tmp_path, n=6)
    items = get_benchmark(name).load(path)
    assert len(items) == EXPECTED_ROWS.get(name, 6)
    assert len({it.key for it in items}) == len(items)
    for it in items:
        colour = _colour(it.open_image())
        if it.kind == "choice":
            assert it.options["ABCDE".index(it.answer)] == colour, (fmt, it.id)
            assert all(f"{o}" in it.prompt for o in it.options)
        elif it.kind in ("yesno", "pope"):
            assert it.answer == ("yes" if colour in it.question else "no")
        else:
            assert it.answer == colour


def test_vstar_original_shuffles_with_fixed_seed_and_keeps_boxes(tmp_path):
    path = write_synthetic("vstar_original", tmp_path, n=8)
    first = get_benchmark("vstar").load(path, seed=0)
    again = get_benchmark("vstar").load(path, seed=0)
    assert [(i.id, i.answer, i.options) for i in first] == [(i.id, i.answer, i.options) for i in again]
    assert len({i.answer for i in first}) > 1  # the correct option is not always A
    assert {i.category for i in first} == {"direct_attributes", "relative_position"}
    for it in first:  # xywh became xyxy: the box covers the square's pixels exactly
        x1, y1, x2, y2 = it.meta["boxes_xyxy"][0]
        arr = np.asarray(it.open_image())
        assert (arr[y1:y2, x1:x2] != 255).any(axis=-1).all()
        assert (arr[y1 - 1, x1:x2] == 255).all()


def test_hrbench_rotations_and_categories(tmp_path):
    items = get_benchmark("hrbench_4k").load(write_synthetic("hrbench_4k", tmp_path, n=2))
    assert sorted({it.meta["rotation"] for it in items}) == ["0", "1", "2", "3"]
    assert {it.category for it in items} == {"single", "cross"}


def test_mme_rw_tasks_and_cn_prompt(tmp_path):
    en = get_benchmark("mme_rw_en").load(write_synthetic("mme_rw_en", tmp_path / "en"))
    cn = get_benchmark("mme_rw_cn").load(write_synthetic("mme_rw_cn", tmp_path / "cn"))
    assert {it.meta["task"] for it in en} == {"perception", "reasoning"}
    assert len(en[0].options) == 5 and "The best answer is:" in en[0].prompt
    assert "最佳答案" in cn[0].prompt and cn[0].category == "color"


def test_missing_column_names_file_and_row(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("index\tquestion\n0\twhat?\n")
    with pytest.raises(BenchmarkFormatError, match=r"bad\.tsv:0.*\['A', 'B', 'answer', 'image'\]"):
        get_benchmark("hrbench_4k").load(path)


def test_pope_original_jsonl(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(tmp_path / "img.png")
    rows = [{"question_id": 1, "image": "img.png", "text": "Is there a cat?", "label": "no"}]
    (tmp_path / "coco_pope_adversarial.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = get_benchmark("pope").load(tmp_path / "coco_pope_adversarial.jsonl")
    assert (items[0].answer, items[0].category, items[0].kind) == ("no", "adversarial", "pope")
    assert items[0].open_image().size == (8, 8)


def test_unknown_benchmark_lists_names():
    with pytest.raises(KeyError, match="vstar"):
        get_benchmark("nope")
