"""Benchmarks 2 and 4: what each optimisation of vopd's step buys, and how the step scales.

2. Ablation on the peer workload (same model, 336 px images), one process, the modes taking turns
   step by step so machine noise hits them alike:
   - naive: vocabulary logits at every prompt and response position, loss in one piece, every
     image encoded and every prompt decoded n times (``naive=true``);
   - logits: response-position logits and the chunked loss, nothing shared (``sharing="none"``);
   - image: + each image encoded once per prompt (``sharing="image"``);
   - prefix: + the prompt decoded once for its n rollouts (the default).
4. Scaling: step time (naive vs default) as image tokens grow (image side 224 -> 896 px, 64 -> 1024
   tokens) and as n grows (1 -> 8); a PNG of both curves.

    python benchmarks/bench_vopd.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peer import VopdRunner  # noqa: E402
from common import RESULTS, build_workload_model, machine, machine_markdown, summary, write_results  # noqa: E402

MODES = {"naive": (True, None), "logits": (False, "none"), "image": (False, "image"), "prefix": (False, "prefix")}


def ablation(model_dir: Path, tmp: Path, *, P: int, n: int, T: int, steps: int) -> dict:
    runners = {
        m: VopdRunner(model_dir, P=P, n=n, T=T, beta=0.5, out=tmp / f"abl_{m}", naive=naive, sharing=sharing)
        for m, (naive, sharing) in MODES.items()
    }
    out: dict[str, list[dict]] = {m: [] for m in MODES}
    for i in range(steps + 1):  # step 0 is warm-up
        for m, runner in runners.items():
            rec = runner.step()
            if i:
                out[m].append(rec)
        print(
            f"ablation step {i}: " + ", ".join(f"{m} {out[m][-1]['seconds']:.2f}s" for m in MODES if out[m]), flush=True
        )
    return {"workload": {"P": P, "n": n, "T": T}, "steps": steps, "records": out}


def scaling(model_dir: Path, tmp: Path, *, sizes: list[int], ns: list[int], P: int, n: int, T: int, steps: int) -> dict:
    rows = []
    grid = [("image_tokens", s, n) for s in sizes] + [("n", 336, k) for k in ns]
    for axis, size, k in grid:
        runners = {
            m: VopdRunner(
                model_dir,
                P=P,
                n=k,
                T=T,
                beta=0.5,
                out=tmp / f"sc_{axis}_{size}_{k}_{m}",
                naive=m == "naive",
                image_size=size,
            )
            for m in ("naive", "prefix")
        }
        times: dict[str, list[float]] = {m: [] for m in runners}
        for i in range(steps + 1):
            for m, runner in runners.items():
                rec = runner.step()
                if i:
                    times[m].append(rec["time_teacher"] + rec["time_student"])
        for m, t in times.items():
            rows.append(
                {
                    "axis": axis,
                    "image_side": size,
                    "image_tokens": (size // 28) ** 2,
                    "n": k,
                    "mode": m,
                    "scoring_seconds": summary(t)["median"],
                }
            )
        print(
            f"scaling {axis} side={size} n={k}: "
            + ", ".join(f"{m} {summary(t)['median']:.2f}s" for m, t in times.items()),
            flush=True,
        )
    return {"workload": {"P": P, "T": T, "n_for_image_axis": n}, "steps": steps, "rows": rows}


def plot(scale: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, key, label in (
        (axes[0], "image_tokens", "image_tokens", "image tokens per image"),
        (axes[1], "n", "n", "rollouts per prompt n"),
    ):
        for mode, style in (("naive", "o--"), ("prefix", "s-")):
            pts = sorted(
                (r[key], r["scoring_seconds"]) for r in scale["rows"] if r["axis"] == axis and r["mode"] == mode
            )
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], style, label="naive" if mode == "naive" else "vopd (default)"
            )
        ax.set_xlabel(label)
        ax.set_ylabel("teacher + student seconds per step (median)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    w = scale["workload"]
    axes[0].set_title(f"P={w['P']}, n={w['n_for_image_axis']}, T={w['T']}")
    axes[1].set_title(f"P={w['P']}, 144 image tokens, T={w['T']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(result: dict, mach: dict, png: str) -> str:
    abl, scale = result["ablation"], result["scaling"]
    w = abl["workload"]
    med = {m: summary([r["seconds"] for r in recs])["median"] for m, recs in abl["records"].items()}
    mem = {m: summary([r["peak_mb"] for r in recs])["median"] for m, recs in abl["records"].items()}
    sco = {
        m: summary([r["time_teacher"] + r["time_student"] for r in recs])["median"]
        for m, recs in abl["records"].items()
    }
    smp = {m: summary([r["time_sample"] for r in recs])["median"] for m, recs in abl["records"].items()}
    saved = sco["naive"] - sco["prefix"]
    lines = [
        "# Benchmarks 2 and 4: vopd optimisations and scaling",
        "",
        machine_markdown(mach),
        "",
        f"## 2. Ablation (P={w['P']}, n={w['n']}, T={w['T']}, 336 px images, modes take turns every step, "
        f"{abl['steps']} measured steps each)",
        "",
        "| mode | median s/step | of which sampling | teacher + student s | peak MB | share of the scoring saving |",
        "|---|---|---|---|---|---|",
    ]
    prev = None
    for m in MODES:
        share = "" if prev is None else f"{(sco[prev] - sco[m]) / saved:+.0%}" if saved > 0 else "n/a"
        lines.append(f"| {m} | {med[m]:.2f} | {smp[m]:.2f} | {sco[m]:.2f} | {mem[m]:.0f} | {share} |")
        prev = m
    lines += [
        "",
        f"Default vs naive: {sco['prefix'] / sco['naive']:.2f}x the teacher + student time, "
        f"{med['prefix'] / med['naive']:.2f}x the whole step, "
        f"{mem['prefix'] / max(mem['naive'], 1):.2f}x the peak memory. "
        "Sampling (HF generate, the same code in all modes) is part of every step; peak memory is the step's.",
        "",
        "## 4. Scaling (naive vs default)",
        "",
        "Scoring time = teacher forward + student forward/backward + loss (sampling, identical in both, excluded; "
        "steps alternate between the modes).",
        "",
        f"![scaling]({png})",
        "",
        "| axis | image tokens | n | naive scoring s | default scoring s | default/naive |",
        "|---|---|---|---|---|---|",
    ]
    for axis in ("image_tokens", "n"):
        pts = {}
        for r in scale["rows"]:
            if r["axis"] == axis:
                pts.setdefault((r["image_tokens"], r["n"]), {})[r["mode"]] = r["scoring_seconds"]
        for (tok, k), v in sorted(pts.items()):
            lines.append(
                f"| {axis} | {tok} | {k} | {v['naive']:.2f} | {v['prefix']:.2f} | {v['prefix'] / v['naive']:.2f} |"
            )
    lines += [
        "",
        "Noise: each point is the median of few steps (load average at the start is given above); on a "
        "shared machine single steps vary up to 2x, so read the trend, not single points. "
        "Expected growth: naive scoring is linear in n x (prompt + response) tokens; the default "
        "is linear in prompt tokens (once per prompt) plus n x response tokens.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    mach = machine()
    tmp = Path(tempfile.mkdtemp(prefix="vopd_bench_"))
    model_dir = build_workload_model(tmp / "model")
    if args.quick:
        abl = ablation(model_dir, tmp, P=2, n=4, T=16, steps=2)
        scale = scaling(model_dir, tmp, sizes=[224, 448, 896], ns=[1, 4, 8], P=1, n=4, T=4, steps=1)
    else:
        abl = ablation(model_dir, tmp, P=2, n=8, T=32, steps=4)
        scale = scaling(model_dir, tmp, sizes=[224, 336, 448, 672, 896], ns=[1, 2, 4, 8], P=2, n=4, T=16, steps=2)
    name = "vopd_ablation_scaling" + ("_quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(scale, RESULTS / f"{name}.png")
    result = {"ablation": abl, "scaling": scale, "machine": mach, "quick": args.quick}
    write_results(name, result, report(result, mach, f"{name}.png"))


if __name__ == "__main__":
    main()
