"""Crop proposals on toy scenes: do the model's own proposals find the evidence?

For each proposal source (``search``, ``attention``, ``grounding``; :mod:`vopd.proposals`) the
shipped toy base proposes one crop per scene, with no box given. Measured against the gold boxes:

- hit rate (the gold box wholly inside the proposed crop), centre hit rate, mean IoU with the gold crop;
- the teacher's accuracy on the proposed crops (the base's greedy answer on the crop it proposed,
  graded against the label): what Vision-OPD's teacher would know; compare with the base's
  accuracy on the gold crop and on the clean full image (the student's view);
- seconds per scene;
- for ``grounding``, how the answers parsed (a box, or none: the whole image stands in, a miss).

    python benchmarks/bench_proposals.py [--n 100] [--seed 7] [--threads 1] [--sources search,attention,grounding]

Writes benchmarks/results/proposals_toy.{json,md}. Rows of sources not measured this time are kept
from the file already there when it was made with the same --n, --seed, --window and --stride
(each row keeps the command that measured it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base", default=None, help="base checkpoint folder (default: the shipped toy base)")
    parser.add_argument("--world", default="M", help="toy world of the scenes (vopd.toyworld.scenes.WORLDS)")
    parser.add_argument("--sources", default="search,attention,grounding")
    parser.add_argument("--window", type=float, default=1 / 3, help="candidate window side / shorter image side")
    parser.add_argument("--stride", type=float, default=0.5, help="window step / window side")
    parser.add_argument("--out", default=str(RESULTS / "proposals_toy"))
    args = parser.parse_args()

    import torch

    from vopd.models import load_model
    from vopd.proposals import ProposalConfig, proposal_quality, propose, with_proposed_boxes
    from vopd.toyworld.evaluate import evaluate_views
    from vopd.toyworld.model import toy_base_path
    from vopd.toyworld.scenes import TOY_VIEW, make_dataset, world_config

    torch.set_num_threads(args.threads)
    command = (
        f"python benchmarks/bench_proposals.py --n {args.n} --seed {args.seed} --threads {args.threads} "
        f"--window {args.window:.4g} --stride {args.stride:.4g} --sources {args.sources}"
    )
    path = Path(args.out)
    # Non-default base/world are named in the command; the shipped base's command stays as recorded.
    command += (f" --base {args.base}" if args.base else "") + (f" --world {args.world}" if args.world != "M" else "")
    model, processor = load_model(args.base or str(toy_base_path()))
    samples = make_dataset(args.n, args.seed, world_config(args.world))
    reference = evaluate_views(model, processor, samples, views=("full", "crop")).accuracy
    rows = {
        "gold box": {"teacher_acc": reference["crop"], "hit_rate": 1.0, "mean_iou": 1.0},
        "none (student's full image)": {"teacher_acc": reference["full"]},
    }
    for source in args.sources.split(","):
        start = time.perf_counter()
        props = propose(
            model, processor, samples, TOY_VIEW, ProposalConfig(source=source, window=args.window, stride=args.stride)
        )
        seconds = time.perf_counter() - start
        proposed = with_proposed_boxes(samples, props)
        acc = evaluate_views(model, processor, proposed, views=("crop",)).accuracy["crop"]
        rows[source] = {
            **proposal_quality(props, samples, TOY_VIEW),
            "teacher_acc": acc,
            "seconds_per_scene": seconds / len(samples),
            "command": command,
        }
        print(source, rows[source], flush=True)
    measured = {name: r for name, r in rows.items() if name in args.sources.split(",")}
    reference_rows = {name: r for name, r in rows.items() if name not in measured}
    rows = {**reference_rows, **_kept_rows(path.with_suffix(".json"), args), **measured}
    out = {
        "n": args.n,
        "seed": args.seed,
        "threads": args.threads,
        "window": args.window,
        "stride": args.stride,
        "rows": rows,
        "command": command,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = [
        f"# Crop proposals on {args.n} toy scenes (seed {args.seed}), "
        + (f"base {args.base}, world {args.world}" if args.base else "shipped toy base"),
        "",
        f"`{out['command']}`",
        "",
        "| crop source | teacher accuracy on its crop | hit rate | centre hit rate | mean IoU | s/scene "
        "| answers without a usable box |",
        "|---|---|---|---|---|---|---|",
    ]

    def f(x, pct=True):
        return "-" if x is None else (f"{100 * x:.1f} %" if pct else f"{x:.2f}")

    for name, r in rows.items():
        fallback = "-" if "unparsed" not in r else f"{r['unparsed'] + r['degenerate']} of {args.n} (whole image)"
        lines.append(
            f"| {name} | {f(r['teacher_acc'])} | {f(r.get('hit_rate'))} | {f(r.get('centre_hit_rate'))} | "
            f"{f(r.get('mean_iou'), False)} | {f(r.get('seconds_per_scene'), False)} | {fallback} |"
        )
    kept = [
        f"{name}: `{r.get('command', out['command'])}`"
        for name, r in rows.items()
        if "seconds_per_scene" in r and r.get("command") != command
    ]
    if kept:
        lines += ["", "Rows measured by an earlier run of this script: " + "; ".join(kept) + "."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _kept_rows(path: Path, args: argparse.Namespace) -> dict:
    """Proposal rows of the earlier results file that this run did not measure (same scenes and windows)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if [old.get(k) for k in ("n", "seed", "window", "stride")] != [args.n, args.seed, args.window, args.stride]:
        return {}
    return {
        name: {"command": old.get("command"), **r}
        for name, r in old["rows"].items()
        if "seconds_per_scene" in r and name not in args.sources.split(",")
    }


if __name__ == "__main__":
    main()
