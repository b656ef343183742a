"""``vopd demo --ablations``: the paper's ablations, replayed in the toy world.

Every variant starts from the same shipped base, trains on the same scenes for the same steps and
is evaluated on the same held-out scenes; only the named knob changes. Two references use labels
on the same images and steps: supervised fine-tuning on full images (the upper bound) and SFT on
the model's own crop answers (the paper's "SFT on self-teacher" baseline).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from vopd.toyworld.run_info import describe_configuration

#: name -> extra `vopd train` overrides on top of the demo recipe (frozen teacher, JSD, top-100+tail).
OPD_VARIANTS: dict[str, list[str]] = {
    "frozen teacher (demo default)": [],
    "EMA 0.05 teacher (paper default)": ["teacher.kind=ema", "teacher.ema_rate=0.05"],
    "EMA 0.01 teacher": ["teacher.kind=ema", "teacher.ema_rate=0.01"],
    "live teacher": ["teacher.kind=live"],
    "control: teacher sees the full image": ["teacher.view=full"],
    "forward KL (beta 0)": ["loss.beta=0"],
    "reverse KL (beta 1)": ["loss.beta=1"],
    "full vocabulary": ["loss.estimator=full"],
    "sampled-token estimator": ["loss.estimator=sampled", "loss.beta=1"],
    "red box + hint student": ["views.draw_box=true", "views.hint=true"],
}
SFT_VARIANTS = {"SFT, gold labels, full images (upper bound)": "gold", "SFT on self-teacher crop answers": "self"}


def run_sft(cfg: Any, labels: str, out: Path) -> dict[str, Any]:
    """Supervised fine-tuning of the toy base on clean full images, same scenes/steps/lr as OPD.

    ``labels="gold"`` uses the true answers; ``"self"`` uses the base's own greedy answers on the
    crops (the teacher's answers, as hard labels).
    """
    import torch

    from vopd.toyworld.demo import BASE_VIEWS, demo_train_config
    from vopd.toyworld.evaluate import HeldOutEvaluator, evaluate_views
    from vopd.toyworld.pretrain import supervised_loss
    from vopd.toyworld.scenes import make_dataset
    from vopd.trainer import resolve_model

    start = time.perf_counter()
    train_cfg = demo_train_config(cfg)
    conf = sft_configuration(train_cfg, labels)
    print(f"configuration: {describe_configuration(conf)}", flush=True)
    torch.manual_seed(cfg.seed)
    model, processor = resolve_model(train_cfg)
    per_step = train_cfg.prompts_per_step
    scenes = make_dataset(cfg.steps * per_step, cfg.train_seed)
    if labels == "self":
        crop_answers = evaluate_views(model, processor, scenes, views=("crop",)).responses["crop"]
        scenes = [dataclasses.replace(s, answer=a) for s, a in zip(scenes, crop_answers)]
    evaluator = HeldOutEvaluator(make_dataset(cfg.n_eval, cfg.eval_seed), cfg.eval_every, processor, views=BASE_VIEWS)
    evaluator.evaluate(model, processor, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.optim.lr, weight_decay=train_cfg.optim.weight_decay)
    model.train()
    from tqdm.auto import tqdm

    for step in tqdm(range(1, cfg.steps + 1), desc=f"SFT ({labels} labels)", dynamic_ncols=True):
        batch = scenes[(step - 1) * per_step : step * per_step]
        loss = supervised_loss(model, processor, batch, ["full"] * len(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            evaluator.evaluate(model, processor, step)
            model.train()
    result = {"config": conf, "curve": evaluator.curve, "views": list(BASE_VIEWS), "steps": cfg.steps,
              "n_eval": cfg.n_eval, "eval_seed": cfg.eval_seed, "wall_seconds": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def sft_configuration(train_cfg: Any, labels: str) -> dict[str, Any]:
    """What an SFT reference trains with: cross-entropy on full images, no teacher."""
    return {"objective": "sft", "labels": {"gold": "gold answers", "self": "the base's own crop answers"}[labels],
            "student_view": "full", "lr": train_cfg.optim.lr}


def run_ablations(cfg: Any, *, only: list[str] | None = None) -> dict[str, Any]:
    """Run every variant (or those whose name contains one of ``only``); write ablations.json/.md."""
    from vopd.toyworld.demo import run_demo

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "ablations.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    names = [*OPD_VARIANTS, *SFT_VARIANTS]
    if only:
        names = [n for n in names if any(o.lower() in n.lower() for o in only)]
    for i, name in enumerate(names):
        if name in results:  # resumable: finished variants are kept
            continue
        print(f"\n=== ablation {i + 1}/{len(names)}: {name}", flush=True)
        sub = out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        if name in OPD_VARIANTS:
            run = dataclasses.replace(cfg, out=str(sub), overrides=(*cfg.overrides, *OPD_VARIANTS[name]))
            r = run_demo(run)
            results[name] = {"config": r["config"], "curve": r["curve"], "health": r["health"],
                             "wall_seconds": r["wall_seconds"], "p_value_full": r["full_gain_p_value"],
                             "results": f"{sub.name}/results.json"}
        else:
            results[name] = {**run_sft(cfg, SFT_VARIANTS[name], sub), "results": f"{sub.name}/results.json"}
        results_path.write_text(json.dumps(results, indent=2))
    (out / "ablations.md").write_text(ablation_table(results))
    plot_ablations(results, out / "ablations.png")
    print(ablation_table(results))
    return results


def ablation_table(results: dict[str, Any]) -> str:
    lines = [
        "| variant | configuration that ran | clean full: start -> best -> end | crop at end | boxed full at end "
        "| min teacher probe acc |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        full = [c["full"] for c in r["curve"]]
        health = [h["health/teacher_acc"] for h in r.get("health", []) if "health/teacher_acc" in h]
        teacher = f"{100 * min(health):.1f}" if health else "-"
        lines.append(
            f"| {name} | {describe_configuration(r.get('config'))} | {100 * full[0]:.1f} -> {100 * max(full):.1f} -> {100 * full[-1]:.1f} | "
            f"{100 * r['curve'][-1]['crop']:.1f} | {100 * r['curve'][-1]['boxed_full']:.1f} | {teacher} |"
        )
    return "\n".join(lines) + "\n"


def plot_ablations(results: dict[str, Any], path: Path) -> None:
    from vopd.toyworld.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 5))
    for name, r in results.items():
        style = "--" if name in SFT_VARIANTS else "-"
        ax.plot([c["step"] for c in r["curve"]], [100 * c["full"] for c in r["curve"]], style, marker="o", ms=3, label=name)
    ax.set(xlabel="step", ylabel="clean full-image accuracy (%)", ylim=(0, 102), title="Toy-world ablations (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
