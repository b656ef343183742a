"""Benchmark 17: peak host memory per rank while the vLLM weight snapshot is written under fsdp2.

Two gloo processes under `torchrun --standalone` set up an fsdp2 run of the ~100M-parameter random
Qwen2-VL of `bench_memory.py` (fp32, EMA teacher) from its folder, then write the snapshot the vLLM
server loads (`rollout.engine=vllm`) three ways, each in its own measurement window (the per-process
method of `bench_memory.py`: `common.ProcessPeak` resets the kernel's peak-RSS counter at the start):

- ``direct`` (what vopd does when every rank sees the snapshot folder): each rank writes its own
  shards' bytes into the file (`vopd.sharded_snapshot`), nothing gathered;
- ``gather`` (vopd's fallback when a rank does not see the folder): one tensor gathered at a time,
  rank 0 writes it;
- ``full`` (the plain way, for comparison; not used by vopd): the whole student gathered on every
  rank (`vopd.parallel.full_model_state`), rank 0 writes it with `safetensors.torch.save_file`.

The push's footprint is the window's peak RSS minus the RSS at its start. The vLLM server's reload
is not in it (the server is another process). No vLLM environment is needed.

    python benchmarks/bench_vllm_push.py      # writes results/vllm_push_fsdp2.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_memory import SHAPE, model_shape  # noqa: E402
from common import ProcessPeak, machine, machine_markdown, run_ranks, toy_run_overrides, write_results  # noqa: E402

METHODS = ("direct", "gather", "full")


def _full_push(policy, folder: Path) -> None:
    """The plain way: gather the whole student on every rank, rank 0 writes it."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from vopd.parallel import full_model_state
    from vopd.sharded_checkpoint import hf_names, model_shards

    names = hf_names(policy)
    keep = set(model_shards(policy))  # tied weights once
    state = full_model_state(policy)
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({names.get(k, k): v for k, v in state.items() if k in keep}, str(folder / "model.safetensors"))
    del state
    dist.barrier()


def worker(model_dir: str, out: str) -> None:
    """One rank: set up an fsdp2 run, then measure each way of writing the snapshot."""
    import torch.distributed as dist

    import vopd.toyworld  # noqa: F401  registers toyworld:N
    from vopd.config import load_config
    from vopd.parallel import close_process_group
    from vopd.sharded_snapshot import write_sharded_snapshot
    from vopd.train_setup import setup

    try:
        overrides = toy_run_overrides(model_dir, f"{out}.run", steps=False, extra=["parallel.strategy=fsdp2"])
        cfg = load_config(None, overrides)
        policy = setup(cfg).state.policy
        rank = dist.get_rank()
        shard_mb = sum(p.to_local().numel() * p.element_size() for p in policy.parameters()) / 2**20
        rows = {}
        for method in METHODS:
            folder = Path(f"{out}.{method}")
            dist.barrier()
            meter = ProcessPeak()
            meter.start()
            t0 = time.perf_counter()
            if method == "full":
                _full_push(policy, folder)
            else:
                write_sharded_snapshot(policy, folder, mode=method)
            seconds = time.perf_counter() - t0
            rows[method] = {**meter.stop(), "seconds": seconds}
        Path(f"{out}.{rank}.json").write_text(json.dumps({"shard_mb": shard_mb, "methods": rows}))
    finally:
        close_process_group()


def report(result: dict, mach: dict) -> str:
    full_mb = result["params"] * 4 / 2**20
    lines = [
        "# Benchmark 17: the vLLM weight snapshot under fsdp2 (2 processes): peak host memory per rank",
        "",
        machine_markdown(mach),
        "",
        f"Model: the random Qwen2-VL of `bench_memory.py` ({result['params'] / 1e6:.0f}M parameters, fp32, "
        f"**{full_mb:.0f} MB per full copy**), `parallel.strategy=fsdp2`, 2 gloo processes, set up as a run "
        "(EMA teacher, AdamW) before the windows open. **Push footprint** = peak RSS in the window - RSS at "
        "its start (`common.ProcessPeak`). `direct` is what vopd does on one machine, `gather` its fallback "
        "when a rank cannot see the snapshot folder, `full` the plain gather-everything way for comparison. "
        f"Commit {result['commit']}.",
        "",
        "| method | rank | RSS at start MB | push footprint MB | footprint / full copy | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for rank, r in enumerate(result["ranks"]):
            m = r["methods"][method]
            lines.append(
                f"| {method} | {rank} | {m['loaded_rss_mb']:.0f} | {m['peak_above_loaded_mb']:.0f} | "
                f"{m['peak_above_loaded_mb'] / full_mb:.2f} | {m['seconds']:.2f} |"
            )
    largest = result["largest_tensor_mb"]
    gather = max(r["methods"]["gather"]["peak_above_loaded_mb"] for r in result["ranks"])
    lines += [
        "",
        f"Each rank's own student shards: {result['ranks'][0]['shard_mb']:.0f} MB; the largest tensor "
        f"(the embedding) {largest:.0f} MB. `direct` holds no copy (the shards' bytes go to the file as "
        f"they are); `gather` holds one gathered tensor at a time on every rank ({gather / largest:.1f}x "
        "the largest tensor: the full tensor and the collective's buffers); `full` a whole copy on every "
        "rank. The file's pages are the kernel's page cache, not the process's RSS.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from common import build_shaped_model
    from safetensors import safe_open

    tmp = Path(tempfile.mkdtemp(prefix="vopd_bench_vllm_push_"))
    model_dir = build_shaped_model(tmp, SHAPE)
    _, params = model_shape(model_dir)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        largest = max(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    out = tmp / "push"
    ranks = run_ranks(HERE / "bench_vllm_push.py", model_dir, out, threads=args.threads)
    same = {m: (Path(f"{out}.{m}") / "model.safetensors").read_bytes() for m in ("direct", "gather")}
    if same["direct"] != same["gather"]:
        raise RuntimeError("the direct and the gathered snapshots differ")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    result = {
        "machine": machine(),
        "params": params,
        "largest_tensor_mb": largest * 4 / 2**20,
        "commit": commit.stdout.strip(),
        "ranks": ranks,
    }
    write_results("vllm_push_fsdp2", result, report(result, result["machine"]))


if __name__ == "__main__":
    main()
