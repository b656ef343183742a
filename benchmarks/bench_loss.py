"""Benchmark 3: memory and time of the loss at a real vocabulary (Qwen: V = 151,936, H = 2048).

Loss = forward + backward of the top-100 + tail generalized JSD (beta 0.5) from final hidden
states, token mean, with the LM head trained (its weight gradient included), teacher logits from
its own head under no_grad. Three ways:

- straightforward: student logits [N, V] and teacher logits [N, V] in float32, then
  `token_divergence` on them (what the released code does at response positions);
- chunked: `chunked_token_divergence`, each chunk under torch.utils.checkpoint (the previous default);
- fused: `fused_chunked_divergence` (loss and gradients in one pass over chunks, one head-gradient
  buffer, nothing recomputed; the trainer's default with a linear head).

Every (path, N) measurement runs in a fresh process (``--worker``), one at a time, so each
starts from the same memory baseline. The straightforward path at the target N = 8 x 1024 needs
~15 GB; it runs under an address-space limit (``--limit-gb``) so that if it does not fit it fails
alone instead of waking the kernel's OOM killer on a shared machine.

    python benchmarks/bench_loss.py [--quick] [--sizes 512,1024,8192] [--chunk 64]
    python benchmarks/bench_loss.py --vocab 248320 --hidden 2560 ...   # Qwen3.5-4B's vocabulary and width

Another ``--vocab`` / ``--hidden`` than the default writes ``results/loss_memory_v{V}_h{H}[_quick]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_markdown, summary, timed, write_results  # noqa: E402

from vopd.config import LossConfig  # noqa: E402
from vopd.fused_loss import chunked_token_divergence, fused_chunked_divergence  # noqa: E402
from vopd.objectives import LossKnobs, token_divergence  # noqa: E402

H, V, K = 2048, 151_936, 100
PATHS = ("straightforward", "chunked", "fused")


def _setup(n: int):
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02)
    teacher_head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    teacher_head.weight.copy_(head.weight)
    g = torch.Generator().manual_seed(n)
    student_h = (torch.randn(n, H, generator=g) * 0.5).requires_grad_(True)
    teacher_h = student_h.detach() + 0.1 * torch.randn(n, H, generator=g)
    return head, teacher_head, student_h, teacher_h


def _knobs(chunk: int) -> LossKnobs:
    """JSD beta 0.5 on the student's top-K + tail, ``chunk`` tokens per chunk."""
    return LossKnobs.from_config(LossConfig(beta=0.5, top_k=K, add_tail=True, chunk_size=chunk))


def straightforward(student_h, teacher_h, head, teacher_head, chunk: int) -> float:
    student_logits = head(student_h)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_h)
    loss = token_divergence(student_logits, teacher_logits, beta=0.5, top_k=K, add_tail=True).mean()
    loss.backward()
    return float(loss.detach())


def chunked(student_h, teacher_h, head, teacher_head, chunk: int) -> float:
    per_token, _ = chunked_token_divergence(student_h, head, lambda rows: teacher_head(teacher_h[rows]), _knobs(chunk))
    loss = per_token.mean()
    loss.backward()
    return float(loss.detach())


def fused(student_h, teacher_h, head, teacher_head, chunk: int) -> float:
    n = student_h.shape[0]
    weights_N = torch.full((n,), 1.0 / n)
    loss, _ = fused_chunked_divergence(
        student_h,
        head.weight,
        head.bias,
        lambda rows: teacher_head(teacher_h[rows]),
        weights_N,
        _knobs(chunk),
    )
    loss.backward()
    return float(loss.detach())


def worker(path: str, n: int, chunk: int) -> dict:
    """One measurement in this process; the two heads and the inputs are allocated before the meter starts."""
    head, teacher_head, student_h, teacher_h = _setup(n)
    gc.collect()
    value, seconds, peak = timed(globals()[path], student_h, teacher_h, head, teacher_head, chunk)
    return {
        "path": path,
        "tokens": n,
        "chunk": chunk if path != "straightforward" else None,
        "seconds": seconds,
        "peak_mb": peak,
        "loss": value,
        "hidden_grad_norm": float(student_h.grad.norm()),
        "weight_grad_norm": float(head.weight.grad.norm()),
    }


def _spawn(path: str, n: int, chunk: int, limit_gb: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, str(n), str(chunk), "--limit-gb", str(limit_gb)]
    cmd += ["--vocab", str(V), "--hidden", str(H)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        row = {"path": path, "tokens": n, "failed": f"exit {proc.returncode}: {tail[0][:200]}"}
    else:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(row), flush=True)
    return row


def run(
    sizes: list[int],
    chunks: dict[str, list[int]],
    repeats: int,
    limit_gb: float,
    paths: list[str],
    skip: set[tuple[str, int]],
) -> dict:
    rows = []
    for n in sizes:
        for _ in range(repeats):  # alternate the paths at each size
            for path in paths:
                if (path, n) in skip:
                    continue
                for chunk in chunks.get(path, [0]):
                    rows.append(_spawn(path, n, chunk, limit_gb))
    return {"rows": rows, "sizes": sizes, "chunks": chunks, "repeats": repeats, "limit_gb": limit_gb, "paths": paths}


