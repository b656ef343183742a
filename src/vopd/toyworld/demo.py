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

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vopd.toyworld.run_info import describe_configuration, run_configuration

if TYPE_CHECKING:  # keep `vopd --help` fast: no torch/transformers import at parse time
    from vopd.config import TrainConfig

BASE_VIEWS = ("full", "crop", "boxed_full")


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    steps: int = 300  # label-free OPD steps (the recipe's max_steps)
    eval_every: int = 50  # held-out evaluation interval (steps)
    n_eval: int = 500  # held-out scenes
    eval_seed: int = 123  # seed of the held-out scenes (never trained on)
    train_seed: int = 1  # seed of the training scenes
    seed: int = 0  # trainer seed (sampling, order)
    threads: int = 0  # torch threads (0 = all cores)
    teacher: str = "frozen"  # frozen | ema | live | ...
    teacher_rate: float = 0.05
    overrides: tuple[str, ...] = ()  # extra `vopd train` key=value overrides
    # Toy world of the training, probe and held-out scenes (vopd.toyworld.scenes.WORLDS). "M" is
    # the shipped world and its base; another world needs its own base (model.path=DIR).
    world: str = "M"

    def __post_init__(self) -> None:
        from vopd.knobs import ConfigError

        # 0 steps would train by the recipe's own length, 0 scenes or interval would fail late (a plot, a modulo)
        for name, flag in (("steps", "--steps"), ("eval_every", "--eval-every"), ("n_eval", "--n-eval")):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0: all cores), got {self.threads}")

    def _spec(self, n: int, seed: int) -> str:
        # World M keeps the spec it always had, so its recorded configurations stay the same.
        return f"toyworld:{n}:{seed}" + ("" if self.world == "M" else f":{self.world}")

    def train_overrides(self) -> list[str]:
        n_train = max(16, self.steps * 16)
        return [
            "model.path=toy-base",
            f"data.train={self._spec(n_train, self.train_seed)}",
            f"output_dir={Path(self.out) / 'train'}",
            f"max_steps={self.steps}",
            f"seed={self.seed}",
            f"threads={self.threads}",
            f"teacher.kind={self.teacher}",
            f"teacher.{'mix' if self.teacher == 'trust_region' else 'ema_rate'}={self.teacher_rate}",
            f"health.probe_data={self._spec(64, self.eval_seed + 1)}",
            f"health.every={self.eval_every}",
            *self.overrides,
        ]


