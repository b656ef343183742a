"""Benchmark 7: LoRA vs full fine-tuning on the toy world at equal steps (reduced demo settings).

Both start from the shipped toy base, train label-free Vision-OPD with the toy recipe (frozen
crop teacher) for the same number of steps, and are evaluated on the same held-out scenes; the
share of the base's crop-minus-full gap each closes is recorded.

    python benchmarks/bench_lora_toy.py [--steps 40] [--n-eval 200] [--lora-lr 1e-3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, machine_markdown, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from vopd.toyworld.demo import DemoConfig, run_demo

    tmp = Path(tempfile.mkdtemp(prefix="vopd_lora_toy_"))
    runs = {
        "full fine-tuning (the toy recipe, configs/toy_demo.yaml)": (),
        f"LoRA r={args.lora_r} (lr {args.lora_lr:g})": (
            f"lora.r={args.lora_r}",
            f"lora.alpha={2 * args.lora_r}",
            f"optim.lr={args.lora_lr}",
        ),
    }
    results = {}
    for name, overrides in runs.items():
        cfg = DemoConfig(
            out=str(tmp / str(len(results))),
            steps=args.steps,
            eval_every=args.steps,
            n_eval=args.n_eval,
            threads=args.threads,
            overrides=overrides,
        )
        r = run_demo(cfg)
        results[name] = {
            "base": r["base"],
            "final": r["final"],
            "gap_closed": r["gap_closed"],
            "p_value": r["full_gain_p_value"],
            "wall_seconds": r.get("wall_seconds"),
        }
    mach = machine()
    lines = [
        "# Benchmark 7: LoRA vs full fine-tuning on the toy world, equal steps",
        "",
        machine_markdown(mach),
        "",
        f"Toy recipe (`configs/toy_demo.yaml`: frozen crop teacher, 16 prompts x 2 rollouts per step), "
        f"{args.steps} steps, {args.n_eval} held-out scenes (seed 123); reduced demo settings as in "
        "tests/test_demo.py. LoRA on q/k/v/o/gate/up/down of the language model.",
        "",
        "| run | full (base -> final) | crop (base -> final) | share of the gap closed | McNemar p (full) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['base']['full']:.1%} -> {r['final']['full']:.1%} | {r['base']['crop']:.1%} -> "
            f"{r['final']['crop']:.1%} | {r['gap_closed']:.0%} | {r['p_value']:.2g} |"
        )
    full, lora = (results[k]["gap_closed"] for k in runs)
    lines += [
        "",
        f"LoRA closes {lora:.0%} of the gap where full fine-tuning closes {full:.0%} at equal steps "
        f"(ratio {lora / full:.2f})."
        if full > 0
        else "",
    ]
    write_results("lora_toyworld", {"machine": mach, "args": vars(args), "results": results}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
