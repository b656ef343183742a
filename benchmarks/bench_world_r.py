"""Where the model knows where to look: crop proposals in the resolution-gap toy world "R".

The shipped toy world (M) has a localisation gap: its base reads crops but does not know where
the target is, so no label-free proposal can hand the teacher more than the student has
(docs/proposals.md). World R (``vopd.toyworld.scenes.WORLDS["R"]``) keeps M's layout and outlined
target but fills every object grey and puts its colour in a 4 px square at the centre: the
target is as easy to find, its colour is a small detail at 1x and four times as many pixels in
the 2x crop. This script, deterministic at one thread, runs the experiment end to end:

1. pretrain a base on world R with the shipped recipe (``PretrainConfig(scene=R)``), stopped at
   ``--base-steps`` (picked from the validation curve of an exploratory run, see the results);
2. check the premise: proposals' hit rate and the teacher's accuracy on them against the
   base's own full-image accuracy (``bench_proposal_signal.py --base --world R``);
3. train at equal steps with ``vopd demo --world R model.path=BASE``: gold box vs the label-free
   sources in ``--sources`` (attention by default), and report each one's share of the gold-box
   gain: (full_final - full_0) / (full_final(box) - full_0).

    python benchmarks/bench_world_r.py [--work runs/world_r] [--base-steps 500] [--base-seed 0]
        [--steps 100] [--n-eval 500] [--sources attention] [--threads 1]

The demos train with the toy recipe as it was when the world-R results were first recorded
(``--recipe``, default ``WORLD_R_RECIPE``: lr 1e-4, constant schedule, no crop replay), so that
bases run later stay comparable with the recorded ones after the demo's default recipe changed.

Every stage is skipped when its output is already in ``--work`` (rerun after an interruption).
Writes benchmarks/results/world_r.{json,md}, the base's ``toy_base.json`` and each demo's
``results.json`` under benchmarks/results/world_r/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

#: The `vopd demo` recipe of every recorded world-R result: the toy recipe before it moved to lr 2e-4,
#: cosine and crop replay (what `vopd demo` trained when the first two bases were measured).
WORLD_R_RECIPE = "optim.lr=1e-4,optim.schedule=constant,views.student_crop_share=0"


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/world_r", help="folder for the base and the demo runs")
    parser.add_argument("--base-steps", type=int, default=500, help="pretraining stop step of the world-R base")
    parser.add_argument("--base-seed", type=int, default=0, help="pretraining seed of the world-R base")
    parser.add_argument("--full-world", default="M", help="world of the base's full-image pretraining rows")
    parser.add_argument("--steps", type=int, default=100, help="label-free training steps per demo")
    parser.add_argument("--n-eval", type=int, default=500)
    parser.add_argument("--n-signal", type=int, default=400, help="scenes for the premise check")
    parser.add_argument(
        "--sources",
        default="attention",
        help="label-free crop sources to train with (SOURCE@keepF: the surest fraction F only)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="trainer seed of the demos (vopd demo --seed)")
    parser.add_argument(
        "--recipe",
        default=WORLD_R_RECIPE,
        help="comma-separated `vopd train` overrides on top of the shipped toy recipe for every demo",
    )
    parser.add_argument("--premise-only", action="store_true", help="stop after the premise check (no training)")
    parser.add_argument("--out", default=str(RESULTS / "world_r"))
    args = parser.parse_args()
    name = f"full{args.full_world}_base{args.base_steps}" + (f"_seed{args.base_seed}" if args.base_seed else "")
    work, out = Path(args.work), Path(args.out) / name
    (out).mkdir(parents=True, exist_ok=True)
    py = sys.executable

    base = work / (f"base-{args.full_world}-{args.base_steps}" + (f"-seed{args.base_seed}" if args.base_seed else ""))
    if not (base / "toy_base.json").exists():
        _run(
            [
                py,
                "-m",
                "vopd.cli",
                "toyworld",
                "pretrain",
                "--world",
                "R",
                "--full-world",
                args.full_world,
                "--seed",
                str(args.base_seed),
                "--out",
                str(base),
                "--steps",
                str(args.base_steps),
                "--threads",
                str(args.threads),
                "--eval-every",
                "25",
            ]
        )
    shutil.copy(base / "toy_base.json", out / "toy_base.json")

    signal = out / "proposal_signal"
    if not signal.with_suffix(".json").exists():
        sources = ",".join(dict.fromkeys(s.partition("@keep")[0] for s in args.sources.split(",")))
        _run(
            [
                py,
                "benchmarks/bench_proposal_signal.py",
                "--n",
                str(args.n_signal),
                "--seed",
                "7",
                "--threads",
                str(args.threads),
                "--sources",
                sources,
                "--base",
                str(base),
                "--world",
                "R",
                "--out",
                str(signal),
            ]
        )

    # Does the base know where to look? Its full-image accuracy on world M, where the colour is
    # readable at 1x, against world R (same layouts at the same seed): localisation vs reading.
    where = out / "base_full_by_world.json"
    if not where.exists():
        _run([py, "-c", _WHERE.format(base=str(base), n=args.n_signal, threads=args.threads, out=str(where))])
    by_world = json.loads(where.read_text())

    demos: dict[str, dict] = {}
    tag = f"{args.steps}steps" + (f"_seed{args.seed}" if args.seed else "")
    for source in [] if args.premise_only else ["box", *args.sources.split(",")]:
        run = work / f"{base.name}_{source}_{tag}"
        if not (run / "results.json").exists():
            # SOURCE@keepF trains on the surest fraction F of the proposals (views.proposal_keep).
            name, _, keep = source.partition("@keep")
            _run(
                [
                    py,
                    "-m",
                    "vopd.cli",
                    "demo",
                    "--world",
                    "R",
                    "--out",
                    str(run),
                    "--steps",
                    str(args.steps),
                    "--eval-every",
                    str(max(1, args.steps // 2)),
                    "--n-eval",
                    str(args.n_eval),
                    "--seed",
                    str(args.seed),
                    "--threads",
                    str(args.threads),
                    f"model.path={base}",
                    *[o for o in args.recipe.split(",") if o],
                    f"views.crop_source={name}",
                    *([f"views.proposal_keep={keep}"] if keep else []),
                ]
            )
        shutil.copy(run / "results.json", out / f"{source}_{tag}_results.json")
        demos[source] = json.loads((run / "results.json").read_text())
    _summarise(
        args,
        json.loads((base / "toy_base.json").read_text()),
        json.loads(signal.with_suffix(".json").read_text()),
        by_world,
        demos,
        tag,
    )


_WHERE = """
import json, torch
from vopd.models import load_model
from vopd.toyworld.evaluate import evaluate_views
from vopd.toyworld.scenes import make_dataset, world_config
torch.set_num_threads({threads})
model, processor = load_model({base!r})
acc = {{w: evaluate_views(model, processor, make_dataset({n}, 7, world_config(w)), views=("full", "crop")).accuracy
        for w in ("M", "R")}}
