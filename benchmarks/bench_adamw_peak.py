"""Benchmark 19: the transient memory of one AdamW step on CPU, per implementation.

At a real vocabulary the largest tensors are the embedding and the LM head ([V, H] each). torch's
single-tensor AdamW (what ``torch.optim.AdamW`` picks for CPU tensors: no foreach, no fused unless
asked) builds temporaries the size of the tensor it updates; the fused kernel
(``fused=True``, TRL's default ``adamw_torch_fused``) updates in place. Each mode runs in its own
process; the peak is the kernel's VmHWM over the second step (the state already exists) minus the
RSS at its start.

    python benchmarks/bench_adamw_peak.py [--vocab 152064] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_markdown, write_results  # noqa: E402

MODES = ("single_tensor", "foreach", "fused")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) / 1024


def worker(mode: str, vocab: int, hidden: int) -> dict:
    import torch

    torch.set_num_threads(1)
    param = torch.nn.Parameter(torch.randn(vocab, hidden))
    param.grad = torch.randn_like(param)
    kwargs = {"single_tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[mode]
    opt = torch.optim.AdamW([param], lr=1e-3, **kwargs)
    opt.step()  # creates exp_avg and exp_avg_sq
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    start = _status_mb("VmRSS")
    opt.step()
    return {"mode": mode, "tensor_mb": param.numel() * 4 / 2**20, "peak_above_start_mb": _status_mb("VmHWM") - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.vocab, args.hidden)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # big temporaries get their own mapping, returned on free
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--worker", mode, "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    mach = machine()
    lines = [
        f"# Benchmark 19: transient memory of one AdamW step on CPU, a [{args.vocab:,}, {args.hidden}] fp32 tensor",
        "",
        machine_markdown(mach),
        "",
        "| implementation | tensor MB | peak above the step's start, MB |",
        "|---|---|---|",
        *[f"| {r['mode']} | {r['tensor_mb']:.0f} | {r['peak_above_start_mb']:.0f} |" for r in rows],
        "",
        "`torch.optim.AdamW` on CPU tensors defaults to the single-tensor loop. vopd's trainer builds it "
        "that way today (`train_setup.build_optimizer`); TRL's Trainer defaults to `adamw_torch_fused`.",
        "",
    ]
    write_results(f"adamw_peak_v{args.vocab}_h{args.hidden}", {"rows": rows, "machine": mach}, "\n".join(lines))


if __name__ == "__main__":
    main()
