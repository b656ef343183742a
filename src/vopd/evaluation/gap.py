"""`vopd gap`: the regional-to-global perception gap, measured with confidence intervals.

Every question is answered with the same model and greedy decoding under two views:

- ``full``: the clean full image;
- ``crop``: the evidence crop, built with the teacher's zoom rules
  (:func:`vopd.views.teacher_view`) or the crop the data ships;

and optionally ``boxed_full``: the full image with the red box and the hint (the paper's
training student's view). These are the view names of training and the toy world too
(:data:`vopd.config.VIEW_NAMES`). The gap is ``accuracy(crop) - accuracy(full)`` over the questions judged in both
views, with a paired bootstrap 95% interval and an exact McNemar p-value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vopd.config import VIEW_NAMES, check_view
from vopd.evaluation.backends import Backend, BackendConfig, make_backend
from vopd.evaluation.judge import JudgeConfig, LLMJudge
from vopd.evaluation.report import plot_bars, plot_gap_over_training
from vopd.evaluation.runner import PredictionStore, answer_settings, grade_items, predict
from vopd.evaluation.stats import mcnemar_exact, paired_bootstrap_ci, paired_table, wilson_interval
from vopd.evaluation.types import EvalItem, GradedItem, PromptItem
from vopd.knobs import ConfigError

__all__ = ["GAP_VIEWS", "GapConfig", "gap_statistics", "load_gap_samples", "main_gap", "measure_gap"]

log = logging.getLogger(__name__)

#: The views `vopd gap` knows, in report order (the one view vocabulary of vopd).
GAP_VIEWS = VIEW_NAMES


def _view_config_default() -> Any:
    from vopd.config import ViewConfig

    return ViewConfig()


@dataclass
class GapConfig:
    """What ``vopd gap`` measures.

    Attributes:
        data: a record file / folder (:func:`vopd.records.load_records`), or a benchmark's
            files when ``benchmark`` is set.
        out_dir: predictions, ``gap.json`` and ``gap.png`` land here (one subfolder per checkpoint).
        benchmark: read ``data`` as this benchmark (``zoombench`` ships crops; the original
            ``vstar`` layout ships boxes) instead of as records.
        backend: the model that answers (``model`` is overridden by each checkpoint).
        views: which views to ask (:data:`GAP_VIEWS`); ``full`` and ``crop`` are required.
        view: crop and box settings (:class:`vopd.views.ViewConfig`); the crop view uses its
            zoom rules, the boxed_full view draws the box and adds the hint.
        checkpoints: measure each of these model paths (e.g. ``run_dir/*``) and plot the gap
            over training; the step is the last number in each path's name.
        n_boot: bootstrap resamples for the interval.
        level: confidence level of the intervals.
        seed: bootstrap seed.
        limit: use only the first N questions.
        judge: optional judge for open answers.
        overwrite: remove the earlier ``vopd gap`` output in ``out_dir`` first; without it a rerun
            resumes only when every setting that determines an answer matches.
    """

    data: str
    out_dir: str
    benchmark: str | None = None
    backend: BackendConfig = field(default_factory=BackendConfig)
    views: tuple[str, ...] = ("full", "crop")
    view: Any = field(default_factory=_view_config_default)
    checkpoints: list[str] = field(default_factory=list)
    n_boot: int = 10_000
    level: float = 0.95
    seed: int = 0
    limit: int | None = None
    judge: JudgeConfig | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not str(self.out_dir).strip():  # Path("") is ".": results would land in the current folder
            raise ValueError("out_dir is empty: name an output folder, e.g. --out runs/eval1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        seen: dict[Path, str] = {}
        for ckpt in self.checkpoints:  # measured twice, it would be two points of one step, one folder
            if Path(ckpt).resolve() in seen:
                raise ValueError(f"checkpoint {ckpt} is given twice (also as {seen[Path(ckpt).resolve()]})")
            seen[Path(ckpt).resolve()] = ckpt
        self.views = tuple(check_view(v, key="gap views") for v in self.views)
        if not {"full", "crop"} <= set(self.views):
            raise ConfigError(f"gap views must include 'full' and 'crop'; got {self.views}")
        if self.n_boot < 100:
            raise ValueError(f"n_boot must be >= 100 for a usable interval, got {self.n_boot}")
        if not 0.5 <= self.level < 1.0:
            raise ValueError(f"level must be in [0.5, 1), got {self.level}")


# ----------------------------------------------------------------------------------------------
# Data


def _sample_from_item(item: EvalItem) -> Any:
    from vopd.records import Box, Sample

    boxes = [Box(*map(float, b)) for b in item.meta.get("boxes_xyxy", [])]
    crop = item.meta.get("crop_image")
    if not boxes and crop is None:
        raise ValueError(
            f"{item.benchmark} item {item.id}: no evidence boxes and no crop; `vopd gap` needs one "
            "(use ZoomBench, the original V* layout, or records with boxes)"
        )
    return Sample(
        id=item.key,
        image=item.image,
        question=item.question,
        options=item.options or None,
        answer=item.answer,
        boxes=boxes,
        teacher_image=crop,
        category=item.category,
        meta={"prompt": item.prompt, "kind": item.kind},
    )


def load_gap_samples(data: str, *, benchmark: str | None = None, seed: int = 0, limit: int | None = None) -> list[Any]:
    """Samples with boxes or crops, from records or from a benchmark that has them."""
    if benchmark:
        from vopd.evaluation.benchmarks import get_benchmark

        items = [it for it in get_benchmark(benchmark).load(data, seed=seed)]
        usable = [it for it in items if it.meta.get("boxes_xyxy") or it.meta.get("crop_image") is not None]
        if usable and len(usable) < len(items):  # e.g. ZoomBench rows whose crop_image is null
            log.warning(
                "%s: %d of %d questions have neither boxes nor a crop and are left out of the gap",
                data,
                len(items) - len(usable),
                len(items),
            )
            items = usable
        samples = [_sample_from_item(it) for it in items[:limit]]
    else:
        from vopd.datasets import load_records

        samples = list(load_records(data))[:limit]
    if not samples:
        raise ValueError(f"{data}: no questions to measure")
    return samples


def _with_evidence(samples: list[Any], data: str) -> list[Any]:
    """The samples that have a box or a crop (the crop view needs one); a clear error if none has."""
    usable = [s for s in samples if s.boxes or s.teacher_image is not None]
    if not usable:
        raise ValueError(
            f"{data}: no question has an evidence box or a crop, so there is no crop view; "
            "add boxes, or let the model propose crops with --crop-source search|attention"
        )
    if len(usable) < len(samples):
        log.warning(
            "%s: %d of %d questions have neither boxes nor a crop and are left out of the gap "
            "(or pass --crop-source search|attention)",
            data,
            len(samples) - len(usable),
            len(samples),
        )
    return usable


def _kind(sample: Any) -> str:
    if "kind" in sample.meta:
        return sample.meta["kind"]
    if sample.options:
        return "choice"
    return "yesno" if str(sample.answer).strip().lower() in ("yes", "no") else "open"


def _text(sample: Any, view: str) -> str:
    from vopd.views import HINT, prompt_text

    hint = view == "boxed_full"
    if "prompt" not in sample.meta:
        return prompt_text(sample, hint=hint)
    prompt = sample.meta["prompt"]
    if not hint:
        return prompt
    question, _, rest = prompt.partition("\n")
    return f"{question}\n{HINT}\n{rest}" if rest else f"{question}\n{HINT}"


def _eval_item(sample: Any, benchmark: str) -> EvalItem:
    if sample.answer is None:
        raise ValueError(f"sample {sample.id!r}: no answer; `vopd gap` grades answers, so every sample needs one")
    return EvalItem(
        benchmark=benchmark,
        id=str(sample.id),
        image=sample.image,
        prompt="",
        answer=str(sample.answer),
        kind=_kind(sample),
        options=list(sample.options or []),
        category=sample.category,
        question=sample.question,
        meta={"sample": sample},
    )


def view_prompt(item: EvalItem, view: str, view_cfg: Any) -> PromptItem:
    """The prompt of one view: the clean image, the evidence crop, or the boxed image + hint."""
    from vopd.views import make_views

    view = check_view(view)
    sample = item.meta["sample"]
    cfg = dataclasses.replace(view_cfg, draw_box=view == "boxed_full", hint=False)
    student, teacher, _ = make_views(sample, cfg)
    image = teacher if view == "crop" else student
    return PromptItem(id=item.id, image=image, text=_text(sample, view))


# ----------------------------------------------------------------------------------------------
# Statistics


def _outcomes(graded: list[GradedItem]) -> dict[str, bool | None]:
    return {g.item.id: g.correct for g in graded}


def _accuracy_block(outcomes: dict[str, bool | None], level: float) -> dict[str, Any]:
    judged = [v for v in outcomes.values() if v is not None]
    correct = sum(judged)
    lo, hi = wilson_interval(correct, len(judged), level=level)
    acc = 100.0 * correct / len(judged) if judged else None
    return {
        "accuracy": acc,
        "n": len(judged),
        "correct": correct,
        "unjudged": len(outcomes) - len(judged),
        "ci": [100.0 * lo, 100.0 * hi] if judged else None,
    }


def _paired(
    base: dict[str, bool | None],
    other: dict[str, bool | None],
    *,
    n_boot: int,
    level: float,
    seed: int,
    names: tuple[str, str],
) -> dict[str, Any]:
    ids = [i for i in base if base[i] is not None and other.get(i) is not None]
    a = [bool(base[i]) for i in ids]
    b = [bool(other[i]) for i in ids]
    if not ids:
        return {"value": None, "ci": None, "n_paired": 0, "mcnemar_p": None, "table": None}
    diff, lo, hi = paired_bootstrap_ci(a, b, n_boot=n_boot, level=level, seed=seed)
    table = paired_table(a, b)
    first, second = names
    return {
        "value": 100.0 * diff,
        "ci": [100.0 * lo, 100.0 * hi],
        "n_paired": len(ids),
        "mcnemar_p": mcnemar_exact(table.only_a_right, table.only_b_right),
        "table": {
            "both_right": table.both_right,
            f"only_{second}_right": table.only_b_right,
            f"only_{first}_right": table.only_a_right,
            "both_wrong": table.both_wrong,
        },
    }


def gap_statistics(
    graded: dict[str, list[GradedItem]], *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Accuracy per view, the crop-minus-full gap (CI, McNemar, 2x2 table), per category.

    ``graded`` maps view name (:data:`GAP_VIEWS`, old names accepted) -> graded items (same ids
    in every view). Accuracies and gaps are in percentage points; intervals are ``[low, high]``
    at ``level``.
    """
    graded = {check_view(view): items for view, items in graded.items()}
    outcomes = {view: _outcomes(items) for view, items in graded.items()}
    stats = dict(n_boot=n_boot, level=level, seed=seed)
    result: dict[str, Any] = {
        "n_questions": len(outcomes["full"]),
        "views": {v: _accuracy_block(o, level) for v, o in outcomes.items()},
        "gap": _paired(outcomes["full"], outcomes["crop"], names=("full", "crop"), **stats),
        "interval": f"paired bootstrap over questions ({n_boot} resamples, seed {seed}), {int(level * 100)}%",
    }
    if "boxed_full" in outcomes:
        result["boxed_full_minus_full"] = _paired(
            outcomes["full"], outcomes["boxed_full"], names=("full", "boxed_full"), **stats
        )
    categories = sorted({g.item.category for g in graded["full"] if g.item.category})
    if categories:
        per: dict[str, Any] = {}
        for cat in categories:
            ids = {g.item.id for g in graded["full"] if g.item.category == cat}
            sub = {v: {i: o[i] for i in ids} for v, o in outcomes.items()}
            per[cat] = {
                "views": {v: _accuracy_block(o, level)["accuracy"] for v, o in sub.items()},
                "gap": _paired(sub["full"], sub["crop"], names=("full", "crop"), **stats),
            }
        result["categories"] = per
    return result


# ----------------------------------------------------------------------------------------------
# Running


def measure_gap(
    samples: list[Any],
    backend: Backend,
    cfg: GapConfig,
    *,
    store: PredictionStore,
    judge: LLMJudge | None = None,
    dataset: str = "gap",
) -> dict[str, Any]:
    """Ask every view (resumably, through ``store``), grade, and compute :func:`gap_statistics`."""
    items = [_eval_item(s, dataset) for s in samples]
    graded = {}
    for view in cfg.views:
        preds = predict(
            items,
            backend,
            store,
            view=view,
            batch_size=cfg.backend.batch_size,
            to_prompt=lambda it, v=view: view_prompt(it, v, cfg.view),
        )
        graded[view] = grade_items(items, preds, judge=judge)
    return gap_statistics(graded, n_boot=cfg.n_boot, level=cfg.level, seed=cfg.seed)


def _plot_views(result: dict[str, Any], path: Path, title: str) -> None:
    views = result["views"]
    names = list(views)
    values = [views[v]["accuracy"] for v in names]
    errors = [tuple(views[v]["ci"]) if views[v]["ci"] else (0.0, 0.0) for v in names]
    gap = result["gap"]["value"]
    title = Path(title).name or title  # a long local path would overflow the figure
    sub = f"{title}\ngap {gap:+.1f} pts" if gap is not None else title
    plot_bars(names, values, path, title=sub, errors=errors)


def _step(path: str, index: int) -> float:
    numbers = re.findall(r"\d+", Path(path).name)
    return float(numbers[-1]) if numbers else float(index)


#: What ``vopd gap`` writes in its output folder (``--overwrite`` removes these; ``gap-*``: per checkpoint).
GAP_OUTPUTS = (
    "predictions.jsonl",
    "judge.jsonl",
    "gap.json",
    "gap.png",
    "gap_over_training.json",
    "gap_over_training.png",
    "proposals.jsonl",
    "gap-*",
)


def checkpoint_folders(checkpoints: list[str]) -> dict[str, str]:
    """One result subfolder name per checkpoint path, unique per path: ``gap-<folder name>``, with
    the parent folder's name (then a hash of the path) added where two paths share a name
    (``runA/checkpoint-2`` and ``runB/checkpoint-2``). The ``gap-`` prefix keeps results out of
    the checkpoint folders themselves when ``--out`` is the run folder."""
    import hashlib

    paths = {c: Path(c).resolve() for c in checkpoints}
    candidates = (
        lambda p: p.name,
        lambda p: f"{p.parent.name}-{p.name}",
        lambda p: f"{p.parent.name}-{p.name}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}",
    )
    for name in candidates:
        found = {c: f"gap-{name(p)}" for c, p in paths.items()}
        if len(set(found.values())) == len(set(paths.values())):
            break
    return found


def _gap_settings(cfg: GapConfig) -> dict[str, Any]:
    """What determines the answers of `vopd gap` besides the model: data, views, crop rules, seed."""
    view = cfg.view
    return {
        "data": str(Path(cfg.data).resolve()) if Path(cfg.data).exists() else cfg.data,
        "benchmark": cfg.benchmark,
        "seed": cfg.seed,
        **{f"view.{k}": getattr(view, k, None) for k in ("zoom", "context", "min_side", "use_provided_crop")},
        "view.crop_source": getattr(view, "crop_source", "box"),
    }


def main_gap(cfg: GapConfig, *, backend: Backend | None = None) -> dict[str, Any]:
    """Measure the gap (per checkpoint if ``cfg.checkpoints``) and write JSON and PNG.

    Writes ``gap.json`` and ``gap.png`` into ``cfg.out_dir`` (or into one ``gap-<checkpoint>``
    subfolder per checkpoint, plus ``gap_over_training.json`` / ``.png``). Returns the result dict.
    A folder holding another run's answers (other model, weights or settings) is refused, named,
    unless ``cfg.overwrite`` (see `vopd.outputs.claim_output`).
    """
    from vopd.outputs import claim_output

    out = Path(cfg.out_dir)
    settings = _gap_settings(cfg)
    if not cfg.checkpoints:
        settings.update(answer_settings(cfg.backend, cfg.judge))
    elif cfg.judge is not None:
        settings["judge"] = answer_settings(cfg.backend, cfg.judge)["judge"]
    claim_output(out, command="vopd gap", owned=GAP_OUTPUTS, overwrite=cfg.overwrite, settings=settings)
    subfolders = checkpoint_folders(cfg.checkpoints)
    for ckpt in cfg.checkpoints:  # each checkpoint's answers are cached under its own identity
        claim_output(
            out / subfolders[ckpt],
            command="vopd gap",
            owned=GAP_OUTPUTS,
            settings=answer_settings(dataclasses.replace(cfg.backend, model=ckpt)),
        )
    samples = load_gap_samples(cfg.data, benchmark=cfg.benchmark, seed=cfg.seed, limit=cfg.limit)
    judge = LLMJudge(cfg.judge, out / "judge.jsonl") if cfg.judge else None
    dataset = cfg.benchmark or Path(cfg.data).stem
    proposals = None
    if getattr(cfg.view, "crop_source", "box") != "box":  # crops proposed by the model, boxes unread
        from vopd.evaluation.gap_proposals import propose_gap_crops

        model = cfg.backend.model or (sorted(cfg.checkpoints, key=lambda p: _step(p, 0))[0] if cfg.checkpoints else "")
        proposer = backend or make_backend(dataclasses.replace(cfg.backend, model=model))
        samples, proposals = propose_gap_crops(
            samples, proposer, cfg.view, out, model_name=model or None, thinking=cfg.backend.thinking
        )
    else:
        samples = _with_evidence(samples, cfg.data)
    if not cfg.checkpoints:
        backend = backend or make_backend(cfg.backend)
        result = measure_gap(
            samples, backend, cfg, store=PredictionStore(out / "predictions.jsonl"), judge=judge, dataset=dataset
        )
        result.update(model=cfg.backend.model, data=cfg.data, views_asked=list(cfg.views))
        if proposals:
            result["proposals"] = proposals
        (out / "gap.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        _plot_views(result, out / "gap.png", cfg.backend.model or dataset)
        return result
    runs = []
    for index, ckpt in enumerate(sorted(cfg.checkpoints, key=lambda p: _step(p, 0))):
        sub = out / subfolders[ckpt]
        ckpt_backend = make_backend(dataclasses.replace(cfg.backend, model=ckpt))
        result = measure_gap(
            samples, ckpt_backend, cfg, store=PredictionStore(sub / "predictions.jsonl"), judge=judge, dataset=dataset
        )
        result.update(model=ckpt, step=_step(ckpt, index))
        (sub / "gap.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        _plot_views(result, sub / "gap.png", Path(ckpt).name)
        runs.append(result)
        del ckpt_backend
    summary = {"data": cfg.data, "checkpoints": runs, **({"proposals": proposals} if proposals else {})}
    (out / "gap_over_training.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    steps = [r["step"] for r in runs]
    curves = {v: [r["views"][v]["accuracy"] for r in runs] for v in cfg.views}
    plot_gap_over_training(
        steps,
        curves,
        out / "gap_over_training.png",
        gap=[r["gap"]["value"] for r in runs],
        gap_ci=[tuple(r["gap"]["ci"]) if r["gap"]["ci"] else (0.0, 0.0) for r in runs],
    )
    return summary
