"""The vLLM weight snapshot written from an FSDP2-sharded student (`vopd.sharded_snapshot`): at 2 gloo
processes, each mode writes exactly the file ``save_pretrained`` writes for the unsharded model."""

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
