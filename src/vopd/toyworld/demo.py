"""``vopd demo``: the paper's whole story on a CPU in minutes.

1. Load the shipped toy base (a 1.3 M-parameter Qwen2-VL that reads colours well on crops but
   finds the target poorly on full images) and measure the regional-to-global gap on held-out
   scenes: clean full image vs evidence crop vs full image with the red box + hint.
2. Train it with label-free Vision-OPD through the library's own trainer (`vopd.trainer.train`,
   the same code path as real training): the student sees the clean full image, the teacher
   the 2x crop; no answer is ever read.
3. Measure again every ``eval_every`` steps, watch the teacher's health, and write
   ``report.md`` with plots and ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep `vopd --help` fast: no torch/transformers import at parse time
    from vopd.config import TrainConfig
    from vopd.records import Sample

BASE_VIEWS = ("full", "crop", "boxed_full")


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    steps: int = 200  # label-free OPD steps
    eval_every: int = 50  # held-out evaluation interval (steps)
    n_eval: int = 500  # held-out scenes
    eval_seed: int = 123  # seed of the held-out scenes (never trained on)
    train_seed: int = 1  # seed of the training scenes
    seed: int = 0  # trainer seed (sampling, order)
    threads: int = 0  # torch threads (0 = all cores)
    teacher: str = "frozen"  # frozen | ema | live | ...
    teacher_rate: float = 0.05
    overrides: tuple[str, ...] = ()  # extra `vopd train` key=value overrides

    def train_overrides(self) -> list[str]:
        n_train = max(16, self.steps * 16)
        return [
            "model.path=toy-base",
            f"data.train=toyworld:{n_train}:{self.train_seed}",
            f"output_dir={Path(self.out) / 'train'}",
            f"max_steps={self.steps}",
            f"seed={self.seed}",
            f"threads={self.threads}",
            f"teacher.kind={self.teacher}",
            f"teacher.rate={self.teacher_rate}",
            f"health.probe_data=toyworld:64:{self.eval_seed + 1}",
            f"health.every={self.eval_every}",
            *self.overrides,
        ]


DEMO_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "toy_demo.yaml"


def demo_train_config(cfg: DemoConfig) -> TrainConfig:
    """The toy recipe ``configs/toy_demo.yaml`` plus the demo's settings."""
    from vopd.config import load_config

    if not DEMO_CONFIG.is_file():
        raise FileNotFoundError(
            f"{DEMO_CONFIG} not found: `vopd demo` runs from a clone of the repository (pip install -e .)"
        )
    return load_config(DEMO_CONFIG, cfg.train_overrides())


