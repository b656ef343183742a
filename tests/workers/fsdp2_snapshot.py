"""Run under torchrun (2 gloo processes): the vLLM snapshot written from the FSDP2-sharded student.

Rank 0 first saves the unsharded model with ``save_pretrained`` (the reference); then the model is
sharded and written by `vopd.sharded_snapshot.write_sharded_snapshot` in each mode, the second time
over a folder holding an earlier snapshot's split files (which must go), then as if rank 1 ran on
another node, then into a folder rank 0 cannot write. The test compares the files and the errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vopd.parallel import apply_fsdp2, close_process_group, exit_rank
from vopd.scoring import ResponseHidden
from vopd.sharded_snapshot import write_sharded_snapshot
from vopd.tiny_models import build_tiny_model


def main(out: str) -> None:
    dist.init_process_group("gloo")
    try:
        root = Path(out)
        policy, _ = build_tiny_model("qwen2_vl", seed=0)
        if dist.get_rank() == 0:
            policy.save_pretrained(root / "reference", safe_serialization=True)
            stale = root / "gather"
            stale.mkdir(parents=True)
            (stale / "model-00001-of-00002.safetensors").write_bytes(b"stale")
            (stale / "model.safetensors.index.json").write_text("{}")
        dist.barrier()
        apply_fsdp2(ResponseHidden(policy), policy, device=torch.device("cpu"), param_dtype=None)
        rank = dist.get_rank()
        modes = {m: write_sharded_snapshot(policy, root / m, mode=m) for m in ("direct", "gather", "auto")}
        # Another node without shared storage: rank 1 looks into its own folder, which holds an earlier
        # run's token; rank 0's files are not there, so the snapshot must be gathered.
        other = root / ("auto_split" if rank == 0 else "elsewhere")
        if rank == 1:
            other.mkdir()
            (other / ".vopd-snapshot-token").write_text("an earlier run's nonce")
        modes["auto_split"] = write_sharded_snapshot(policy, other, mode="auto")
        # rank 0 cannot write (its folder is a file): every rank raises, naming rank 0
        blocked = root / "blocked"
        if rank == 0:
            blocked.write_text("not a folder")
        dist.barrier()
        try:
            write_sharded_snapshot(policy, blocked)
            error = None
        except RuntimeError as err:
            error = str(err)
        uneven = [n for n, p in policy.named_parameters() if p.shape and p.shape[0] % 2]
        sharded = [n for n, p in policy.named_parameters() if tuple(p.to_local().shape) != tuple(p.shape)]
        result = {"modes": modes, "uneven": uneven, "sharded": sharded, "error": error}
        (root / f"result{rank}.json").write_text(json.dumps(result))
    finally:
        close_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_rank(0)  # as a vopd.cli rank: no interpreter teardown, which can abort a finished rank
