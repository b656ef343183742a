"""What a toy-world run actually trained with, for its report, results and console line.

Reports name the configuration read from the :class:`~vopd.config.TrainConfig` the trainer ran
(recipe + demo settings + every override, e.g. an ablation's ``teacher.kind=live``), never the
demo's defaults, so a variant cannot be mislabelled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vopd.config import TrainConfig

__all__ = ["CONFIG_KEYS", "run_configuration", "describe_configuration"]

#: Keys of :func:`run_configuration`, in the order reports print them.
CONFIG_KEYS = (
    "objective",
    "teacher",
    "teacher_rate",
    "teacher_view",
    "estimator",
    "beta",
    "support",
    "student_view",
    "crop_source",
)


_VIEW_WORDS = {"crop": "crop", "full": "full image", "full+answer": "full image + reference answer"}


def _student_view(cfg: TrainConfig) -> str:
    view = "full + red box" if cfg.views.draw_box else "full"
    view = view + " + hint" if cfg.views.hint else view
    share = cfg.views.student_crop_share
    return f"{view}, crop replay {share:.0%}" if share > 0 else view


def _support(cfg: TrainConfig) -> str:
    loss = cfg.loss
    if loss.estimator == "full":
        return "whole vocabulary"
    if loss.estimator == "sampled":
        return "sampled token"
    return f"{loss.support} top-{loss.top_k}" + (" + tail" if loss.add_tail else " (renormalised)")


def run_configuration(cfg: TrainConfig) -> dict[str, Any]:
    """The knobs that tell toy-world variants apart, from the config a run trained with.

    ``teacher_rate`` is ``None`` for teachers that have no rate (frozen, live, external). The
    supervised objectives have no divergence (estimator, beta and support are ``None``);
    ``sft_gold`` has no teacher either, and OPSD's teacher sees ``full+answer``.
    """
    from vopd.config import SUPERVISED_OBJECTIVES  # not at import time: `vopd --help` stays fast

    kind, objective = cfg.teacher.kind, cfg.objective
    conf = {
        "objective": objective,
        "teacher": kind,
        "teacher_rate": {"ema": cfg.teacher.ema_rate, "trust_region": cfg.teacher.mix}.get(kind),
        "teacher_view": "full+answer" if objective == "opsd" else cfg.teacher.view,
        "estimator": cfg.loss.estimator,
        "beta": cfg.loss.beta,
        "support": _support(cfg),
        "student_view": _student_view(cfg),
        "crop_source": cfg.views.crop_source,
    }
    if objective in SUPERVISED_OBJECTIVES:  # cross-entropy: no divergence knob applies
        conf.update(estimator=None, beta=None, support=None)
    if objective == "sft_gold":  # the reference answers are the targets: no teacher
        conf.update(teacher=None, teacher_rate=None, teacher_view=None, labels="gold answers")
    return conf


def describe_configuration(conf: dict[str, Any] | None) -> str:
    """One line naming a :func:`run_configuration` (or an SFT reference's) dictionary."""
    if not conf:
        return "(configuration not recorded)"
    parts = [str(conf.get("objective", "?"))]
    if conf.get("labels"):
        parts.append(f"labels {conf['labels']}")
    if conf.get("teacher"):
        rate = conf.get("teacher_rate")
        parts.append(
            f"teacher {conf['teacher']}"
            + (f" {rate:g}" if rate is not None else "")
            + f" on the {_VIEW_WORDS.get(conf.get('teacher_view'), conf.get('teacher_view'))}"
        )
    if conf.get("estimator"):
        parts.append(f"{conf['estimator']} estimator, beta {conf['beta']:g}, support {conf['support']}")
    parts.append(f"student sees {conf.get('student_view', '?')}")
    if conf.get("crop_source", "box") != "box":
        parts.append(f"crops proposed by the model ({conf['crop_source']}; no gold box read in training)")
    extra = [f"{k} {v}" for k, v in conf.items() if k not in (*CONFIG_KEYS, "labels") and v is not None]
    return ", ".join(parts + extra)