class _Evaluator:
    """Trainer callback: held-out accuracy of the student per view every ``every`` steps."""

    def __init__(self, samples: list[Sample], every: int, processor: Any):
        from vopd.toyworld.evaluate import prepare_views

        self.every = every
        self.prepared = prepare_views(processor, samples, views=BASE_VIEWS)
        self.curve: list[dict[str, Any]] = []
        self.last: Any = None

    def evaluate(self, model: Any, processor: Any, step: int) -> dict[str, float]:
        from vopd.toyworld.evaluate import evaluate_views

        result = evaluate_views(model, processor, self.prepared, views=BASE_VIEWS)
        self.last = result
        self.curve.append({"step": step, **result.accuracy})
        return {f"eval/{k}": v for k, v in result.accuracy.items()}

    def __call__(self, state: Any) -> dict[str, float]:
        if state.step % self.every:
            return {}
        return self.evaluate(state.policy, state.processor, state.step)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns (and writes) the results dictionary."""
    import torch

    from vopd.evaluation.stats import mcnemar_exact, paired_table
    from vopd.toyworld.model import toy_base_path
    from vopd.toyworld.scenes import make_dataset
    from vopd.trainer import resolve_model, train

    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    train_cfg = demo_train_config(cfg)
    model, processor = resolve_model(train_cfg)
    held_out = make_dataset(cfg.n_eval, cfg.eval_seed)
    print(f"toy base: {toy_base_path()}; {cfg.n_eval} held-out scenes (seed {cfg.eval_seed})", flush=True)
    evaluator = _Evaluator(held_out, cfg.eval_every, processor)
    evaluator.evaluate(model, processor, 0)
    base = evaluator.last
    print(_line("base", base.accuracy), flush=True)
    del model
    from vopd.toyworld.model import toy_answer_correct

    result = train(train_cfg, callbacks=[evaluator], grader=toy_answer_correct)
    if evaluator.curve[-1]["step"] != result.steps:
        evaluator.evaluate(resolve_model(train_cfg, str(result.checkpoint))[0], processor, result.steps)
    final = evaluator.last
    print(_line("final", final.accuracy), flush=True)
    table = paired_table(base.correct["full"], final.correct["full"])
    results = {
        "base": base.accuracy,
        "final": final.accuracy,
        "gap_base": base.gap(),
        "gap_final": final.gap(),
        "gap_closed": _closed(base.accuracy, final.accuracy),
        "full_gain_p_value": mcnemar_exact(table.only_a_right, table.only_b_right),
        "full_paired_table": dataclasses.asdict(table),
        "curve": evaluator.curve,
        "health": result.health,
        "n_eval": cfg.n_eval,
        "eval_seed": cfg.eval_seed,
        "steps": result.steps,
        "teacher": cfg.teacher,
        "train_seconds": result.wall_seconds,
        "wall_seconds": time.perf_counter() - start,
        "checkpoint": str(result.checkpoint),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from vopd.toyworld.report import write_report

    write_report(out, results, held_out, base, final)
    print(summary_text(results), flush=True)
    return results


def _closed(base: dict[str, float], final: dict[str, float]) -> float:
    gap = base["crop"] - base["full"]
    return (final["full"] - base["full"]) / gap if gap > 0 else float("nan")


def _line(name: str, acc: dict[str, float]) -> str:
    return f"{name:6s} " + "  ".join(f"{k} {v:6.1%}" for k, v in acc.items())


def summary_text(r: dict[str, Any]) -> str:
    return (
        f"\nVision-OPD toy demo ({r['steps']} label-free steps, teacher={r['teacher']}, {r['n_eval']} held-out scenes)\n"
        f"  clean full image: {r['base']['full']:.1%} -> {r['final']['full']:.1%}  "
        f"(paired exact McNemar p = {r['full_gain_p_value']:.2g})\n"
        f"  crop (teacher view): {r['base']['crop']:.1%} -> {r['final']['crop']:.1%}\n"
        f"  boxed full + hint: {r['base']['boxed_full']:.1%} -> {r['final']['boxed_full']:.1%}\n"
        f"  gap (crop - full): {r['gap_base']:+.1%} -> {r['gap_final']:+.1%}  ({r['gap_closed']:.0%} of the gap closed)\n"
        f"  wall time {r['wall_seconds']:.0f} s; report: {Path(r['checkpoint']).parents[1] / 'report.md'}"
    )


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vopd demo`` (mounted by the CLI)."""
    d = DemoConfig()
    parser.add_argument("--out", default=d.out, help="output folder (report.md, results.json, plots, checkpoints)")
    parser.add_argument("--steps", type=int, default=d.steps, help="label-free training steps")
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--n-eval", type=int, default=d.n_eval, help="held-out scenes per evaluation")
    parser.add_argument("--eval-seed", type=int, default=d.eval_seed)
    parser.add_argument("--train-seed", type=int, default=d.train_seed)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--teacher", default=d.teacher, help="frozen (default here: stable in the toy world), ema, live")
    parser.add_argument("--teacher-rate", type=float, default=d.teacher_rate)
    parser.add_argument("--ablations", nargs="*", default=None, metavar="NAME",
                        help="run the ablation suite instead (all, or variants whose name contains NAME)")
    parser.add_argument("overrides", nargs="*", help="extra `vopd train` overrides, e.g. optim.lr=2e-4")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = DemoConfig(
        out=args.out, steps=args.steps, eval_every=args.eval_every, n_eval=args.n_eval, eval_seed=args.eval_seed,
        train_seed=args.train_seed, seed=args.seed, threads=args.threads, teacher=args.teacher,
        teacher_rate=args.teacher_rate, overrides=tuple(args.overrides),
    )
    if args.ablations is not None:
        from vopd.toyworld.ablations import run_ablations

        run_ablations(cfg, only=args.ablations or None)
        return 0
    run_demo(cfg)
    return 0
