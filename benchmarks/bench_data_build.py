"""``vopd data build`` end to end in the toy world: images -> built data -> training, against gold data.

1. ``vopd data toyworld`` writes ``--n`` training scenes (seed 1, the demo's training seed).
2. Regions: the scenes' target boxes, labelled by shape, as a boxes file (a detector that found
   the outlined object: ``given``), and, with ``--proposals``, the toy base's own ``attention``
   proposals (no boxes at all).
3. ``vopd data build`` against two scripted OpenAI-compatible servers on 127.0.0.1
   (``tests/support/toy_oracle.py``): the writer knows each scene's objects and writes the toy
   question ("What color is the circle?") about the object in the red box, with its colour among
   four options; the filter is a noisy reader, right in each of its 8 samples with probability
   ``--p-right``. The build's views are the toy recipe's (``configs/toy_demo.yaml``).
4. ``vopd data check`` on the output, then ``vopd demo`` trained on it (``data.train=BUILT``)
   and on the gold toy data, at equal steps and threads; both are evaluated on the same held-out
   scenes (clean full image, open question), so the comparison is the share of the gap closed.

    python benchmarks/bench_data_build.py [--work runs/data_build] [--n 2000] [--steps 100]
        [--n-eval 200] [--threads 1] [--p-right 0.9] [--proposals [--no-proposed-training]]

Writes benchmarks/results/data_build_toy.{json,md}. Stages whose output exists in ``--work`` are
skipped (the build itself resumes from its caches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the scripted servers live with the tests

TEMPLATE = "image={image} label={label}\n{views}\nWrite one multiple-choice question as JSON."


def _vopd(*args: str) -> None:
    cmd = [sys.executable, "-m", "vopd.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _boxes_file(records: Path, out: Path) -> None:
    from vopd.records import load_records

    rows = []
    for s in load_records(records):
        rows.append({"image": str(s.image), "boxes": [b.as_list() for b in s.boxes], "labels": [s.meta["shape"]]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _build(work: Path, name: str, regions: list[str], args: argparse.Namespace) -> dict:
    from support.fake_server import FakeChatServer
    from support.toy_oracle import ToyOracle

    from vopd.cli import main

    out = work / name / "data.jsonl"
    oracle = ToyOracle(work / "toy" / "records.jsonl", p_right=args.p_right)
    limit = 40 * args.n
    with (
        FakeChatServer(oracle.writer, max_requests=limit, lifetime_s=3600) as writer,
        FakeChatServer(oracle.filter, max_requests=limit, lifetime_s=3600) as filt,
    ):
        start = time.perf_counter()
        code = main(
            [
                "data", "build", str(work / "toy" / "images"), *regions, "--out", str(out),
                "--config", str(ROOT / "configs" / "toy_demo.yaml"),
                "--writer-url", writer.url, "--writer-model", "toy-oracle-writer",
                "--writer-prompt", str(work / "template.txt"), "--writer-full-image",
                "--filter-url", filt.url, "--filter-model", f"toy-noisy-filter-p{args.p_right}",
                "--no-progress",
            ]
        )  # fmt: skip
        seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"vopd data build failed ({code})")
    _vopd("data", "check", str(out), "--config", str(ROOT / "configs" / "toy_demo.yaml"))
    summary = json.loads(out.with_name("data.summary.json").read_text())
    return {"out": str(out.relative_to(work)), "build_seconds": round(seconds, 1), **summary, **_on_target(work, out)}


def _on_target(work: Path, out: Path) -> dict:
    """How many built questions ask about each scene's outlined target (what the gold data asks about)."""
    from vopd.records import load_records

    gold = {Path(str(s.image)).name: s for s in load_records(work / "toy" / "records.jsonl")}
    built = load_records(out).samples
    hits = sum(s.question == gold[Path(str(s.image)).name].question for s in built)
    return {"asks_about_target": hits, "asks_about_target_share": round(hits / max(len(built), 1), 4)}


def _demo(work: Path, name: str, args: argparse.Namespace, *overrides: str) -> dict:
    out = work / name
    if not (out / "results.json").is_file():
        _vopd(
            "demo", "--out", str(out), "--steps", str(args.steps), "--eval-every", str(args.steps),
            "--n-eval", str(args.n_eval), "--threads", str(args.threads), *overrides,
        )  # fmt: skip
    r = json.loads((out / "results.json").read_text())
    keep = ("base", "final", "gap_base", "gap_final", "gap_closed", "full_gain_p_value", "steps", "train_seconds")
    return {k: r[k] for k in keep}


