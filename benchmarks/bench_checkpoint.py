"""Benchmark 11: checkpoint save time and peak host memory per rank, sharded (dcp) vs gathered (hf).

Two gloo processes under `torchrun --standalone` train one step of the ~100M-parameter random
Qwen2-VL of `bench_memory.py` (fp32, EMA teacher, fsdp2), then save the same state twice, each
into its own folder: ``checkpoint.format=dcp`` (every rank writes its own shards) and
``checkpoint.format=hf`` (student, teacher and AdamW state gathered to rank 0, which writes them).
Per rank and save: wall seconds (the slowest rank is the save's time) and peak RSS above the RSS
before the save (`common.ProcessPeak`: the kernel's peak counter is reset before each save). Then
rank 0 writes the plain HF folder from the sharded checkpoint (`vopd export`), measured alike.
The order of the two saves alternates with ``--order``.

    python benchmarks/bench_checkpoint.py            # writes results/checkpoint_save.{json,md}
    python benchmarks/bench_checkpoint.py --file-mb 0 --name checkpoint_save_one_file  # one dcp file per rank
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_memory import SHAPE  # noqa: E402
from common import ProcessPeak, machine, machine_markdown, rss_mb, run_ranks, toy_run_overrides, write_results  # noqa: E402


def worker(model_dir: str, out: str, order: list[str], file_mb: int) -> None:
    """One rank: train one step, save it in each format of ``order``, write ``out``.rank.json."""
    import gc

    import vopd.sharded_checkpoint as sc

    if file_mb:
        sc.FILE_BYTES = file_mb << 20
    else:
        sc.FILE_BYTES = 1 << 62  # one file per rank
    import torch.distributed as dist

    import vopd.toyworld  # noqa: F401  registers toyworld:N
    import vopd.trainer as trainer
    from vopd.config import load_config
    from vopd.sharded_checkpoint import export_checkpoint

    rank = int(os.environ.get("RANK", "0"))
    results: dict[str, dict] = {}

    def after_step(state):
        meter = ProcessPeak()
        for fmt in order:
            state.cfg.checkpoint.format = fmt
            state.cfg.output_dir = f"{out}.{fmt}"
            gc.collect()
            dist.barrier()
            meter.start()
            start = time.perf_counter()
            trainer._save(state)
            results[fmt] = {"seconds": time.perf_counter() - start, **meter.stop()}
        gc.collect()
        dist.barrier()
        if rank == 0:
            meter.start()
            start = time.perf_counter()
            export_checkpoint(Path(f"{out}.dcp") / "checkpoint-1", Path(f"{out}.export"))
            results["export"] = {"seconds": time.perf_counter() - start, **meter.stop()}
        results["sizes_mb"] = {
            fmt: sum(p.stat().st_size for p in Path(f"{out}.{fmt}").rglob("*") if p.is_file()) / 2**20 for fmt in order
        }
        Path(f"{out}.{rank}.json").write_text(json.dumps({"rss_mb": rss_mb(), **results}))
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)

    cfg = load_config(None, toy_run_overrides(model_dir, f"{out}.run", extra=["parallel.strategy=fsdp2"]))
    trainer.train(cfg, callbacks=[after_step])
    raise RuntimeError("the run ended before step 1")


def report(result: dict, mach: dict) -> str:
    ranks = result["ranks"]
    files = f"about {result['file_mb']} MB of a rank's shards each" if result["file_mb"] else "one per rank"
    lines = [
        "# Benchmark 11: checkpoint save, sharded (dcp) vs gathered (hf), 2 processes",
        "",
        machine_markdown(mach),
        "",
        f"Model: the random Qwen2-VL of `bench_memory.py` ({result['params'] / 1e6:.0f}M parameters), fp32, "
        "EMA teacher (fp32), AdamW, `parallel.strategy=fsdp2`, 2 gloo processes (`torchrun --standalone`), "
        f"after one training step. Save order: {', '.join(result['order'])}. dcp files: {files}. "
        "Per save: wall seconds of the "
        "slowest rank and, per rank, peak RSS above the RSS before the save (peak counter reset before each).",
        "",
        "| save | seconds (slowest rank) | peak above start, rank 0 (MB) | rank 1 (MB) | on disk (MB) |",
        "|---|---|---|---|---|",
    ]
    for fmt in result["order"]:
        secs = max(r[fmt]["seconds"] for r in ranks)
        peaks = [r[fmt]["peak_above_loaded_mb"] for r in ranks]
        label = {"dcp": "dcp (each rank writes its shards)", "hf": "hf (gathered to rank 0)"}[fmt]
        lines.append(f"| {label} | {secs:.2f} | {peaks[0]:.0f} | {peaks[1]:.0f} | {ranks[0]['sizes_mb'][fmt]:.0f} |")
    ex = ranks[0]["export"]
    lines += [
        f"| `vopd export` of the dcp checkpoint (rank 0 alone) | {ex['seconds']:.2f} | "
        f"{ex['peak_above_loaded_mb']:.0f} | - | - |",
        "",
        f"State per copy: {result['params'] * 4 / 2**20:.0f} MB (fp32 student); the gathered save holds the full "
        "student, teacher and AdamW moments (4 copies) on rank 0; the sharded save holds no gathered tensor, "
        "only the serialised bytes of its own file. The hf save's checkpoint also includes the full HF "
        "weights; the dcp one does not (its last checkpoint of a run gets them through the export). "
        f"Peak counter reset worked: {all(r[f]['reset'] for r in ranks for f in result['order'])}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], argv[2], argv[3].split(","), int(argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", default="dcp,hf", help="save order (default dcp,hf)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--file-mb", type=int, default=256, help="dcp: MB of a rank's shards per file (0: one file per rank)"
    )
    parser.add_argument("--name", default="checkpoint_save", help="results file name")
    args = parser.parse_args(argv)
    from bench_memory import model_shape
    from common import build_shaped_model

    tmp = Path(tempfile.mkdtemp(prefix="vopd_bench_ckpt_"))
    model_dir = build_shaped_model(tmp, SHAPE)
    _, params = model_shape(model_dir)
    mach = machine()
    ranks = run_ranks(
        HERE / "bench_checkpoint.py", model_dir, tmp / "ckpt", args.order, str(args.file_mb), threads=args.threads
    )
    result = {"machine": mach, "params": params, "order": args.order.split(","), "ranks": ranks}
    result["file_mb"] = args.file_mb
    write_results(args.name, result, report(result, mach))


if __name__ == "__main__":
    main()
