"""`vopd data propose`: the model's proposals written into a copy of a record file as its boxes:
provenance, resume through the cache, --limit, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
from support.scripted import ScriptedEngine

import vopd.proposals as proposals_mod
from vopd.cli import PROPOSAL_SOURCES as CLI_SOURCES
from vopd.cli import main
from vopd.config import ViewConfig
from vopd.datasets import load_records
from vopd.proposals import PROPOSAL_SOURCES
from vopd.proposals.boxes import proposals_cache_path
from vopd.records import Box, write_records
from vopd.toyworld.scenes import make_dataset
from vopd.views import make_views

BOX = '{"bbox_2d": [14, 28, 70, 84], "label": "the shape"}'  # a 168 px scene enters tiny Qwen2.5-VL as 112 px


def test_cli_sources_are_the_library_sources():
    assert CLI_SOURCES == PROPOSAL_SOURCES


@pytest.fixture
def scripted(monkeypatch, tiny_models):
    """Every engine the proposals make answers from one script (tiny Qwen2.5-VL: 168 px -> 112 px input)."""
    _, processor = tiny_models("qwen2_5_vl")
    engine = ScriptedEngine(processor, [])
    monkeypatch.setattr(proposals_mod, "HFGenerateEngine", lambda processor: engine)
    return engine


def _records(tmp_path, n=4):
    scenes = make_dataset(n, 21)
    scenes[0] = dataclasses.replace(scenes[0], teacher_image=scenes[0].image)  # a ready-made crop, dropped
    return write_records(scenes, tmp_path / "in" / "records.jsonl"), scenes


def test_data_propose_writes_the_proposals_as_boxes_and_resumes(tmp_path, scripted, capsys):
    path, scenes = _records(tmp_path)
    before = path.read_bytes()
    out = tmp_path / "out" / "boxed.jsonl"
    args = [
        "data",
        "propose",
        str(path),
        "--model",
        "tiny:qwen2_5_vl",
        "--source",
        "grounding",
        "--out",
        str(out),
        "--no-progress",
    ]
    scripted.answers = [BOX, "It is red.", BOX]
    assert main([*args, "--limit", "3"]) == 0
    report = capsys.readouterr().out
    assert "wrote 3 records" in report and "1 answers without a box" in report and "hit rate" in report
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in scenes[:3]]
    assert rows[0]["boxes"] == [[21.0, 42.0, 105.0, 126.0]] and rows[1]["boxes"] == [[0, 0, 168, 168]]
    assert all("teacher_image" not in r for r in rows)
    assert rows[0]["meta"]["box_source"] == "grounding" and rows[0]["meta"]["box_status"] == "ok"
    assert rows[0]["meta"]["box_score"] == pytest.approx(-0.25) and rows[0]["meta"]["box_model"] == "tiny:qwen2_5_vl"
    assert rows[1]["meta"]["box_status"] == "unparsed"
    assert rows[0]["meta"]["colour"] == scenes[0].meta["colour"]  # the input's own meta is kept
    assert path.read_bytes() == before  # the input is never written
    # The written file trains with crop_source=box: the teacher crop is cut around the proposal.
    again = load_records(out, check_images=True)
    teacher = make_views(again[0], ViewConfig(context=0.0, min_side=1, zoom=1.0))[1]
    assert teacher.size == (84, 84)
    # Resume: the cached three are reused, only the fourth is asked.
    calls = scripted.calls
    scripted.answers = [BOX]
    assert main(args) == 0
    assert scripted.calls == calls + 1 and "(3 reused)" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 4
    assert len(proposals_cache_path(out).read_text().splitlines()) == 4


def test_data_propose_can_leave_out_answers_without_a_box(tmp_path, scripted, capsys):
    path, scenes = _records(tmp_path, 3)
    out = tmp_path / "boxed.jsonl"
    scripted.answers = ["It is red.", BOX, "[1, 2, 3]"]
    code = main(
        [
            "data",
            "propose",
            str(path),
            "--model",
            "tiny:qwen2_5_vl",
            "--source",
            "grounding",
            "--out",
            str(out),
            "--skip-fallbacks",
            "--no-progress",
        ]
    )
    assert code == 0 and "left out" in capsys.readouterr().out
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [scenes[1].id]


@pytest.mark.slow
def test_data_propose_with_a_real_tiny_model_writes_every_record(tmp_path, capsys):
    """search with a tiny random Qwen2-VL: no script, every record gets a candidate window."""
    path, scenes = _records(tmp_path, 2)
    out = tmp_path / "boxed.jsonl"
    assert (
        main(
            [
                "data",
                "propose",
                str(path),
                "--model",
                "tiny:qwen2_vl",
                "--source",
                "search",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["boxes"]) == 1 and r["meta"]["box_source"] == "search" for r in rows)
    assert all(Box(*r["boxes"][0]).width == 56 for r in rows)


def test_data_propose_errors_are_one_clear_line(tmp_path, capsys):
    path, _ = _records(tmp_path, 2)
    base = ["data", "propose", "--model", "tiny:qwen2_5_vl", "--source", "grounding", "--no-progress"]
    assert main([*base, str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jsonl" in err[0]
    assert main([*base, str(path), "--out", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would overwrite the input" in err[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text().splitlines()[0] + "\n{not json\n")
    assert main([*base, str(bad), "--out", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:2" in err[0]
    assert main([*base, str(path), "--out", str(tmp_path / "o.jsonl"), "--limit", "0"]) == 1
    assert "--limit" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_data_propose_never_uses_the_input_as_its_cache(tmp_path, capsys):
    """The cache is <out stem>.proposals.jsonl: an input of that name must not be read as
    proposals nor appended to."""
    scenes = make_dataset(2, 21)
    path = write_records(scenes, tmp_path / "boxed.proposals.jsonl")
    before = path.read_bytes()
    code = main(
        [
            "data",
            "propose",
            str(path),
            "--model",
            "tiny:qwen2_5_vl",
            "--source",
            "grounding",
            "--out",
            str(tmp_path / "boxed.jsonl"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "would overwrite the input" in err[0] and "proposals.jsonl" in err[0]
    assert path.read_bytes() == before and not (tmp_path / "boxed.jsonl").exists()


def test_data_propose_refuses_a_cache_made_by_another_model(tmp_path, scripted, capsys):
    """Cached rows name the model that proposed them: a rerun with another --model into the same
    --out is refused (it would stamp meta.box_model with a model that proposed nothing)."""
    path, _ = _records(tmp_path, 2)
    out = tmp_path / "boxed.jsonl"
    args = ["data", "propose", str(path), "--source", "grounding", "--out", str(out), "--no-progress"]
    scripted.answers = [BOX, BOX]
    assert main([*args, "--model", "tiny:qwen2_5_vl"]) == 0
    rows = [json.loads(line) for line in proposals_cache_path(out).read_text().splitlines()]
    assert [r["model"] for r in rows] == ["tiny:qwen2_5_vl"] * 2
    capsys.readouterr()
    written = out.read_bytes()
    assert main([*args, "--model", "other/model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "tiny:qwen2_5_vl" in err[0] and "other/model" in err[0] and "boxed.proposals.jsonl" in err[0]
    )
    assert out.read_bytes() == written
    assert main([*args, "--model", "tiny:qwen2_5_vl"]) == 0  # the same model resumes as before


def test_data_propose_names_a_bad_batch_size(tmp_path, capsys):
    path, _ = _records(tmp_path, 2)
    code = main(
        [
            "data",
            "propose",
            str(path),
            "--model",
            "tiny:qwen2_vl",
            "--source",
            "search",
            "--out",
            str(tmp_path / "o.jsonl"),
            "--batch-size",
            "0",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--batch-size must be >= 1, got 0" in err[0]
    assert not (tmp_path / "o.jsonl").exists()