def _prompt_probe(work: Path, n: int = 120) -> dict:
    """The toy base's greedy accuracy on the first ``n`` built questions, crop and full image, with the
    built prompt (options + instruction) and with the open toy question (what the evaluation asks)."""
    import dataclasses

    import torch

    from vopd.evaluation.backends import HFBackend
    from vopd.evaluation.types import PromptItem
    from vopd.images import load_image
    from vopd.records import load_records
    from vopd.specs import resolve_model_spec
    from vopd.toyworld.model import toy_answer_colour
    from vopd.toyworld.scenes import TOY_VIEW
    from vopd.views import prompt_text, teacher_view

    torch.manual_seed(0)
    model, processor = resolve_model_spec("toy-base")
    backend = HFBackend(model.eval(), processor, max_new_tokens=8)
    samples = load_records(work / "given" / "data.jsonl").samples[:n]
    out = {}
    for view in ("crop", "full"):
        for prompt in ("multiple choice", "open"):
            items = []
            for s in samples:
                image = load_image(s.image)
                shown = teacher_view(image, s.boxes, TOY_VIEW) if view == "crop" else image
                asked = s if prompt == "multiple choice" else dataclasses.replace(s, options=None)
                items.append(PromptItem(id=s.id, image=shown, text=prompt_text(asked, hint=False)))
            replies = [r for i in range(0, n, 40) for r in backend.generate(items[i : i + 40])]
            right = sum(toy_answer_colour(r) == s.options[ord(s.answer) - 65] for r, s in zip(replies, samples))
            out[f"{view}, {prompt}"] = round(right / len(samples), 4)
    return {"n": len(samples), **out}


def _markdown(result: dict) -> str:
    lines = [
        "# `vopd data build` in the toy world: yield per stage, then training on the built data",
        "",
        f"Machine load at start: {result['load']}. Command: `{result['command']}`. Builds and demos "
        "found in --work are reused (the recorded demos ran on the shared 2-core machine at load 12-46).",
        "",
        "## Yield per stage",
        "",
        "| build | images | regions kept | questions | kept by filter | records | about the target | drops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, b in result["builds"].items():
        st = b["stages"]
        drops = {k: v for s in st.values() for k, v in s.items() if k in _DROPS and v}
        lines.append(
            f"| {name} | {st['images']['read']} | {st['regions']['kept']} of {st['regions']['found']} | "
            f"{st['writer']['written']} | {st['filter']['kept']} | {b['records']} | "
            f"{b['asks_about_target_share']:.0%} | " + ", ".join(f"{k} {v}" for k, v in drops.items()) + " |"
        )
    lines += [
        "",
        f"## Training at equal steps ({result['steps']} steps, {result['n_eval']} held-out scenes, "
        f"--threads {result['threads']})",
        "",
        "| data | full before | full after | crop after | gap closed | p (full gain) | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in result["training"].items():
        lines.append(
            f"| {name} | {d['base']['full']:.1%} | {d['final']['full']:.1%} | {d['final']['crop']:.1%} | "
            f"{d['gap_closed']:.0%} | {d['full_gain_p_value']:.2g} | {d['train_seconds']:.0f} |"
        )
    probe = result.get("prompt_probe")
    if probe:
        lines += [
            "",
            f"## The toy base on the built prompts (greedy, first {probe['n']} built questions)",
            "",
            "| view, prompt | accuracy |",
            "|---|---|",
            *[f"| {k} | {v:.1%} |" for k, v in probe.items() if k != "n"],
        ]
    return "\n".join(lines) + "\n"


_DROPS = (
    "too_large",
    "too_small",
    "writer_failed",
    "writer_invalid_json",
    "writer_bad_fields",
    "writer_answer_not_in_options",
    "filter_failed",
    "filter_disagrees",
    "filter_unsure",
    "filter_too_easy",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/data_build")
    parser.add_argument("--n", type=int, default=2000, help="toy training images")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--p-right", type=float, default=0.9, help="the noisy filter's per-sample accuracy")
    parser.add_argument("--proposals", action="store_true", help="also build from the toy base's attention proposals")
    parser.add_argument("--no-train", action="store_true", help="build and check only")
    parser.add_argument(
        "--no-proposed-training",
        action="store_true",
        help="with --proposals: build from them, train on given boxes only",
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import vopd.toyworld  # noqa: F401  registers toy-base

    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if not (work / "toy" / "records.jsonl").is_file():
        _vopd("data", "toyworld", "--n", str(args.n), "--seed", "1", "--out", str(work / "toy"))
    (work / "template.txt").write_text(TEMPLATE)
    _boxes_file(work / "toy" / "records.jsonl", work / "boxes.jsonl")
    builds = {"given boxes": _build(work, "given", ["--boxes", str(work / "boxes.jsonl")], args)}
    if args.proposals:
        builds["attention proposals"] = _build(
            work, "proposed", ["--propose-model", "toy-base", "--source", "attention"], args
        )
    result = {
        "load": load,
        "command": "python benchmarks/bench_data_build.py " + " ".join(sys.argv[1:]),
        "n_images": args.n,
        "p_right": args.p_right,
        "steps": args.steps,
        "n_eval": args.n_eval,
        "threads": args.threads,
        "builds": builds,
        "training": {},
    }
    if not args.no_train:
        result["prompt_probe"] = _prompt_probe(work)
        result["training"]["gold toy data (vopd demo)"] = _demo(work, "demo_gold", args)
        built = work / "given" / "data.jsonl"
        result["training"]["built from given boxes"] = _demo(work, "demo_built", args, f"data.train={built}")
        if args.proposals and not args.no_proposed_training:
            built = work / "proposed" / "data.jsonl"
            result["training"]["built from attention proposals"] = _demo(
                work, "demo_proposed", args, f"data.train={built}"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_build_toy.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "data_build_toy.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