def report(result: dict, mach: dict) -> str:
    rows = [r for r in result["rows"] if "failed" not in r]

    def agg(path, n, key, chunk=None):
        vals = [
            r[key] for r in rows if r["path"] == path and r["tokens"] == n and (chunk is None or r["chunk"] == chunk)
        ]
        return summary(vals)["median"] if vals else None

    def cell(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    def ratio(a, b, fmt=".3f"):
        return "n/a" if a is None or b is None else format(a / b, fmt)

    lines = [
        f"# Benchmark 3: loss memory and time at V = {V:,}, H = {H} (top-100 + tail JSD, forward + backward)",
        "",
        machine_markdown(mach),
        "",
        f"Median of {result['repeats']} run(s) per cell, each in a fresh process, paths alternating at each N. "
        "Memory = peak MB above the start; ratios are against the straightforward path at the same N.",
        "",
        "| N | path | chunk | peak MB | memory ratio | seconds | time ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in result["sizes"]:
        sp, st = agg("straightforward", n, "peak_mb"), agg("straightforward", n, "seconds")
        for path in result["paths"]:
            for chunk in result["chunks"].get(path, [None]):
                p, t = agg(path, n, "peak_mb", chunk), agg(path, n, "seconds", chunk)
                if p is None:
                    continue
                lines.append(
                    f"| {n} | {path} | {chunk or '-'} | {p:.0f} | {ratio(p, sp)} | {t:.2f} | {ratio(t, st, '.2f')} |"
                )
    lines += _extrapolation(result["sizes"], agg, result["chunks"].get("fused", []))
    failed = [r for r in result["rows"] if "failed" in r]
    if failed:
        lines += ["", "Did not complete: " + "; ".join(f"{r['path']} N={r['tokens']} ({r['failed']})" for r in failed)]
    loads = [r["load_average"][0] for r in result["rows"]]
    lines += [
        "",
        f"1-minute load average after each measurement: {min(loads):.2f} .. {max(loads):.2f} (2 cores, shared).",
        "",
        "Peak = resident memory above the level before the call, sampled every 1 ms (see benchmarks/common.py); "
        f"the weights of the two heads (2 x {V * H * 4 / 1e9:.2f} GB) and the inputs are allocated before and not "
        f"counted; the head's weight gradient ({V * H * 4 / 1e9:.2f} GB float32) is counted in every path, and it is "
        "most of the fused path's peak.",
    ]
    return "\n".join(lines) + "\n"


def _extrapolation(sizes: list[int], agg, fused_chunks: list[int]) -> list[str]:
    """Sizes where the straightforward path did not run: a linear fit through its two largest measured sizes."""
    measured = [n for n in sizes if agg("straightforward", n, "peak_mb") is not None]
    missing = [n for n in sizes if n not in measured]
    if len(measured) < 2 or not missing:
        return []
    n0, n1 = measured[-2], measured[-1]
    out = [""]
    for key, unit in (("peak_mb", "MB"), ("seconds", "s")):
        a, b = agg("straightforward", n0, key), agg("straightforward", n1, key)
        slope = (b - a) / (n1 - n0)
        for n in missing:
            guess = b + slope * (n - n1)
            parts = [
                f"fused chunk {c}: {agg('fused', n, key, c) / guess:.3f}"
                for c in fused_chunks
                if agg("fused", n, key, c)
            ]
            out.append(
                f"- N = {n}: straightforward {key} by a linear fit through N = {n0}, {n1} "
                f"({slope:.3f} {unit} per token): ~{guess:.0f} {unit}; ratio " + ", ".join(parts) + "."
            )
    return out


def main(argv: list[str] | None = None) -> None:
    global V, H  # the workload's shape: read by _setup, _spawn and report
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", help="comma-separated N (default: quick 256,512; full 512,1024,8192)")
    parser.add_argument("--chunk", default="64", help="fused chunk size(s), comma-separated (default 64)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    parser.add_argument("--skip", default="", help="path:N pairs not to run, e.g. chunked:8192")
    parser.add_argument(
        "--chunked-chunk", type=int, default=None, help="checkpointed path's chunk (default: quick 128, full 1024)"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--limit-gb", type=float, default=19.0, help="address-space limit of each worker")
    parser.add_argument("--append", action="store_true", help="add to the rows of the existing results file")
    parser.add_argument("--vocab", type=int, default=V, help=f"vocabulary size (default {V:,}: Qwen2/2.5/3-VL)")
    parser.add_argument("--hidden", type=int, default=H, help=f"hidden size (default {H})")
    parser.add_argument("--worker", nargs=3, metavar=("PATH", "N", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default_shape = (args.vocab, args.hidden) == (V, H)
    V, H = args.vocab, args.hidden
    if args.worker:
        limit = int(args.limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        path, n, chunk = args.worker
        print(json.dumps(worker(path, int(n), int(chunk))))
        return
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([256, 512] if args.quick else [512, 1024, 8192])
    chunks = {
        "chunked": [args.chunked_chunk or (128 if args.quick else 1024)],
        "fused": [int(x) for x in args.chunk.split(",")],
    }
    repeats = args.repeats or (1 if args.quick else 2)
    skip = {(p, int(n)) for p, n in (x.split(":") for x in args.skip.split(",") if x)}
    mach = machine()
    result = run(sizes, chunks, repeats, args.limit_gb, args.paths.split(","), skip)
    name = "loss_memory" + ("" if default_shape else f"_v{V}_h{H}") + ("_quick" if args.quick else "")
    previous = RESULTS / f"{name}.json"
    if args.append and previous.exists():  # e.g. one size at a time on a busy machine
        old = json.loads(previous.read_text())
        result["rows"] = old["rows"] + result["rows"]
        result["sizes"] = sorted(set(old["sizes"]) | set(sizes))
        result["paths"] = [p for p in PATHS if p in set(old["paths"]) | set(result["paths"])]
        result["chunks"] = {k: sorted(set(old["chunks"].get(k, [])) | set(v)) for k, v in result["chunks"].items()}
        mach["earlier_runs"] = old["machine"]
    result["machine"] = mach
    result["quick"] = args.quick
    result["vocab"], result["hidden"] = V, H
    write_results(name, result, report(result, mach))


if __name__ == "__main__":
    main()
