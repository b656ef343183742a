"""``vopd demo --ablations``: the paper's ablations, replayed in the toy world.

Every variant starts from the same shipped base, trains on the same scenes for the same steps and
is evaluated on the same held-out scenes; only the named knob changes. The paper's baselines run
through the same trainer with ``objective=...``: supervised fine-tuning on the gold answers on full
images (the upper bound), SFT on the teacher's own crop answers (the paper's "SFT on self-teacher",
no labels) and OPSD (the teacher sees the full image and the reference answer).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from vopd.toyworld.run_info import describe_configuration

#: name -> extra `vopd train` overrides on top of the demo recipe (frozen teacher, JSD, top-100+tail).
OPD_VARIANTS: dict[str, list[str]] = {
    "frozen teacher (demo default)": [],
    "EMA 0.05 teacher (paper default)": ["teacher.kind=ema", "teacher.ema_rate=0.05"],
    "EMA 0.01 teacher": ["teacher.kind=ema", "teacher.ema_rate=0.01"],
    "live teacher": ["teacher.kind=live"],
    "control: teacher sees the full image": ["teacher.view=full"],
    "forward KL (beta 0)": ["loss.beta=0"],
    "reverse KL (beta 1)": ["loss.beta=1"],
    "full vocabulary": ["loss.estimator=full"],
    "sampled-token estimator": ["loss.estimator=sampled", "loss.beta=1"],
    "red box + hint student": ["views.draw_box=true", "views.hint=true"],
}
#: The paper's baselines, through the same trainer and demo (`objective`, docs/method.md "Baselines").
#: The SFT rows decode one answer per prompt: greedy answers repeated n times would weigh the same.
BASELINE_VARIANTS: dict[str, list[str]] = {
    "SFT, gold labels, full images (upper bound)": ["objective=sft_gold", "rollout.n=1"],
    "SFT on self-teacher crop answers": ["objective=sft_self", "rollout.temperature=0", "rollout.n=1"],
    "OPSD (teacher: full image + reference answer)": ["objective=opsd"],
}
#: Every variant, in table order.
VARIANTS: dict[str, list[str]] = {**OPD_VARIANTS, **BASELINE_VARIANTS}


def run_ablations(cfg: Any, *, only: list[str] | None = None) -> dict[str, Any]:
    """Run every variant (or those whose name contains one of ``only``); write ablations.json/.md."""
    from vopd.toyworld.demo import run_demo

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "ablations.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    names = list(VARIANTS)
    if only:
        names = [n for n in names if any(o.lower() in n.lower() for o in only)]
    for i, name in enumerate(names):
        if name in results:  # resumable: finished variants are kept
            continue
        print(f"\n=== ablation {i + 1}/{len(names)}: {name}", flush=True)
        sub = out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        run = dataclasses.replace(cfg, out=str(sub), overrides=(*cfg.overrides, *VARIANTS[name]))
        r = run_demo(run)
        results[name] = {
            "config": r["config"],
            "curve": r["curve"],
            "health": r["health"],
            "wall_seconds": r["wall_seconds"],
            "p_value_full": r["full_gain_p_value"],
            "results": f"{sub.name}/results.json",
        }
        results_path.write_text(json.dumps(results, indent=2))
    (out / "ablations.md").write_text(ablation_table(results))
    plot_ablations(results, out / "ablations.png")
    print(ablation_table(results))
    return results


def ablation_table(results: dict[str, Any]) -> str:
    lines = [
        "| variant | configuration that ran | clean full: start -> best -> end | crop at end | boxed full at end "
        "| min teacher probe acc |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        full = [c["full"] for c in r["curve"]]
        health = [h["health/teacher_acc"] for h in r.get("health", []) if "health/teacher_acc" in h]
        teacher = f"{100 * min(health):.1f}" if health else "-"
        lines.append(
            f"| {name} | {describe_configuration(r.get('config'))} | "
            f"{100 * full[0]:.1f} -> {100 * max(full):.1f} -> {100 * full[-1]:.1f} | "
            f"{100 * r['curve'][-1]['crop']:.1f} | {100 * r['curve'][-1]['boxed_full']:.1f} | {teacher} |"
        )
    return "\n".join(lines) + "\n"


def plot_ablations(results: dict[str, Any], path: Path) -> None:
    from vopd.toyworld.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 5))
    for name, r in results.items():
        style = "--" if name in BASELINE_VARIANTS else "-"
        ax.plot(
            [c["step"] for c in r["curve"]], [100 * c["full"] for c in r["curve"]], style, marker="o", ms=3, label=name
        )
    ax.set(xlabel="step", ylabel="clean full-image accuracy (%)", ylim=(0, 102), title="Toy-world ablations (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