def demo_train_config(cfg: DemoConfig) -> TrainConfig:
    """The shipped toy recipe (``configs/toy_demo.yaml``, package data) plus the demo's settings."""
    from vopd.config import load_config, recipe_path

    return load_config(recipe_path("toy_demo"), cfg.train_overrides())


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns (and writes) the results dictionary."""
    import torch

    from vopd.evaluation.stats import mcnemar_exact, paired_table
    from vopd.toyworld.evaluate import HeldOutEvaluator
    from vopd.toyworld.model import toy_base_path
    from vopd.toyworld.scenes import make_dataset, world_config
    from vopd.train_setup import resolve_model
    from vopd.trainer import train

    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    train_cfg = demo_train_config(cfg)
    conf = run_configuration(train_cfg)
    print(f"configuration: {describe_configuration(conf)}", flush=True)
    model, processor = resolve_model(train_cfg)
    held_out = make_dataset(cfg.n_eval, cfg.eval_seed, world_config(cfg.world))
    base_name = toy_base_path() if train_cfg.model.path == "toy-base" else train_cfg.model.path
    world = "" if cfg.world == "M" else f", world {cfg.world}"
    if cfg.world != "M" and train_cfg.model.path == "toy-base":
        print(
            f"warning: the shipped toy base was trained on world M, not {cfg.world}; "
            "pass model.path=DIR with a base pretrained on this world",
            flush=True,
        )
    print(f"toy base: {base_name}; {cfg.n_eval} held-out scenes (seed {cfg.eval_seed}{world})", flush=True)
    evaluator = HeldOutEvaluator(held_out, cfg.eval_every, processor, views=BASE_VIEWS)
    evaluator.evaluate(model, processor, 0)
    base = evaluator.last
    print(_line("base", base.accuracy), flush=True)
    del model
    from vopd.toyworld.model import toy_answer_correct

    # The demo owns its folder: a re-run replaces the earlier training run in it.
    result = train(train_cfg, overwrite=True, callbacks=[evaluator], grader=toy_answer_correct)
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
        **({} if cfg.world == "M" else {"world": cfg.world}),
        "steps": result.steps,
        "teacher": conf["teacher"],
        "config": conf,
        "train_seconds": result.wall_seconds,
        "wall_seconds": time.perf_counter() - start,
        # Relative to this results file's folder, so it resolves wherever the command ran.
        "checkpoint": os.path.relpath(Path(result.checkpoint).resolve(), out.resolve()),
        "report": "report.md",
    }
    if train_cfg.views.crop_source != "box":
        results["proposals"] = measure_proposals(train_cfg, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from vopd.toyworld.report import write_report

    write_report(out, results, held_out, base, final)
    print(summary_text(results, out), flush=True)
    return results


def measure_proposals(train_cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """Quality of the crops the model proposed for training, against the scenes' gold boxes.

    Gold boxes are read here, after training, only to measure (hit rate, IoU); training dropped
    them before proposing. With ``views.proposal_keep`` < 1, ``kept`` measures the proposals that
    training used.
    """
    from vopd.data import load_train_samples
    from vopd.proposals import PROPOSALS_FILE, proposal_quality, read_proposals, surest

    path = Path(train_cfg.output_dir) / PROPOSALS_FILE
    proposals = read_proposals(path, source=train_cfg.views.crop_source)
    gold = load_train_samples(train_cfg.data.train)
    quality = {
        "source": train_cfg.views.crop_source,
        "file": os.path.relpath(path.resolve(), out.resolve()),
        **proposal_quality(proposals, gold, train_cfg.views),
    }
    if train_cfg.views.proposal_keep < 1:
        quality["kept"] = {
            "keep": train_cfg.views.proposal_keep,
            **proposal_quality(surest(proposals, train_cfg.views.proposal_keep), gold, train_cfg.views),
        }
    return quality


def _steps_word(conf: dict[str, Any] | None) -> str:
    """How the steps learned: label-free unless the objective reads the reference answers."""
    objective = (conf or {}).get("objective", "opd")
    from vopd.config import LABELLED_OBJECTIVES

    return "labelled" if objective in LABELLED_OBJECTIVES else "label-free"


def _closed(base: dict[str, float], final: dict[str, float]) -> float:
    gap = base["crop"] - base["full"]
    return (final["full"] - base["full"]) / gap if gap > 0 else float("nan")


def _line(name: str, acc: dict[str, float]) -> str:
    return f"{name:6s} " + "  ".join(f"{k} {v:6.1%}" for k, v in acc.items())


def _fallbacks(p: dict[str, Any]) -> str:
    """Grounding's answers without a usable box (their crop was the whole image); the kept share, if any."""
    note = f", {p['unparsed'] + p['degenerate']} answers without a box (whole image)" if "unparsed" in p else ""
    if p.get("kept"):
        note += f"; trained on the surest {p['kept']['n']} (hit rate {p['kept']['hit_rate']:.1%})"
    return note


def summary_text(r: dict[str, Any], out: str | Path) -> str:
    """The console summary of a demo's ``results.json`` written under ``out``."""
    return (
        f"\nVision-OPD toy demo ({r['steps']} {_steps_word(r.get('config'))} steps, {r['n_eval']} held-out scenes)\n"
        f"  configuration: {describe_configuration(r.get('config'))}\n"
        f"  clean full image: {r['base']['full']:.1%} -> {r['final']['full']:.1%}  "
        f"(paired exact McNemar p = {r['full_gain_p_value']:.2g})\n"
        f"  crop (teacher view): {r['base']['crop']:.1%} -> {r['final']['crop']:.1%}\n"
        f"  boxed full + hint: {r['base']['boxed_full']:.1%} -> {r['final']['boxed_full']:.1%}\n"
        f"  gap (crop - full): {r['gap_base']:+.1%} -> {r['gap_final']:+.1%}  "
        f"({r['gap_closed']:.0%} of the gap closed)\n"
        + (
            f"  proposed crops ({r['proposals']['source']}): hit rate {r['proposals']['hit_rate']:.1%}, "
            f"mean IoU {r['proposals']['mean_iou']:.2f}{_fallbacks(r['proposals'])}\n"
            if r.get("proposals", {}).get("hit_rate") is not None
            else ""
        )
        + f"  wall time {r['wall_seconds']:.0f} s; report: {Path(out) / r['report']}"
    )
