"""One bad image is one bad row: checked per row before batching, in every command.

Root cause: an image the model processor refuses (a 3x1000 strip: aspect ratio over 200) was only
found when its batch was processed, so `vopd data check` passed it (or aborted without file:row),
training under ``data.on_error=skip`` neither skipped nor named it, and `vopd gap` failed every
answer of its batch and then died in its own summary (``TypeError``) instead of exiting 3 with the
rerun message. `vopd data check` also passed rows without boxes that training rejects.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image
from support.fake_server import FakeChatServer
from support.synthetic import write_synthetic

from vopd.data import load_train_data
from vopd.datacheck import check_data
from vopd.records import RecordError


def _records(tmp_path: Path, extra_rows: list[dict]) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    Image.new("RGB", (64, 64), "white").save(d / "ok.png")
    Image.new("RGB", (1000, 3), "white").save(d / "thin.png")
    rows = [{"id": "a", "image": "ok.png", "question": "q?", "answer": "x", "boxes": [[0, 0, 10, 10]]}]
    rows += extra_rows
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "records.jsonl"


THIN = {"id": "thin", "image": "thin.png", "question": "q?", "answer": "x", "boxes": [[0, 0, 10, 2]]}


def test_data_check_names_an_image_no_processor_accepts(tmp_path):
    path = _records(tmp_path, [THIN])
    found = check_data(path)
    assert not found.ok and found.usable == 1
    (problem,) = found.problems
    assert problem.row == 2 and "1000x3" in problem.reason and "aspect ratio of 333" in problem.reason


def test_training_skips_or_names_the_thin_image_by_file_and_row(tmp_path):
    path = _records(tmp_path, [THIN])
    samples, origins = load_train_data(str(path), on_error="skip")
    assert [s.id for s in samples] == ["a"]
    with pytest.raises(RecordError, match=r"records.jsonl:2.*aspect ratio"):
        load_train_data(str(path), on_error="raise")


@pytest.mark.parametrize("boxes", [[], None])
def test_data_check_rejects_rows_without_boxes_as_training_does(tmp_path, boxes):
    path = _records(tmp_path, [{"id": "b", "image": "ok.png", "question": "q?", "answer": "x", "boxes": boxes}])
    found = check_data(path)
    assert not found.ok
    (problem,) = found.problems
    assert problem.row == 2 and "no evidence boxes" in problem.reason


def test_a_thin_image_fails_its_own_item_not_its_batch(tmp_path):
    from vopd.evaluation.runner import PredictionStore, predict
    from vopd.evaluation.types import EvalItem

    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    Image.new("RGB", (3, 1000)).save(tmp_path / "thin.png")

    class StrictBackend:  # like the Qwen processor: one refused image fails the whole call
        def generate(self, prompts):
            for p in prompts:
                if max(p.image.size) / min(p.image.size) > 200:
                    raise ValueError("absolute aspect ratio must be smaller than 200")
            return ["A"] * len(prompts)

    items = [
        EvalItem(benchmark="b", id=str(i), image=str(tmp_path / name), prompt="q", answer="A", kind="choice")
        for i, name in enumerate(["ok.png", "thin.png", "ok.png"])
    ]
    store = PredictionStore(tmp_path / "p.jsonl")
    got = predict(items, StrictBackend(), store, batch_size=8)
    assert [got[it.key] for it in items] == ["A", None, "A"]
    assert "aspect ratio" in store.get("b", "default", items[1].key)["error"]


def test_gap_with_every_answer_of_a_view_failed_exits_3_with_the_rerun_message(tmp_path, capsys):
    from vopd.evaluation.cli_args import add_gap_arguments, run_gap

    data = write_synthetic("records", tmp_path / "d", n=3)
    parser = add_gap_arguments(argparse.ArgumentParser())
    with FakeChatServer(lambda t, b: "A", fail_first=1000) as server:
        args = parser.parse_args(
            [str(data), "--out", str(tmp_path / "o"), "--backend", "openai", "--model", "m", "--url", server.url]
            + ["--retries", "0", "--n-boot", "100"]
        )
        assert run_gap(args) == 3
    captured = capsys.readouterr()
    assert "no answer judged" in captured.out and "gap (crop - full) n/a" in captured.out
    assert "rerun the same command to retry them" in captured.err
