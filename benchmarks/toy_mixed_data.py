"""Training scenes of the toy world with per-sample student views, written as a JSONL dataset.

The trainer's ``views.draw_box`` / ``views.hint`` switch the student view for *every* sample.
These experiments need a mix within one batch, so the views are baked into the records instead
(the trainer reads them unchanged with ``views.draw_box=false views.hint=false``):

- ``clean``: the clean full image and question (the demo's student view);
- ``boxed`` (share ``--box``): the full image with the red evidence box drawn in, the hint
  sentence appended to the question (the Vision-OPD-6K student input); the teacher's crop is
  cut from the *clean* image, as in Vision-OPD-6K (``teacher_image``);
- ``hint`` (share ``--hint``): the clean image with the hint sentence, no box;
- ``crop`` (share ``--crop``): crop replay: the student sees the teacher's own zoomed crop
  (``image`` = ``teacher_image``). With a frozen teacher its loss starts at zero and pulls the
  student's crop reading back to the teacher's, so the crop skill the student never trains on
  elsewhere cannot drift freely.

Scene ``i`` is scene ``i`` of ``make_dataset(n, seed)``, the same scenes as ``toyworld:N:SEED``;
each sample's kind follows ``replay_draw(sample.id)`` (uniform in [0, 1), a hash of the id), the
draw the trainer's ``views.student_crop_share`` uses, so ``--crop S`` alone reproduces that knob.

    PYTHONPATH=src python benchmarks/toy_mixed_data.py --n 3200 --seed 1 --box 0.5 --out data/mix_box50
    vopd demo --out runs/mix_box50 data.train=data/mix_box50/records.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--box", type=float, default=0.0, help="share of boxed + hint student views")
    ap.add_argument("--hint", type=float, default=0.0, help="share of clean image + hint student views")
    ap.add_argument("--crop", type=float, default=0.0, help="share of crop-replay samples")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if min(args.box, args.hint, args.crop) < 0 or args.box + args.hint + args.crop > 1:
        raise SystemExit("--box, --hint and --crop are shares in [0, 1] that sum to at most 1")

    from vopd.images import load_image
    from vopd.records import write_records
    from vopd.toyworld.scenes import TOY_VIEW, make_dataset
    from vopd.views import HINT, prompt_text, replay_draw, student_view, teacher_view

    boxed_cfg = dataclasses.replace(TOY_VIEW, draw_box=True)
    out = []
    kinds: Counter[str] = Counter()
    for s in make_dataset(args.n, args.seed):
        u = replay_draw(s.id)
        kind = (
            "boxed"
            if u < args.box
            else "hint"
            if u < args.box + args.hint
            else "crop"
            if u < args.box + args.hint + args.crop
            else "clean"
        )
        kinds[kind] += 1
        image = load_image(s.image)
        crop = teacher_view(image, s.boxes, TOY_VIEW)
        meta = {**s.meta, "student_view": kind}
        if kind == "clean":
            out.append(dataclasses.replace(s, meta=meta))
            continue
        hinted = f"{s.question}\n\n{HINT}"
        # The trainer's own layout with views.hint=true, so the text is exactly the hint view's.
        assert prompt_text(dataclasses.replace(s, question=hinted), hint=False) == prompt_text(s, hint=True)
        if kind == "boxed":
            s = dataclasses.replace(
                s, image=student_view(image, s.boxes, boxed_cfg), question=hinted, teacher_image=crop
            )
        elif kind == "hint":
            s = dataclasses.replace(s, question=hinted)
        else:
            s = dataclasses.replace(s, image=crop, boxes=[], teacher_image=crop)
        out.append(dataclasses.replace(s, meta=meta))
    path = write_records(out, Path(args.out) / "records.jsonl")
    (Path(args.out) / "mix.json").write_text(json.dumps({**vars(args), "kinds": dict(kinds)}, indent=2))
    print(f"{path}: {dict(kinds)}")


if __name__ == "__main__":
    main()
