"""Bad data, found before training (`vopd data check`) or handled mid-run: fault injection.

A record file is built with one hostile row of each kind (missing, empty, non-image, header
bomb, box outside, truncated pixels, bad bytes, symlink loop, over-long question); the check must
name each ``file:row`` and fail, and training must skip and count (``on_error=skip``) or stop
with an error naming ``file:row`` (``raise``) - never crash on a row.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vopd.checkpoint import latest_checkpoint
from vopd.cli import main as cli_main
from vopd.config import ViewConfig, load_config
from vopd.data import ViewDataset, drop_over_long_texts, load_train_data
from vopd.datacheck import check_data
from vopd.records import RecordError, load_records
from vopd.toyworld.scenes import write_dataset
from vopd.trainer import train


def _noise_png(path: Path, size: int = 96) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _bomb_png(path: Path) -> Path:
    """A valid-looking PNG header claiming 100000 x 100000 pixels (a few bytes on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture()
def hostile(tmp_path) -> Path:
    """records.jsonl: rows 1 and 10 good; rows 2-9 each broken in one way."""
    d = tmp_path / "data"
    d.mkdir()
    _noise_png(d / "good.png")
    trunc = _noise_png(d / "trunc.png")
    _truncate(trunc)
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    _bomb_png(d / "bomb.png")
    os.symlink("loop.png", d / "loop.png")
    q = {"question": "What colour?", "boxes": [[10, 10, 50, 50]]}
    rows = [
        json.dumps({"image": "good.png", **q}),  # 1 good
        json.dumps({"image": "missing.png", **q}),  # 2 missing
        json.dumps({"image": "empty.png", **q}),  # 3 zero bytes
        json.dumps({"image": "text.png", **q}),  # 4 not an image
        json.dumps({"image": "bomb.png", **q}),  # 5 header bomb
        json.dumps({"image": "good.png", "question": "x", "boxes": [[500, 500, 600, 600]]}),  # 6 box outside
        json.dumps({"image": "trunc.png", **q}),  # 7 truncated pixels
        None,  # 8 non-UTF-8 bytes
        json.dumps({"image": "loop.png", **q}),  # 9 symlink loop
        json.dumps({"image": "good.png", "question": "fine", "boxes": [[0, 0, 40, 40]]}),  # 10 good
    ]
    raw = b"".join(
        (r.encode() if r is not None else b'{"image": "good.png", "question": "caf\xe9"}') + b"\n" for r in rows
    )
    (d / "records.jsonl").write_bytes(raw)
    return d / "records.jsonl"


def test_data_check_names_every_unusable_row_and_fails(hostile, capsys):
    found = check_data(hostile)
    bad = {p.row for p in found.problems}
    assert bad == {2, 3, 4, 5, 6, 8, 9}  # the truncated PNG's header is fine: only --decode sees it
    decoded = check_data(hostile, decode=True)
    assert {p.row for p in decoded.problems} == bad | {7} and decoded.usable == 2
    assert "pixel data cannot be decoded" in next(str(p) for p in decoded.problems if p.row == 7)
    assert "UTF-8" in next(p.reason for p in decoded.problems if p.row == 8)
    assert "decompression bomb" in next(p.reason for p in decoded.problems if p.row == 5)
    rc = cli_main(["data", "check", str(hostile), "--decode"])
    out = capsys.readouterr()
    assert rc == 1 and f"{hostile}:7:" in out.out and "2 of 10 rows usable" in out.out
    assert "unusable row(s)" in out.err


def test_data_check_passes_clean_data_and_measures_prompts_with_a_model(tmp_path, capsys):
    path = write_dataset(tmp_path / "toy", 3, seed=0)
    assert cli_main(["data", "check", str(path), "--decode"]) == 0
    assert "3 of 3 rows usable" in capsys.readouterr().out
    rc = cli_main(["data", "check", str(path), "--model", "tiny:qwen2_vl", "--max-prompt-tokens", "20"])
    out = capsys.readouterr().out
    assert rc == 1 and f"{path}:1: the student prompt has" in out and "over max_prompt_tokens=20" in out
    assert cli_main(["data", "check", str(path), "--model", "tiny:qwen2_vl"]) == 0


def test_bad_bytes_and_symlink_loops_are_row_errors(hostile):
    loaded = load_records(hostile, on_error="skip")  # headers not read: only rows 8 and 9 fail here
    assert [i.row for i in loaded.skipped] == [8, 9] and len(loaded) == 8
    with pytest.raises(RecordError, match=rf"{hostile}:8: not valid UTF-8 \(byte 0xe9"):
        load_records(hostile, on_error="raise")


def test_an_image_that_fails_to_decode_mid_run_is_replaced_or_named(hostile):
    samples, origins = load_train_data(str(hostile), on_error="skip")
    assert len(samples) == 3 and origins[1] == f"{hostile}:7"  # rows 1, 7 (truncated), 10
    skip = ViewDataset(samples, ViewConfig(), origins=origins, on_error="skip")
    item = skip[1]
    assert item.origin == f"{hostile}:10" and item.skipped and item.skipped[0].startswith(f"{hostile}:7: ")
    strict = ViewDataset(samples, ViewConfig(), origins=origins)
    with pytest.raises(RecordError, match=rf"{hostile}:7: .*pixel data cannot be decoded.*on_error=skip"):
        strict[1]


BASE = [
    "model.path=tiny:qwen2_vl",
    "rollout.n=2",
    "rollout.max_new_tokens=4",
    "loss.top_k=16",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
    "prompts_per_step=2",
    "micro_batch_prompts=2",
    "report_to=[jsonl]",
    "threads=1",
    "data.shuffle=false",
]


@pytest.fixture()
def toy_with_truncated(tmp_path) -> Path:
    path = write_dataset(tmp_path / "toy", 6, seed=0)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    _truncate(path.parent / rows[3]["image"], keep=0.3)  # row 4: used at step 2 (no shuffle)
    return path


def test_training_skips_and_counts_a_truncated_image_under_skip(toy_with_truncated, tmp_path):
    cfg = load_config(
        None,
        [
            *BASE,
            f"data.train={toy_with_truncated}",
            "data.on_error=skip",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=3",
        ],
    )
    with pytest.warns(UserWarning, match=rf"(?s)step 2: skipped 1 row.*{toy_with_truncated}:4: "):
        res = train(cfg)
    assert res.steps == 3 and [h.get("data_skipped", 0.0) for h in res.history] == [0.0, 1.0, 0.0]


def test_training_stops_naming_the_row_and_keeps_the_finished_step_under_raise(toy_with_truncated, tmp_path, capsys):
    cfg = load_config(
        None,
        [
            *BASE,
            f"data.train={toy_with_truncated}",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=3",
            "save_every=0",
            "data.num_workers=1",
        ],
    )
    with pytest.raises(RecordError, match=rf"^{toy_with_truncated}:4: .*cannot be decoded") as err:
        train(cfg)
    assert "Traceback" not in str(err.value)  # raised in the main process, not wrapped by the worker
    # step 1 was done and not yet saved: the error saved it first
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-1"
    assert "before stopping on the error" in capsys.readouterr().out


def test_an_over_long_question_is_found_before_step_one(tmp_path, tiny_qwen2_vl):
    path = write_dataset(tmp_path / "toy", 3, seed=0)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[1]["question"] = "why " * 400
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, origins = load_train_data(str(path))
    processor = tiny_qwen2_vl[1]
    kw = dict(max_prompt_tokens=200, hint=False, thinking=None)
    with pytest.raises(RecordError, match=rf"{path}:2: prompt text alone is \d+ tokens"):
        drop_over_long_texts(processor, samples, origins, **kw)
    with pytest.warns(UserWarning, match=rf"(?s)skipped 1 over-long row.*{path}:2"):
        kept, kept_origins = drop_over_long_texts(processor, samples, origins, on_error="skip", **kw)
    assert kept_origins == [f"{path}:1", f"{path}:3"]
    cfg = load_config(
        None,
        [*BASE, f"data.train={path}", f"output_dir={tmp_path / 'run'}", "max_steps=1", "data.max_prompt_tokens=200"],
    )
    with pytest.raises(RecordError, match=rf"{path}:2: prompt text alone"):
        train(cfg)
    assert latest_checkpoint(tmp_path / "run") is None


def test_data_check_lists_every_row_when_none_is_usable(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "question": "q"}\n{"image": "b.png", "question": "q"}\nnot json\n')
    found = check_data(path)
    assert found.usable == 0 and [p.row for p in found.problems] == [1, 2, 3]
    assert cli_main(["data", "check", str(path)]) == 1
    assert f"{path}:3: invalid JSON" in capsys.readouterr().out


def test_data_check_with_a_vopd_train_checkpoint_as_model(vopd_train_checkpoint, tmp_path, capsys):
    """`--model CHECKPOINT` loads the processor as training does (the image-only fallback without
    torchvision), not with a bare AutoProcessor that needs the stock video processor."""
    path = write_dataset(tmp_path / "toy", 2, seed=0)
    with pytest.warns(UserWarning, match="image-only|ImageOnly"):
        rc = cli_main(["data", "check", str(path), "--model", str(vopd_train_checkpoint)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "2 of 2 rows usable" in out.out and "prompts measured with the processor" in out.out


def test_data_check_on_a_file_without_usable_rows_fails_as_training_does(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = load_config(None, [*BASE, f"data.train={empty}", f"output_dir={tmp_path / 'run'}", "max_steps=1"])
    with pytest.raises(RecordError) as stopped:
        train(cfg)
    assert "no usable records" in str(stopped.value)
    assert not check_data(empty).ok
    assert cli_main(["data", "check", str(empty)]) == 1
    err = capsys.readouterr().err
    assert str(stopped.value) in err, err  # the same message `vopd train` stops with
