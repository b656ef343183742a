"""Never overwrite what vopd did not write; results never go inside checkpoint folders.

Root cause: the output commands wrote into whatever folder they were given, so a user's own
``records.jsonl`` was replaced without a word, ``vopd gap --checkpoints RUN/checkpoint-1 ... --out RUN``
wrote its results into the checkpoint folders (then pruned with them), an empty ``output_dir``
trained into the current folder, and record files came out 0600 whatever the umask.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.fake_server import FakeChatServer
from support.synthetic import write_synthetic

from vopd.cli import main
from vopd.outputs import OutputError


def test_toyworld_refuses_a_records_file_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "D"
    out.mkdir()
    mine = out / "records.jsonl"
    mine.write_text('{"my": "data"}\n')
    assert main(["data", "toyworld", "--n", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "output folder" in err and "records.jsonl" in err and "--overwrite" in err
    assert mine.read_text() == '{"my": "data"}\n'  # untouched
    assert main(["data", "toyworld", "--n", "2", "--out", str(out), "--overwrite"]) == 0
    assert len(mine.read_text().splitlines()) == 2
    assert main(["data", "toyworld", "--n", "3", "--out", str(out)]) == 0  # its own output: rewritten
    assert len(mine.read_text().splitlines()) == 3


def test_toyworld_and_demo_counts_are_validated(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["data", "toyworld", "--n", "0", "--out", str(tmp_path / "x")])


def test_propose_refuses_an_out_file_it_did_not_write(tmp_path):
    from vopd.proposals.boxes import write_proposed_boxes

    data = write_synthetic("records", tmp_path / "d", n=2)
    out = tmp_path / "mine.jsonl"
    out.write_text("precious\n")

    def load():
        raise AssertionError("no model is loaded before the refusal")

    with pytest.raises(OutputError, match=r"mine.jsonl already exists and vopd did not write it.*--overwrite"):
        write_proposed_boxes(data, out, load, source="search", model_name="m", progress=False)
    assert out.read_text() == "precious\n"


def test_propose_names_an_empty_or_folder_out_as_not_a_file_name(tmp_path, monkeypatch):
    """--out '' was "PosixPath('.') has an empty name", which hides that --out is the problem."""
    from vopd.proposals.boxes import write_proposed_boxes

    data = write_synthetic("records", tmp_path / "d", n=2)

    def load():
        raise AssertionError("no model is loaded before the refusal")

    monkeypatch.chdir(tmp_path)
    for out in ("", tmp_path / "d"):
        with pytest.raises(ValueError, match=r"--out .* is not a file name: name the records file"):
            write_proposed_boxes(data, out, load, source="search", model_name="m", progress=False)


def _checkpoint(path: Path) -> Path:
    (path / "trainer_state").mkdir(parents=True)
    (path / "trainer_state" / "state.json").write_text(json.dumps({"step": int(path.name.split("-")[-1])}))
    return path


def test_gap_results_never_go_inside_checkpoint_folders(tmp_path):
    """`vopd gap --checkpoints RUN/checkpoint-1 RUN/checkpoint-2 --out RUN` wrote into the checkpoints."""
    from vopd.evaluation import BackendConfig
    from vopd.evaluation.gap import GapConfig, main_gap

    data = write_synthetic("records", tmp_path / "d", n=2)
    run = tmp_path / "RUN"
    ckpts = [_checkpoint(run / "checkpoint-1"), _checkpoint(run / "checkpoint-2")]
    with FakeChatServer(lambda t, b: "A") as server:
        backend = BackendConfig(kind="openai", model="m", url=server.url, retries=0)
        main_gap(GapConfig(str(data), str(run), checkpoints=[str(c) for c in ckpts], n_boot=200, backend=backend))
        with pytest.raises(OutputError, match=r"inside the checkpoint .*checkpoint-1"):
            main_gap(GapConfig(str(data), str(ckpts[0] / "gap"), n_boot=200, backend=backend))
    for ckpt in ckpts:
        assert sorted(p.name for p in ckpt.iterdir()) == ["trainer_state"]  # nothing written inside
        assert (run / f"gap-{ckpt.name}" / "gap.json").is_file()


def test_eval_refuses_a_folder_holding_files_it_did_not_write(tmp_path):
    from vopd.evaluation import BackendConfig, EvalConfig, main_eval

    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    bench = {"vstar": str(write_synthetic("vstar", tmp_path / "v", n=2))}
    cfg = EvalConfig(benchmarks=bench, out_dir=str(out), backend=BackendConfig(kind="openai", model="m"))
    with pytest.raises(OutputError, match=r"already holds summary.md, which vopd eval did not write"):
        main_eval(cfg)
    assert (out / "summary.md").read_text() == "my notes"


def test_empty_output_dir_is_refused(capsys):
    code = main(["train", "model.path=tiny:qwen2_vl", "data.train=toyworld:4:0", "output_dir="])
    assert code == 1
    err = capsys.readouterr().err
    assert "output_dir=''" in err and "current folder" in err


def test_record_files_respect_the_umask(tmp_path):
    """write_records went through mkstemp (0600): a shared data folder was unreadable to others."""
    from PIL import Image

    from vopd.records import Sample, write_records
    from vopd.runfolder import truncate_metrics

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    old = os.umask(0o022)
    try:
        sample = Sample(id="a", image=str(tmp_path / "a.png"), question="q", answer="a")
        path = write_records([sample], tmp_path / "r.jsonl")
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
        truncate_metrics(tmp_path, 1)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "metrics.jsonl").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("command", ["eval", "gap"])
def test_empty_out_is_refused_not_the_current_folder(tmp_path, monkeypatch, capsys, command):
    """`--out ""` became Path("") == ".": the results (and their record) landed in the current folder."""
    monkeypatch.chdir(tmp_path)
    data = "vstar=v" if command == "eval" else "r.jsonl"
    assert main([command, data, "--out", "", "--backend", "openai", "--model", "m"]) == 1
    assert "out_dir is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
