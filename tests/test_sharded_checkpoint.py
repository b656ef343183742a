"""Sharded checkpoints (checkpoint.format=dcp) in one process: verification and fallback, a failed
write, and `vopd export` to a folder stock transformers loads. The 2-process save / resume at 1 and
2 processes is in tests/test_parallel.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vopd.sharded_checkpoint as sc
import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec
from vopd.checkpoint import CheckpointError, check_checkpoint, load_resume_point
from vopd.cli import main
from vopd.config import load_config
from vopd.knobs import ConfigError
from vopd.trainer import train

ARGS = [
    "model.path=tiny:qwen2_vl",
    "data.train=toyworld:8:0",
    "rollout.n=2",
    "rollout.max_new_tokens=2",
    "loss.top_k=8",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
    "prompts_per_step=2",
    "micro_batch_prompts=1",
    "report_to=[jsonl]",
    "threads=1",
    "rollout.temperature=0",
    "teacher.kind=ema",
    "device=cpu",
    "save_every=1",
    "keep_checkpoints=0",
    "parallel.strategy=fsdp2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dcp")
    train(load_config(None, [*ARGS, "max_steps=2", f"output_dir={out}"]))
    return out


def _sharded_student(ckpt: Path) -> dict[str, torch.Tensor]:
    folder = ckpt / "trainer_state" / sc.SHARD_DIR
    names = json.loads((ckpt / "trainer_state" / sc.HF_NAMES).read_text())
    return {names[k[len("model.") :]]: sc.assemble(k, c) for k, c in sc.shard_index(folder, "model.").items()}


def test_dcp_is_the_fsdp2_default_and_needs_fsdp2(run):
    state = json.loads((run / "checkpoint-1" / "trainer_state" / "state.json").read_text())
    assert state["format"] == "dcp" and not (run / "checkpoint-1" / "model.safetensors").exists()
    assert (run / "checkpoint-2" / "model.safetensors").is_file()  # the run's last checkpoint is exported
    with pytest.raises(ConfigError, match="checkpoint.format=dcp .* needs parallel.strategy=fsdp2"):
        load_config(None, ["checkpoint.format=dcp"])


def test_truncated_shard_is_named_and_resume_falls_back(run, tmp_path):
    import shutil

    for name in ("checkpoint-1", "checkpoint-2"):
        shutil.copytree(run / name, tmp_path / name)
    shard = next((tmp_path / "checkpoint-2" / "trainer_state" / sc.SHARD_DIR).glob("*.safetensors"))
    with shard.open("r+b") as fh:
        fh.truncate(shard.stat().st_size - 10)
    with pytest.raises(CheckpointError, match=shard.name):
        check_checkpoint(tmp_path / "checkpoint-2")
    said: list[str] = []
    ckpt, saved = load_resume_point(tmp_path, say=said.append)
    assert ckpt.name == "checkpoint-1" and saved["format"] == "dcp"
    assert any(shard.name in line for line in said)


def test_failed_shard_write_removes_the_temporary_folder(tmp_path, monkeypatch):
    def full_disk(folder, state):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "half.safetensors").write_bytes(b"\0" * 3)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sc, "save_shards", full_disk)
    with pytest.raises(CheckpointError, match="could not write checkpoint-1 .*No space left"):
        train(load_config(None, [*ARGS, "max_steps=1", f"output_dir={tmp_path}"]))
    assert not list(tmp_path.glob("checkpoint-*")) and not list(tmp_path.glob(".checkpoint-*"))


def test_vopd_export_writes_a_folder_stock_transformers_loads(run, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "hf"
    assert main(["export", str(run / "checkpoint-1"), "--out", str(out)]) == 0
    assert not (out / "trainer_state").exists()
    model = AutoModelForImageTextToText.from_pretrained(out)
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == _sharded_student(run / "checkpoint-1").keys()
    for key, value in _sharded_student(run / "checkpoint-1").items():
        assert torch.equal(saved[key], value), key
    # the loaded model holds those weights under its own module names
    loaded = model.state_dict()
    names = json.loads((run / "checkpoint-1" / "trainer_state" / sc.HF_NAMES).read_text())
    assert all(torch.equal(loaded[mod], saved[hf]) for mod, hf in names.items())
    assert main(["export", str(run / "checkpoint-1"), "--out", str(out)]) == 1  # never overwrites


def test_export_splits_files_and_writes_an_index(run, tmp_path):
    files = sc.export_hf(run / "checkpoint-1", tmp_path, max_file_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"]) == set(_sharded_student(run / "checkpoint-1"))


def test_file_plan_bounds_each_rank_s_file():
    """Consecutive tensors share a file until about file_bytes of one rank's share is in it."""
    state = {"model": {"a": torch.zeros(100, 10), "b": torch.zeros(100, 10)}, "optim": {"a": {"m": torch.zeros(5)}}}
    assert sc.file_plan(state, world=2, file_bytes=4000) == {"model.a": 1, "model.b": 1, "optim.a.m": 2}
    assert sc.file_plan(state, world=1, file_bytes=4000) == {"model.a": 1, "model.b": 2, "optim.a.m": 3}


def test_export_names_a_missing_folder_and_a_run_folder_without_advising_removal(tmp_path, capsys):
    """A missing path is 'not found'; a run folder names its checkpoints; neither says 'remove the folder'."""
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    line = capsys.readouterr().err
    assert "no such checkpoint folder" in line and "remove" not in line
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    assert main(["export", str(run), "--out", str(tmp_path / "y")]) == 1
    line = capsys.readouterr().err
    assert "not a vopd checkpoint" in line and "checkpoint-2: name one of them" in line and "remove" not in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_export_into_a_checkpoint_folder_is_refused(tmp_path, capsys):
    """Pruning deletes checkpoint folders whole: an export inside one would go with it."""
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny_cpu", f"output_dir={run}", "max_steps=1", "threads=1"]) == 0
    capsys.readouterr()
    ckpt = run / "checkpoint-1"
    assert main(["export", str(ckpt), "--out", str(ckpt / "hf")]) == 1
    line = capsys.readouterr().err
    assert "is inside the checkpoint" in line and "pruning would delete the export" in line
    assert not (ckpt / "hf").exists()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf")]) == 0  # beside the run: fine
    capsys.readouterr()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "hf")]) == 1  # again: not empty, said so
    assert "exists and is not empty" in capsys.readouterr().err
