"""Measure the code path of one `train_step`: which vopd files it runs and how often it crosses between them.

    PYTHONPATH=src python scripts/measure_step_path.py [--naive]

Runs one step of the tiny CPU set-up (tiny Qwen2-VL, toy scenes, default loss: fused top-k) under
`sys.setprofile` and records every Python call whose caller and callee are both functions in
``src/vopd``. Prints the files entered and the distinct cross-file call edges
(``caller file:function -> callee file:function``), marking calls made from inside the loss's
autograd Function / chunk loop back into another file (callbacks). Run it on two trees to compare
(benchmarks/results/step_path.md records the numbers before and after the loss refactor).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--naive", action="store_true", help="measure the naive path instead")
    args = parser.parse_args()

    import torch

    import vopd
    import vopd.toyworld  # noqa: F401  (registers toyworld:N where a registry exists)
    import vopd.train_setup as train_setup
    import vopd.trainer as trainer_mod
    from vopd.config import load_config
    from vopd.data import PairCollator

    root = Path(vopd.__file__).resolve().parent
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            None,
            [
                "model.path=tiny:qwen2_vl",
                "data.train=toyworld:4:0",
                "rollout.n=2",
                "rollout.max_new_tokens=4",
                "prompts_per_step=2",
                "micro_batch_prompts=2",
                "report_to=[jsonl]",
                "threads=1",
                "teacher.kind=frozen",
                f"naive={str(args.naive).lower()}",
                f"output_dir={out}",
            ],
        )
        state, sampler, dataset, _ = train_setup.setup(cfg)
        collate = PairCollator(state.processor, thinking=cfg.model.thinking, max_prompt_tokens=None)
        batches = [collate([dataset[i] for i in idx]) for idx in list(iter(sampler))[:1]]

        edges: set[tuple[str, str, str, str]] = set()
        files: set[str] = set()

        def where(frame) -> tuple[str, str] | None:
            path = Path(frame.f_code.co_filename)
            try:
                rel = path.resolve().relative_to(root)
            except ValueError:
                return None
            return str(rel), frame.f_code.co_qualname if hasattr(frame.f_code, "co_qualname") else frame.f_code.co_name

        def profile(frame, event, arg):
            if event != "call":
                return
            callee = where(frame)
            if callee is None:
                return
            files.add(callee[0])
            caller_frame = frame.f_back
            while caller_frame is not None and where(caller_frame) is None:
                caller_frame = caller_frame.f_back  # through torch / transformers frames to the vopd caller
            caller = where(caller_frame) if caller_frame is not None else None
            if caller is not None and caller[0] != callee[0]:
                edges.add((caller[0], caller[1], callee[0], callee[1]))

        torch.manual_seed(0)
        sys.setprofile(profile)
        try:
            trainer_mod.train_step(state, batches)
        finally:
            sys.setprofile(None)

    loss_files = {"objectives.py", "fused_loss.py"}
    print(f"files entered inside train_step: {len(files)}")
    for f in sorted(files):
        print(f"  {f}")
    print(f"distinct cross-file call edges: {len(edges)}")
    callbacks = 0
    for caller_file, caller_fn, callee_file, callee_fn in sorted(edges):
        back = caller_file in loss_files and callee_file not in loss_files and callee_file != "models.py"
        callbacks += back
        mark = "  <- callback out of the loss" if back else ""
        print(f"  {caller_file}:{caller_fn} -> {callee_file}:{callee_fn}{mark}")
    print(f"callbacks from the loss into other vopd files (model adapter excluded): {callbacks}")
    print(f"files crossed between (distinct file pairs): {len({(a, c) for a, _, c, _ in edges})}")


if __name__ == "__main__":
    main()
