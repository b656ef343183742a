"""`vopd gap --crop-source search|attention|grounding` on a record file without boxes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vopd.cli import main
from vopd.records import write_records
from vopd.toyworld.scenes import make_dataset


@pytest.mark.slow
@pytest.mark.parametrize("source", ["search", "attention", "grounding"])
def test_gap_with_proposed_crops_on_records_without_boxes(tmp_path, source):
    scenes = make_dataset(4, 11)
    boxless = write_records([dataclasses.replace(s, boxes=[]) for s in scenes], tmp_path / "nobox" / "r.jsonl")
    args = ["gap", str(boxless), "--model", "toy-base", "--crop-source", source, "--context", "0", "--n-boot", "200"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "gap.json").read_text())
    p = result["proposals"]
    assert p["source"] == source and p["n_proposed"] == 4 and p["n"] == 0 and p["hit_rate"] is None
    assert (tmp_path / "out" / p["file"]).is_file()
    assert result["views"]["crop"]["n"] == 4 and result["views"]["full"]["n"] == 4
    if source == "grounding":  # every answer is accounted for: parsed, or a counted whole-image fallback
        assert p["parsed"] + p["degenerate"] + p["unparsed"] == 4 and p["fallback_box"] == "whole image"
    # The same scenes with their boxes: the proposer still never sees them, but quality is measured.
    boxed = write_records(scenes, tmp_path / "box" / "r.jsonl")
    assert main(["gap", str(boxed), *args[2:], "--out", str(tmp_path / "out2")]) == 0
    again = json.loads((tmp_path / "out2" / "gap.json").read_text())["proposals"]
    assert again["n"] == 4 and 0.0 <= again["hit_rate"] <= 1.0


def test_gap_with_gold_boxes_on_records_without_boxes_is_one_clear_error(tmp_path, capsys):
    """The default crop source needs boxes: no crop view at all is refused up front, never scored."""
    scenes = make_dataset(3, 11)
    boxless = write_records([dataclasses.replace(s, boxes=[]) for s in scenes], tmp_path / "nobox" / "r.jsonl")
    code = main(["gap", str(boxless), "--model", "toy-base", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "no question has an evidence box" in err[0] and "--crop-source" in err[0]
    assert not (tmp_path / "out" / "gap.json").exists()


@pytest.mark.slow
def test_gap_leaves_out_the_records_without_boxes_and_says_so(tmp_path, caplog):
    scenes = make_dataset(3, 11)
    mixed = write_records([scenes[0], dataclasses.replace(scenes[1], boxes=[]), scenes[2]], tmp_path / "r.jsonl")
    with caplog.at_level("WARNING"):
        code = main(
            [
                "gap",
                str(mixed),
                "--model",
                "toy-base",
                "--context",
                "0",
                "--n-boot",
                "200",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    assert code == 0
    assert "1 of 3 questions have neither boxes nor a crop" in caplog.text
    result = json.loads((tmp_path / "out" / "gap.json").read_text())
    assert result["views"]["crop"]["n"] == 2 and result["views"]["full"]["n"] == 2


def test_gap_refuses_proposals_cached_by_another_model(tmp_path, capsys):
    """A rerun into the same --out with another --model must not reuse the first model's crops."""
    scenes = make_dataset(3, 11)
    records = write_records([dataclasses.replace(s, boxes=[]) for s in scenes], tmp_path / "r.jsonl")
    args = [
        "gap",
        str(records),
        "--crop-source",
        "attention",
        "--context",
        "0",
        "--n-boot",
        "100",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*args, "--model", "toy-base"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "proposals.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {r["model"] for r in rows} == {"toy-base"}
    capsys.readouterr()
    assert main([*args, "--model", "tiny:qwen2_vl"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model: 'toy-base' -> 'tiny:qwen2_vl'" in err[0] and "output folder" in err[0]
    assert main([*args, "--model", "toy-base"]) == 0  # the same model reuses its cache
