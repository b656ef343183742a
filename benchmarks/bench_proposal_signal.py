"""What a crop-proposal source leaves Vision-OPD to learn from, on toy scenes.

OPD moves the student only where the teacher (on its crop) and the student (on the full image)
disagree; it helps where the teacher is then right and hurts where the student was. For each
proposal source this measures, with the shipped toy base as both (and the gold boxes read only to
grade):

- the teacher's accuracy on its proposed crops and the proposals' hit rate;
- the share of scenes where the teacher's answer differs from the student's;
- among those disagreements, how often the teacher is right and how often the student is;
- the same for the surest fifth of the proposals by their score (what ``views.proposal_keep=0.2``
  trains on), to see whether the score singles out useful samples or merely easy ones.

    python benchmarks/bench_proposal_signal.py [--n 400] [--seed 7] [--threads 1]
        [--sources attention,search,search@0.5x0.25]

``search@W x S`` runs the search source with windows of W x the shorter side every S windows.
Writes benchmarks/results/proposal_signal_toy.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _signal(samples: list[Any], teacher: list[str], student: list[str]) -> dict[str, Any]:
    from vopd.toyworld.model import toy_answer_colour, toy_answer_correct

    t_ok = [toy_answer_correct(t, s) for t, s in zip(teacher, samples)]
    s_ok = [toy_answer_correct(a, s) for a, s in zip(student, samples)]
    differ = [toy_answer_colour(t) != toy_answer_colour(a) for t, a in zip(teacher, student)]
    n_diff = sum(differ)
    return {
        "n": len(samples),
        "teacher_acc": sum(t_ok) / len(samples),
        "student_acc": sum(s_ok) / len(samples),
        "disagree": n_diff / len(samples),
        "teacher_right_when_disagree": sum(t for t, d in zip(t_ok, differ) if d) / n_diff if n_diff else None,
        "student_right_when_disagree": sum(s for s, d in zip(s_ok, differ) if d) / n_diff if n_diff else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base", default=None, help="base checkpoint folder (default: the shipped toy base)")
    parser.add_argument("--world", default="M", help="toy world of the scenes (vopd.toyworld.scenes.WORLDS)")
    parser.add_argument("--sources", default="attention,search,search@0.5x0.25")
    parser.add_argument("--out", default=str(RESULTS / "proposal_signal_toy"))
    args = parser.parse_args()

    import torch

    from vopd.models import load_model
    from vopd.proposals import ProposalConfig, proposal_quality, propose, surest, with_proposed_boxes
    from vopd.toyworld.evaluate import evaluate_views
    from vopd.toyworld.model import toy_base_path
    from vopd.toyworld.scenes import TOY_VIEW, make_dataset, world_config

    torch.set_num_threads(args.threads)
    command = (
        f"python benchmarks/bench_proposal_signal.py --n {args.n} --seed {args.seed} "
        f"--threads {args.threads} --sources {args.sources}"
    )
    # Non-default base/world are named in the command; the shipped base's command stays as recorded.
    command += (f" --base {args.base}" if args.base else "") + (f" --world {args.world}" if args.world != "M" else "")
    model, processor = load_model(args.base or str(toy_base_path()))
    samples = make_dataset(args.n, args.seed, world_config(args.world))
    student = evaluate_views(model, processor, samples, views=("full",)).responses["full"]
    gold = evaluate_views(model, processor, samples, views=("crop",)).responses["crop"]
    rows: dict[str, Any] = {"gold box": {**_signal(samples, gold, student), "hit_rate": 1.0}}
    for spec in args.sources.split(","):
        source, _, shape = spec.partition("@")
        window, stride = (float(v) for v in shape.split("x")) if shape else (1 / 3, 0.5)
        start = time.perf_counter()
        props = propose(
            model, processor, samples, TOY_VIEW, ProposalConfig(source=source, window=window, stride=stride)
        )
        seconds = (time.perf_counter() - start) / len(samples)
        teacher = evaluate_views(model, processor, with_proposed_boxes(samples, props), views=("crop",)).responses[
            "crop"
        ]
        by_id = {s.id: i for i, s in enumerate(samples)}
        keep = [by_id[p.sample_id] for p in surest(props, 0.2)]
        rows[spec] = {
            **_signal(samples, teacher, student),
            "hit_rate": proposal_quality(props, samples, TOY_VIEW)["hit_rate"],
            "seconds_per_scene": seconds,
            "surest_fifth": {
                **_signal([samples[i] for i in keep], [teacher[i] for i in keep], [student[i] for i in keep]),
                "hit_rate": proposal_quality([props[i] for i in keep], samples, TOY_VIEW)["hit_rate"],
            },
        }
        print(spec, json.dumps(rows[spec]), flush=True)
    out = {"n": args.n, "seed": args.seed, "threads": args.threads, "command": command, "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(out, indent=2))

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f} %"

    lines = [
        f"# What each proposal source leaves OPD to learn ({args.n} toy scenes, seed {args.seed}, "
        + (f"base {args.base}, world {args.world})" if args.base else "shipped base)"),
        "",
        f"`{command}`",
        "",
        "| crop source | scenes | hit rate | teacher acc | student acc (full) | disagree | teacher right when they "
        "disagree | student right when they disagree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        for label, row in [(name, r), (f"{name}, surest fifth by score", r.get("surest_fifth"))]:
            if row:
                lines.append(
                    f"| {label} | {row['n']} | {pct(row['hit_rate'])} | {pct(row['teacher_acc'])} | "
                    f"{pct(row['student_acc'])} | {pct(row['disagree'])} | "
                    f"{pct(row['teacher_right_when_disagree'])} | {pct(row['student_right_when_disagree'])} |"
                )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
