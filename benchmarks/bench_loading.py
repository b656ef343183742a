"""Benchmark 12: peak host memory per rank while a run loads (model, teacher, optimiser, data), fsdp2.

Two gloo processes under `torchrun --standalone` set up an fsdp2 run of the ~100M-parameter random
Qwen2-VL of `bench_memory.py` (fp32, EMA teacher) from its folder and stop before the first step.
Per rank (the per-process method of `bench_memory.py`): RSS after imports, and the kernel's peak
RSS over the setup (counter reset just before it; `common.ProcessPeak`). The load footprint is that
peak minus the RSS after imports; it is compared with the rank's share of the state
(`memplan.load_bytes`: its student and teacher shards, plus one decoder layer gathered).

    python benchmarks/bench_loading.py --label after    # writes results/loading_fsdp2.{json,md}

``--label`` names the code measured; rows of earlier labels in the results file are kept, so the
same script run at two commits records before and after side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_memory import SHAPE, model_shape  # noqa: E402
from common import RESULTS, ProcessPeak, machine, machine_markdown, rss_mb, run_ranks, toy_run_overrides, write_results  # noqa: E402
from memplan import load_bytes  # noqa: E402


def worker(model_dir: str, out: str) -> None:
    """One rank: set up the run (nothing trained), write this rank's memory to ``out``.rank.json."""
    import vopd.toyworld  # noqa: F401  registers toyworld:N
    from vopd.config import load_config
    from vopd.train_setup import setup

    imported = rss_mb()
    cfg = load_config(None, toy_run_overrides(model_dir, f"{out}.run", steps=False, extra=["parallel.strategy=fsdp2"]))
    meter = ProcessPeak()
    meter.start()
    setup(cfg)
    marks = meter.stop()
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.{rank}.json").write_text(json.dumps({"rss_after_imports_mb": imported, **marks}))
    sys.stdout.flush()
    os._exit(0)


def report(result: dict, mach: dict) -> str:
    lines = [
        "# Benchmark 12: peak host memory per rank while loading (fsdp2, 2 processes)",
        "",
        machine_markdown(mach),
        "",
        f"Model: the random Qwen2-VL of `bench_memory.py` ({result['params'] / 1e6:.0f}M parameters, fp32, "
        f"{result['params'] * 4 / 2**20:.0f} MB per full copy), loaded from its folder, EMA teacher (fp32), "
        "`parallel.strategy=fsdp2`, 2 gloo processes. Window: the whole `setup` (model, teacher, optimiser, "
        "data; nothing trained). **Load footprint** = peak RSS in the window - RSS after imports. **Shard "
        "estimate** = `memplan.load_bytes` (the rank's student and teacher shards + one decoder layer).",
        "",
        "| code | rank | RSS after imports MB | peak RSS MB | load footprint MB | shard estimate MB | "
        "footprint / estimate |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run in result["runs"].items():
        for rank, r in enumerate(run["ranks"]):
            foot = r["peak_rss_mb"] - r["rss_after_imports_mb"]
            est = run["estimate_mb"]
            lines.append(
                f"| {label} ({run['commit']}) | {rank} | {r['rss_after_imports_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{foot:.0f} | {est:.0f} | {foot / est:.2f} |"
            )
    lines += [
        "",
        "The footprint also holds what every setup holds whatever the model (the processor, the toy-world "
        "data, allocator slack); the estimate counts the tensors only.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="names the code measured (e.g. before / after)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from common import build_shaped_model
    from memplan import ModelShape

    tmp = Path(tempfile.mkdtemp(prefix="vopd_bench_loading_"))
    model_dir = build_shaped_model(tmp, SHAPE)
    shape, params = model_shape(model_dir)
    ranks = run_ranks(HERE / "bench_loading.py", model_dir, tmp / "load", threads=args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    old = RESULTS / "loading_fsdp2.json"
    result = json.loads(old.read_text()) if old.is_file() else {"runs": {}}
    assert isinstance(shape, ModelShape)
    result.update(machine=machine(), params=params)
    result["runs"][args.label] = {"commit": commit.stdout.strip(), "ranks": ranks, "machine": machine()}
    for run in result["runs"].values():  # fp32 EMA teacher (no bf16 copy): 4 + 4 bytes per parameter
        run["estimate_mb"] = load_bytes(shape, strategy="fsdp2", world=2, bf16=False, base_bytes=4) / 2**20
    write_results("loading_fsdp2", result, report(result, result["machine"]))


if __name__ == "__main__":
    main()
