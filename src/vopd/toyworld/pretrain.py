"""Supervised pretraining of the toy base model: a model with a regional-to-global gap.

The base is trained from scratch with labels (cross-entropy on the answer tokens) on a mix that
is heavy on crops: per step 32 labelled crops (half clean, half cut from the boxed image with
the hint), 4 clean full images and 4 boxed full images with the hint. Crops are easy (the crop
mostly shows the target alone), full images are hard (find the outlined target among 3-5
objects), so after ~150 steps the model reads crops almost perfectly but full images only about
half the time: the gap Vision-OPD is meant to close. The window where that holds is narrow
(full accuracy takes off soon after), so the base is stopped at a FIXED step and shipped as a
checkpoint rather than retrained on the fly.

Every scene is drawn from the seed, so a run is deterministic given ``seed`` and the thread
count (CPU kernels may sum in a different order with another thread count).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from vopd.models import append_responses, build_prompts, response_logits
from vopd.records import Sample
from vopd.tiny_models import save_tiny
from vopd.toyworld.evaluate import evaluate_views, prepare_views
from vopd.toyworld.model import TOY_BASE_DIR, build_toy_model
from vopd.toyworld.scenes import (
    HELDOUT_SEED,
    VALIDATION_SEED,
    VIEWS,
    SceneConfig,
    make_dataset,
    make_scene,
    scene_rng,
    view_input,
)

__all__ = ["DEFAULT_BASE_DIR", "PretrainConfig", "pretrain_base", "answer_batch", "supervised_loss"]

#: Where the shipped base checkpoint lives (inside the package, so `pip install` carries it).
DEFAULT_BASE_DIR = TOY_BASE_DIR
# Training scenes come from their own seed stream, apart from the validation/held-out seeds.
_TRAIN_STREAM = 1_000_003


@dataclasses.dataclass
class PretrainConfig:
    """Supervised base pretraining (the recipe of docs/toyworld.md).

    Attributes:
        out: output folder for the checkpoint (None: do not save).
        steps: optimiser steps; the shipped base stops at this fixed step.
        seed: seeds the weights and the training scenes.
        lr: AdamW learning rate (keep <= 3e-4: higher rates kill the vision tower's gradient).
        warmup: linear warmup steps, then constant.
        clip: gradient-norm clip.
        crops: labelled crops per step; half clean, half cut from the boxed image with the hint.
        full: clean full images per step.
        boxed_full: boxed full images with the hint per step.
        eval_every: evaluate every this many steps on ``eval_n`` validation scenes (0: never).
        eval_n: validation scenes for the periodic evaluations.
        final_eval_n: held-out scenes for the final evaluation written to ``toy_base.json``.
        threads: torch CPU threads (set explicitly: results depend on it at the last bits).
        snapshot_dir: also save the model at every evaluation step to ``snapshot_dir/step-N``
            (to pick the stop step; the weights at step N do not depend on ``steps``).
        scene: the world.
        full_scene: the world of the full-image rows (clean and boxed); None: ``scene``. A base
            for world "R" learns where the target is on world "M" full images (colour readable at
            1x) and reads R's small marks on crops: it knows where to look but cannot read the
            detail at full resolution, the premise of crop proposals (docs/proposals.md).
    """

    out: str | None = None
    steps: int = 150
    seed: int = 0
    lr: float = 3e-4
    warmup: int = 30
    clip: float = 1.0
    crops: int = 32
    full: int = 4
    boxed_full: int = 4
    eval_every: int = 25
    eval_n: int = 200
    final_eval_n: int = 500
    threads: int = 2
    snapshot_dir: str | None = None
    scene: SceneConfig = dataclasses.field(default_factory=SceneConfig)
    full_scene: SceneConfig | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "crops", "full", "boxed_full", "eval_n", "final_eval_n", "threads"):
            if getattr(self, name) < (1 if name in ("steps", "threads") else 0):
                raise ValueError(f"PretrainConfig.{name} must be >= 0 (steps, threads >= 1), got {getattr(self, name)}")
        if not 0 < self.lr <= 1e-2:
            raise ValueError(f"PretrainConfig.lr must be in (0, 1e-2], got {self.lr}")
        if self.crops % 2:
            raise ValueError(f"PretrainConfig.crops must be even (half clean, half boxed), got {self.crops}")


def answer_batch(processor: Any, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference answers + end-of-turn as right-padded ids ``[B, T]`` and a mask ``[B, T]``."""
    tok = processor.tokenizer
    rows = [tok(s.answer, add_special_tokens=False).input_ids + [tok.eos_token_id] for s in samples]
    width = max(len(r) for r in rows)
    ids_B_T = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask_B_T = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids_B_T[i, : len(row)] = torch.tensor(row)
        mask_B_T[i, : len(row)] = True
    return ids_B_T, mask_B_T


def supervised_loss(model: Any, processor: Any, samples: list[Sample], views: list[str]) -> torch.Tensor:
    """Mean token cross-entropy of the reference answers, one (sample, view) per row."""
    pairs = [view_input(s, v) for s, v in zip(samples, views)]
    prompts = build_prompts(processor, [im for im, _ in pairs], [tx for _, tx in pairs])
    ids_B_T, mask_B_T = answer_batch(processor, samples)
    inputs = append_responses(prompts, ids_B_T, mask_B_T)
    logits_B_T_V = response_logits(model, inputs, ids_B_T.shape[1])
    return torch.nn.functional.cross_entropy(logits_B_T_V[mask_B_T], ids_B_T[mask_B_T])


def _step_views(cfg: PretrainConfig) -> list[str]:
    half = cfg.crops // 2
    return ["crop"] * half + ["boxed_crop"] * half + ["full"] * cfg.full + ["boxed_full"] * cfg.boxed_full


def _train_scenes(cfg: PretrainConfig, step: int, count: int) -> list[Sample]:
    """The scenes of one step: a pure function of (seed, step), so a run can be replayed."""
    first = step * count
    views = _step_views(cfg)
    return [
        make_scene(
            scene_rng(_TRAIN_STREAM + cfg.seed, first + j),
            cfg.full_scene if cfg.full_scene is not None and views[j] in ("full", "boxed_full") else cfg.scene,
            scene_id=f"train-{first + j}",
        )[1]
        for j in range(count)
    ]


def pretrain_base(cfg: PretrainConfig) -> tuple[Any, Any, dict[str, Any]]:
    """Train the toy base from scratch; save it to ``cfg.out`` when set.

    Returns ``(model, processor, report)``; the report (also written as ``toy_base.json``) holds
    the validation curve, the final held-out accuracies per view, timings and versions.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, processor = build_toy_model(seed=cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
    )
    views = _step_views(cfg)
    val = (
        prepare_views(processor, make_dataset(cfg.eval_n, VALIDATION_SEED, cfg.scene))
        if cfg.eval_every and cfg.eval_n
        else None
    )
    curve: list[dict[str, Any]] = []
    train_seconds, start = 0.0, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        model.train()
        loss = supervised_loss(model, processor, _train_scenes(cfg, step - 1, len(views)), views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        schedule.step()
        train_seconds += time.perf_counter() - t0
        if val is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            acc = evaluate_views(model.eval(), processor, val).accuracy
            curve.append(
                {
                    "step": step,
                    "loss": round(loss.item(), 4),
                    "grad_norm": round(grad_norm.item(), 3),
                    "wall_s": round(time.perf_counter() - start, 1),
                    **{v: round(a, 4) for v, a in acc.items()},
                }
            )
            print(json.dumps(curve[-1]), flush=True)
            if cfg.snapshot_dir is not None:
                save_tiny(model, processor, Path(cfg.snapshot_dir) / f"step-{step}")
    model.eval()
    final = (
        evaluate_views(model, processor, make_dataset(cfg.final_eval_n, HELDOUT_SEED, cfg.scene), views=VIEWS)
        if cfg.final_eval_n
        else None
    )
    report = _report(cfg, curve, final, train_seconds, time.perf_counter() - start)
    if cfg.out is not None:
        save_tiny(model, processor, cfg.out)
        Path(cfg.out, "toy_base.json").write_text(json.dumps(report, indent=2) + "\n")
    return model, processor, report


def _report(
    cfg: PretrainConfig, curve: list[dict[str, Any]], final: Any, train_s: float, wall_s: float
) -> dict[str, Any]:
    config = dataclasses.asdict(cfg)
    config.pop("out")
    config.pop("snapshot_dir")
    if config["full_scene"] is None:  # the shipped recipe's report keeps its keys
        config.pop("full_scene")
    return {
        "recipe": "vopd.toyworld.pretrain.pretrain_base",
        "config": config,
        "heldout": None
        if final is None
        else {
            "seed": HELDOUT_SEED,
            "n": cfg.final_eval_n,
            "accuracy": {v: round(a, 4) for v, a in final.accuracy.items()},
            "gap_crop_minus_full": round(final.gap(), 4),
        },
        "validation_curve": curve,
        "timing": {
            "train_seconds": round(train_s, 1),
            "seconds_per_step": round(train_s / cfg.steps, 3),
            "wall_seconds": round(wall_s, 1),
            "threads": cfg.threads,
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