open({out!r}, "w").write(json.dumps({{"n": {n}, "seed": 7, "accuracy": acc}}, indent=2) + "\\n")
"""


def _summarise(
    args: argparse.Namespace, base: dict, signal: dict, by_world: dict, demos: dict[str, dict], tag: str
) -> None:
    start = demos["box"]["base"]["full"] if demos else float("nan")
    gold_gain = demos["box"]["final"]["full"] - start if demos else float("nan")
    rows = []
    for source, r in demos.items():
        curve = " -> ".join(f"{100 * c['full']:.1f}" for c in r["curve"])
        share = (r["final"]["full"] - start) / gold_gain if gold_gain > 0 else float("nan")
        p = r.get("proposals") or {}
        rows.append(
            {
                "source": source,
                "full_curve": curve,
                "final": r["final"],
                "share_of_gold_gain": share,
                "p_value": r["full_gain_p_value"],
                "proposal_hit_rate": p.get("hit_rate"),
                "proposal_iou": p.get("mean_iou"),
                "kept_hit_rate": (p.get("kept") or {}).get("hit_rate"),
                "train_seconds": r["train_seconds"],
            }
        )
    summary = {
        "command": "python benchmarks/bench_world_r.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("work", "out", "premise_only")
        )
        + (" --premise-only" if args.premise_only else ""),
        "base": {
            "steps": args.base_steps,
            "heldout": base.get("heldout"),
            "validation_curve": base.get("validation_curve"),
        },
        "signal": signal["rows"],
        "demos": rows,
    }
    summary["base_full_by_world"] = by_world
    path = Path(args.out) / (
        f"full{args.full_world}_base{args.base_steps}"
        + (f"_seed{args.base_seed}" if args.base_seed else "")
        + ("" if args.premise_only else f"_{tag}")
    )
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f} %"

    held = (base.get("heldout") or {}).get("accuracy", {})
    lines = [
        "# Crop proposals in the resolution-gap toy world R",
        "",
        f"`{summary['command']}`",
        "",
        f"Base: world R crops, world {args.full_world} full images, pretrained {args.base_steps} steps "
        f"(seed {args.base_seed}) "
        f"(shipped recipe otherwise); held-out world R "
        f"(500 scenes): full {pct(held.get('full'))}, crop {pct(held.get('crop'))}, "
        f"boxed full {pct(held.get('boxed_full'))}. Validation curve (200 world-R scenes, step: full / "
        "crop): "
        + ", ".join(f"{c['step']}: {pct(c['full'])} / {pct(c['crop'])}" for c in base.get("validation_curve", []))
        + ".",
        "",
        f"Where it looks vs what it reads ({by_world['n']} scenes, seed 7, the same layouts in both "
        f"worlds): full image {pct(by_world['accuracy']['M']['full'])} on world M (colour filling the "
        f"object) against {pct(by_world['accuracy']['R']['full'])} on world R (colour in a "
        f"4-px mark); crop {pct(by_world['accuracy']['M']['crop'])} / {pct(by_world['accuracy']['R']['crop'])}.",
        "",
        f"## Premise: do the proposals find the target? ({signal['n']} scenes, seed 7)",
        "",
        "| crop source | hit rate | teacher acc on its crop | student acc (full) | disagree | teacher right "
        "when they disagree | student right when they disagree |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in [
        (n, row)
        for name, r0 in signal["rows"].items()
        for n, row in ((name, r0), (f"{name}, surest fifth by score", r0.get("surest_fifth")))
        if row
    ]:
        lines.append(
            f"| {label} | {pct(r['hit_rate'])} | {pct(r['teacher_acc'])} | {pct(r['student_acc'])} | "
            f"{pct(r['disagree'])} | {pct(r['teacher_right_when_disagree'])} | "
            f"{pct(r['student_right_when_disagree'])} |"
        )
    if args.premise_only:
        lines += ["", "(`--premise-only`: no training runs.)"]
    else:
        lines += [
            "",
            f"## Training at equal steps ({args.steps} label-free steps, {args.n_eval} held-out scenes)",
            "",
            "| crop source | clean full (evaluations) | gain (points) | crop at end | share of the gold-box gain "
            "| McNemar p | proposals vs gold (training scenes) | train s |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        prop = (
            "-"
            if r["proposal_hit_rate"] is None
            else f"hit {pct(r['proposal_hit_rate'])}, IoU {r['proposal_iou']:.2f}"
            + ("" if r["kept_hit_rate"] is None else f"; kept: hit {pct(r['kept_hit_rate'])}")
        )
        lines.append(
            f"| {r['source']} | {r['full_curve']} | {100 * (r['final']['full'] - start):+.1f} | "
            f"{pct(r['final']['crop'])} | {r['share_of_gold_gain']:.3f} | {r['p_value']:.2g} | "
            f"{prop} | {r['train_seconds']:.0f} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
