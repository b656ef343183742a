"""Bootstrapping crop proposals in the shipped toy world (M): re-propose with the model being trained.

In world M the base reads crops but does not know where the target is: its attention proposals
hold the target for about a quarter of the scenes (docs/proposals.md), so label-free training on
them gains little. If training moves the model's attention towards the target, proposals re-made
by the trained model would be better than the base's, and training on those better still. This
script tests that loop at a small scale, in rounds:

    round r: propose boxes for the training scenes with the model at the start of the round
             (the base in round 0), then train ``--round-steps`` steps from that model on them.

Three arms train in exactly the same rounds and differ only in the boxes the teacher's crop is cut
around: ``box`` (the scenes' gold boxes), ``fixed`` (attention proposals of the base, made once)
and ``bootstrap`` (attention proposals re-made by the arm's own latest checkpoint each round). Each
round is a ``vopd demo`` run from the previous round's checkpoint, with the same frozen teacher
throughout (``teacher.kind=external`` on the base, as a continuous run's frozen teacher), a
constant learning rate (a cosine schedule would restart every round) and its own trainer seed (a
fresh order over the training scenes). Rounds restart the optimiser's moments; the three arms
share that. Gold boxes are read only to measure proposals (hit rate), never to train ``fixed`` or
``bootstrap``.

After each round the arm's checkpoint proposes boxes (attention) for ``--n-probe`` other scenes
(seed 7): its localisation, whatever boxes it was trained on.

    python benchmarks/bench_bootstrap_proposals.py [--rounds 4] [--round-steps 50] [--n-train 1600]
        [--n-eval 500] [--threads 1] [--work runs/bootstrap]

Every stage is skipped when its output is already in ``--work`` (rerun after an interruption).
Writes benchmarks/results/bootstrap_proposals/summary.{json,md} and each round's demo
``results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bootstrap_proposals"
ARMS = ("box", "fixed", "bootstrap")


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _views():
    from vopd.config import load_config, recipe_path

    return load_config(recipe_path("toy_demo"), []).views


def _propose_records(scenes: Path, out: Path, model: str) -> dict:
    """Attention boxes of ``model`` for every record of ``scenes`` written to ``out``; their quality."""
    from vopd.proposals.boxes import write_proposed_boxes
    from vopd.specs import resolve_model_spec

    done = write_proposed_boxes(
        scenes,
        out,
        lambda: resolve_model_spec(model),
        source="attention",
        model_name=model,
        view_cfg=_views(),
        progress=False,
    )
    print(done.report(), flush=True)
    return done.quality


def _localisation(model: str, n: int) -> dict:
    """Attention proposals of ``model`` on ``n`` scenes it never trained on (seed 7), against gold."""
    from vopd.proposals import ProposalConfig, proposal_quality, propose
    from vopd.specs import resolve_model_spec
    from vopd.toyworld.scenes import make_dataset

    net, processor = resolve_model_spec(model)
    scenes = make_dataset(n, 7)
    views = _views()
    found = propose(net, processor, scenes, views, ProposalConfig(source="attention"))
    return proposal_quality(found, scenes, views)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/bootstrap")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--round-steps", type=int, default=50)
    parser.add_argument("--n-train", type=int, default=1600, help="training scenes (seed 1), the same every round")
    parser.add_argument("--n-eval", type=int, default=500, help="held-out scenes of each evaluation (seed 123)")
    parser.add_argument("--n-probe", type=int, default=400, help="scenes of the localisation probe (seed 7)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument(
        "--recipe",
        # the recorded run's recipe: the shipped one of its day had crop replay 0.25 (now 0.05)
        default="optim.schedule=constant,views.student_crop_share=0.25",
        help="comma-separated `vopd train` overrides on top of the shipped toy recipe for every round",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import torch

    from vopd.toyworld.model import toy_base_path

    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    base = str(toy_base_path())

    scenes = work / "scenes" / "records.jsonl"
    if not scenes.exists():
        _run(
            [py, "-m", "vopd.cli", "data", "toyworld", "--n", str(args.n_train), "--seed", "1"]
            + ["--out", str(scenes.parent)]
        )
    progress = work / "progress.json"
    state = json.loads(progress.read_text()) if progress.exists() else {}
    # What made the recorded stages: a rerun with other settings must not reuse them.
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out", "arms", "threads")}
    if state.get("settings", settings) != settings:
        raise SystemExit(
            f"{progress} was made with {state['settings']}, not {settings}: pass another --work or delete it"
        )
    state["settings"] = settings
    if "base_localisation" not in state:
        state["base_localisation"] = _localisation(base, args.n_probe)
    fixed = work / "fixed" / "boxes.jsonl"
    if "fixed_proposals" not in state:
        state["fixed_proposals"] = _propose_records(scenes, fixed, base)
    progress.write_text(json.dumps(state, indent=2))

    for arm in args.arms.split(","):
        model = base
        for r in range(args.rounds):
            key = f"{arm}/{r}"
            run = work / arm / f"round{r}"
            if key not in state and arm == "bootstrap" and r == 0 and "fixed/0" in state:
                # Round 0 proposes with the base: the same boxes, run and result as the fixed arm's round 0.
                state[key] = state["fixed/0"]
            if key not in state:
                data, quality = scenes, None
                if arm == "fixed":
                    data, quality = fixed, state["fixed_proposals"]
                elif arm == "bootstrap":
                    data = work / arm / f"boxes_round{r}.jsonl"
                    quality = _propose_records(scenes, data, model)
                start = time.perf_counter()
                if not (run / "results.json").exists():
                    _run(
                        [py, "-m", "vopd.cli", "demo", "--out", str(run), "--steps", str(args.round_steps)]
                        + ["--eval-every", str(args.round_steps), "--n-eval", str(args.n_eval)]
                        + ["--seed", str(r), "--threads", str(args.threads)]
                        + [f"model.path={model}", f"data.train={data}", "views.crop_source=box"]
                        + ["teacher.kind=external", f"teacher.path={base}"]
                        + [o for o in args.recipe.split(",") if o]
                    )
                results = json.loads((run / "results.json").read_text())
                checkpoint = str((run / results["checkpoint"]).resolve())
                state[key] = {
                    "round": r,
                    "steps_total": (r + 1) * args.round_steps,
                    "trained_from": model,
                    "proposals_trained_on": quality,
                    "full": results["final"]["full"],
                    "crop": results["final"]["crop"],
                    "full_at_round_start": results["base"]["full"],
                    "checkpoint": checkpoint,
                    "localisation_after": _localisation(checkpoint, args.n_probe),
                    "seconds": time.perf_counter() - start,
                }
                shutil.copy(run / "results.json", out / f"{arm}_round{r}_results.json")
                progress.write_text(json.dumps(state, indent=2))
            model = state[key]["checkpoint"]
    _summarise(args, state)


def _summarise(args: argparse.Namespace, state: dict) -> None:
    command = "python benchmarks/bench_bootstrap_proposals.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("work", "out")
    )
    arms = [a for a in args.arms.split(",") if f"{a}/0" in state]
    start = state[f"{arms[0]}/0"]["full_at_round_start"] if arms else float("nan")

    def rel(path: str) -> str:  # paths in the recorded summary relative to the repository, not this machine
        return str(Path(path).relative_to(ROOT)) if Path(path).is_relative_to(ROOT) else path

    summary = {
        "command": command,
        **{
            k: {**v, **{f: rel(v[f]) for f in ("trained_from", "checkpoint") if f in v}} if "/" in k else v
            for k, v in state.items()
        },
    }
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    base_loc = state["base_localisation"]
    lines = [
        "# Bootstrapping attention proposals in world M (re-proposed by the model being trained)",
        "",
        f"`{command}`",
        "",
        f"Base (shipped toy base): clean full {pct(start)} % on {args.n_eval} held-out scenes; its attention "
        f"proposals hold the target on {pct(base_loc['hit_rate'])} % of {base_loc['n']} probe scenes "
        f"(IoU {base_loc['mean_iou']:.2f}) and on {pct(state['fixed_proposals']['hit_rate'])} % of the "
        f"{state['fixed_proposals']['n']} training scenes.",
        "",
        "Per round and arm: the hit rate of the boxes trained on (training scenes), clean full and crop accuracy "
        "after the round (held-out), and the attention hit rate of the checkpoint after the round (probe scenes).",
        "",
        "| arm | round | steps | boxes trained on: hit % | clean full % | crop % | attention hit % after |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        for r in range(args.rounds):
            row = state.get(f"{arm}/{r}")
            if row is None:
                continue
            q = row["proposals_trained_on"]
            lines.append(
                f"| {arm} | {r} | {row['steps_total']} | {'gold' if q is None else pct(q['hit_rate'])} | "
                f"{pct(row['full'])} | {pct(row['crop'])} | {pct(row['localisation_after']['hit_rate'])} |"
            )
    Path(args.out, "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
