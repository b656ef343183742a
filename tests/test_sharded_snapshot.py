"""The vLLM weight snapshot written from an FSDP2-sharded student (`vopd.sharded_snapshot`): at 2 gloo
processes, each mode writes exactly the file ``save_pretrained`` writes for the unsharded model. In a
one-process group (no torchrun): a bf16 model's header and offsets, and a write error of any kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@pytest.mark.slow
def test_sharded_snapshot_equals_save_pretrained_in_every_mode(tmp_path):
    worker = Path(__file__).parent / "workers" / "fsdp2_snapshot.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in (0, 1)]
    result = results[0]
    # one machine: direct; a rank that does not find rank 0's nonce (another node): gathered
    assert result["modes"] == {"direct": "direct", "gather": "gather", "auto": "direct", "auto_split": "gather"}
    assert result["sharded"] and result["uneven"]  # real shards, some split unevenly (torch.chunk's last rank)
    for r in results:  # rank 0's failure is raised on both ranks
        assert r["error"] and "could not write the vLLM weight snapshot" in r["error"] and "rank 0:" in r["error"]
    assert not (tmp_path / "elsewhere" / "model.safetensors").exists()
    want = load_file(tmp_path / "reference" / "model.safetensors")
    for mode in ("direct", "gather", "auto", "auto_split"):
        folder = tmp_path / mode
        assert sorted(p.name for p in folder.glob("*model*")) == ["model.safetensors"]  # the stale split files went
        assert not (folder / ".vopd-snapshot-token").exists()
        got = load_file(folder / "model.safetensors")
        assert got.keys() == want.keys(), mode  # save_pretrained's names, tied weights once
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].equal(want[key]), (mode, key)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}  # transformers refuses a file without it
        assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2_vl"


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone (the collectives then return at once)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["direct", "gather"])
def test_unsharded_bf16_snapshot_equals_save_pretrained(tmp_path, tiny_qwen2_vl, one_process_group, mode):
    """The header's dtypes, shapes and byte offsets without torchrun: a bf16 model's file loads as
    the tensors ``save_pretrained`` writes."""
    import copy

    import torch

    from vopd.sharded_snapshot import write_sharded_snapshot

    model = copy.deepcopy(tiny_qwen2_vl[0]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "reference", safe_serialization=True)
    assert write_sharded_snapshot(model, tmp_path / "snap", mode=mode) == mode
    want, got = load_file(tmp_path / "reference" / "model.safetensors"), load_file(tmp_path / "snap" / WEIGHTS)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == torch.bfloat16 and got[key].equal(want[key]), key


@pytest.mark.parametrize("mode", ["direct", "gather"])
def test_a_write_error_of_any_kind_goes_through_the_agreement(
    tmp_path, tiny_qwen2_vl, one_process_group, monkeypatch, mode
):
    """Not only OSError: any exception a rank meets while writing is gathered and raised on every
    rank (a rank raising alone would leave the others waiting in the next collective); the partial
    file and the token go."""
    import vopd.sharded_snapshot as snap

    def broken(*_):
        raise MemoryError("no room for the host copy")

    monkeypatch.setattr(snap, "_pwrite", broken)
    with pytest.raises(RuntimeError, match=r"could not write the vLLM weight snapshot .*rank 0: MemoryError: no room"):
        snap.write_sharded_snapshot(tiny_qwen2_vl[0], tmp_path / "snap", mode=mode)
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == []


WEIGHTS = "model.safetensors"
