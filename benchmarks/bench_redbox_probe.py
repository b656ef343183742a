"""What does a toy model read when the red box is drawn: the box, the hint, or the target?

Evaluates one checkpoint (the shipped base by default, or a trained student) greedily on the
held-out scenes under views that separate the three cues of the paper's student input
(Vision-OPD-6K: full image + red evidence box + hint sentence):

- ``full``: clean image, question only (the demo's target metric);
- ``hint_only``: clean image, question + hint (does the hint sentence alone change anything?);
- ``box_only``: red box around the target, question only;
- ``boxed_full``: red box + hint (the paper's student input);
- ``decoy_box``: red box + hint drawn around a *distractor* of another colour. A model that
  reads the box answers the decoy's colour (``follows_decoy``); a model that found the target
  by its own cues (shape word, outline) still answers the target's colour. Every view is scored
  on the same scenes (those with such a distractor), and ``follows_decoy`` of the other views is
  the base rate of answering that distractor's colour without a box on it;
- ``crop``: the teacher's view.

Usage (results go to ``benchmarks/results/redbox/``)::

    PYTHONPATH=src python benchmarks/bench_redbox_probe.py --model toy-base --name base
    PYTHONPATH=src python benchmarks/bench_redbox_probe.py --model RUN/train/checkpoint-200 --name redbox
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "redbox"


def decoy_index(meta: dict, rng: np.random.Generator) -> int | None:
    """A distractor whose colour differs from the target's (None when every object shares it)."""
    others = [i for i, o in enumerate(meta["objects"]) if i != meta["target_index"] and o["colour"] != meta["colour"]]
    return int(rng.choice(others)) if others else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="toy-base", help="toy-base or a checkpoint folder")
    ap.add_argument("--name", required=True, help="result file name under benchmarks/results/redbox/")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=123, help="held-out scenes (123: the demo's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from vopd.config import RolloutConfig
    from vopd.models import build_prompts
    from vopd.records import Box
    from vopd.rollout import HFGenerateEngine
    from vopd.specs import resolve_model_spec
    from vopd.toyworld.model import toy_answer_colour
    from vopd.toyworld.scenes import TOY_VIEW, make_dataset
    from vopd.views import prompt_text, student_view, teacher_view

    torch.set_num_threads(args.threads)
    model, processor = resolve_model_spec(args.model, dtype="float32")
    model.eval()
    samples = make_dataset(args.n, args.seed)
    rng = np.random.default_rng(0)
    decoys = [decoy_index(s.meta, rng) for s in samples]
    from vopd.images import load_image

    clean = dataclasses.replace(TOY_VIEW, draw_box=False)
    boxed = dataclasses.replace(TOY_VIEW, draw_box=True)

    def view(s, name: str, decoy: int | None):
        img = load_image(s.image)
        if name == "full":
            return student_view(img, s.boxes, clean), prompt_text(s, hint=False)
        if name == "hint_only":
            return student_view(img, s.boxes, clean), prompt_text(s, hint=True)
        if name == "box_only":
            return student_view(img, s.boxes, boxed), prompt_text(s, hint=False)
        if name == "boxed_full":
            return student_view(img, s.boxes, boxed), prompt_text(s, hint=True)
        if name == "decoy_box":
            box = Box(*map(float, s.meta["objects"][decoy]["box"]))
            return student_view(img, [box], boxed), prompt_text(s, hint=True)
        if name == "crop":
            return teacher_view(img, s.boxes, TOY_VIEW), prompt_text(s, hint=False)
        raise ValueError(name)

    engine = HFGenerateEngine(processor)
    greedy = RolloutConfig(n=1, temperature=0.0, max_new_tokens=8)
    tok = processor.tokenizer
    result: dict = {"model": args.model, "n": args.n, "seed": args.seed, "threads": args.threads, "views": {}}
    t0 = time.perf_counter()
    for name in ("full", "hint_only", "box_only", "boxed_full", "decoy_box", "crop"):
        # Every view on the same scenes: those with a distractor of another colour (the decoy's).
        idx = [i for i, d in enumerate(decoys) if d is not None]
        colours: list[str | None] = []
        for b in range(0, len(idx), 250):
            chunk = idx[b : b + 250]
            pairs = [view(samples[i], name, decoys[i]) for i in chunk]
            batch = build_prompts(processor, [p[0] for p in pairs], [p[1] for p in pairs])
            with torch.no_grad():
                ro = engine.sample(model, batch, greedy)
            ids = ro.response_ids_B_T.masked_fill(~ro.mask_B_T, tok.pad_token_id)
            colours += [toy_answer_colour(t) for t in tok.batch_decode(ids, skip_special_tokens=True)]
        target = [c == samples[i].meta["colour"] for c, i in zip(colours, idx)]
        # follows_decoy: answers the decoy distractor's colour; on views without the decoy box it
        # is the base rate of that wrong answer, to compare the decoy_box view against.
        follows = [c == samples[i].meta["objects"][decoys[i]]["colour"] for c, i in zip(colours, idx)]
        row = {"n": len(idx), "acc": sum(target) / len(idx), "follows_decoy": sum(follows) / len(idx)}
        result["views"][name] = row
        print(f"{name:11s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "n"), flush=True)
    result["seconds"] = time.perf_counter() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
