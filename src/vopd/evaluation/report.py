"""Summaries and pictures: one table across benchmarks, bar charts, the gap over training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from vopd.evaluation.benchmarks import BENCHMARKS, PAPER_AVERAGE

__all__ = ["plot_bars", "plot_gap_over_training", "summarize", "summary_markdown", "write_summary"]

MME_SPLIT_NOTE = "MME-RW EN and CN are the full splits (not Lite), as in the paper's Table 1"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def summarize(
    results: dict[str, dict[str, Any]], *, label: str = "", settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One row per benchmark plus the paper's 6-benchmark average (when all six were run).

    ``results`` maps a benchmark name to its scorer's dict (with ``overall``). Each row holds
    the headline ``overall`` (items without a verdict counted wrong, as the official scripts
    do), ``judged_overall`` (judged items only), ``n`` (items evaluated) and the counts of
    ``failed`` requests, ``judge_failed`` and ``unparsed`` replies; ``failures`` sums the first two.
    Rows also carry ``failure_causes``, ``parse`` (what read the replies) and, for a judge-scored
    benchmark run without a judge, ``rule_only`` and ``rule_settled`` (percent settled by a rule).
    """
    rows = []
    for name, scores in results.items():
        questions = scores.get("questions", {})
        rows.append(
            {
                "benchmark": name,
                "overall": scores.get("overall"),
                "judged_overall": scores.get("judged_overall"),
                "n": scores.get("n_items", scores.get("n", questions.get("n"))),
                "failed": scores.get("failed", 0),
                "judge_failed": scores.get("judge_failed", 0),
                "unparsed": scores.get("unparsed", 0),
                "failure_causes": scores.get("failure_causes", {}),
                "parse": scores.get("parse", "vopd"),
                "rule_only": scores.get("rule_only"),
                "rule_settled": scores.get("rule_settled"),
                "metric": BENCHMARKS[name].description if name in BENCHMARKS else "",
            }
        )
    missing = [b for b in PAPER_AVERAGE if results.get(b, {}).get("overall") is None]
    average = None if missing else sum(results[b]["overall"] for b in PAPER_AVERAGE) / len(PAPER_AVERAGE)
    return {
        "model": label,
        "rows": rows,
        "failures": sum(r["failed"] + r["judge_failed"] for r in rows),
        "paper_average": {
            "value": average,
            "benchmarks": list(PAPER_AVERAGE),
            "missing": missing,
            "rule_only": [b for b in PAPER_AVERAGE if results.get(b, {}).get("rule_only")],
            "note": MME_SPLIT_NOTE,
        },
        "details": results,
        "settings": settings or {},
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """A Markdown table: headline score, judged-only score, items, failures, unparsed, metric;
    then the paper's average and the files read per benchmark."""
    lines = [
        f"# Evaluation: {summary['model'] or 'model'}",
        "",
        "| benchmark | score | judged only | n | failed | judge failed | unparsed | metric |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        mark = " *" if row.get("rule_only") else ""
        lines.append(
            f"| {row['benchmark']} | {_fmt(row['overall'])}{mark} | {_fmt(row['judged_overall'])} | "
            f"{_fmt(row['n'])} | {_fmt(row['failed'])} | {_fmt(row['judge_failed'])} | "
            f"{_fmt(row['unparsed'])} | {row['metric']} |"
        )
    avg = summary["paper_average"]
    value = _fmt(avg["value"]) if avg["value"] is not None else f"n/a (missing: {', '.join(avg['missing'])})"
    if avg["value"] is not None and avg.get("rule_only"):
        value += f" (rule-only: {', '.join(avg['rule_only'])}; not comparable to the paper's)"
    lines += [
        "",
        "score: failed requests and failed judgements count as wrong (as in the official scripts); "
        "judged only: over the items that got a verdict.",
        "",
    ]
    for row in summary["rows"]:
        if row.get("rule_only"):
            lines += [
                f"\\* {row['benchmark']}: {row['rule_only']} (no --judge; {_fmt(row['rule_settled'])}% of the "
                "items settled by a rule, the rest by the no-judge fallback).",
                "",
            ]
    parses = {row["benchmark"]: row.get("parse", "vopd") for row in summary["rows"]}
    if any(p != "vopd" for p in parses.values()):
        lines += ["Replies read by (--parse official):", ""]
        lines += [f"- {name}: {how}" for name, how in parses.items()]
        lines.append("")
    else:
        lines += ["Replies read by vopd's rules (--parse vopd; docs/evaluation.md).", ""]
    lines += [
        f"Paper 6-benchmark average ({', '.join(avg['benchmarks'])}): **{value}**",
        "",
        f"{avg['note']}.",
        "",
    ]
    sources = summary.get("sources") or {}
    if sources:
        lines += ["## Files read", ""]
        for name, block in sources.items():
            read = ", ".join(f"{f} ({k})" for f, k in block["files"].items()) or "?"
            lines.append(f"- {name}: `{block['path']}`: {read}")
            lines += [f"  - {note}" for note in block["notes"]]
        lines.append("")
    return "\n".join(lines)


def plot_bars(
    labels: list[str],
    values: list[float | None],
    path: str | Path,
    *,
    title: str = "",
    ylabel: str = "accuracy (%)",
    errors: list[tuple[float, float]] | None = None,
    markers: list[float | None] | None = None,
    marker_label: str = "",
) -> Path:
    """A bar chart (PNG) with the value on each bar; ``None`` values are drawn empty.

    ``markers`` (e.g. the judged-only score beside a headline) are drawn as a dash on each bar.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [v if v is not None else 0.0 for v in values]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.6))
    yerr = None
    if errors is not None:
        # clamp: float noise can put a bound a hair inside the bar (e.g. Wilson at 100%)
        yerr = [
            [max(0.0, h - lo) for h, (lo, _) in zip(heights, errors)],
            [max(0.0, hi - h) for h, (_, hi) in zip(heights, errors)],
        ]
    bars = ax.bar(labels, heights, color="#4C72B0", yerr=yerr, capsize=4)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), _fmt(v), ha="center", va="bottom", fontsize=8)
    if markers is not None:
        xs = [bar.get_x() + bar.get_width() / 2 for bar, m in zip(bars, markers) if m is not None]
        ax.scatter(
            xs, [m for m in markers if m is not None], marker="_", s=400, color="#C44E52", label=marker_label, zorder=3
        )
        if marker_label:
            ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(100.0, max(heights, default=0) * 1.1))
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return _save_figure(fig, path)


def plot_gap_over_training(
    steps: list[float],
    curves: dict[str, list[float | None]],
    path: str | Path,
    *,
    gap: list[float | None] | None = None,
    gap_ci: list[tuple[float, float]] | None = None,
    title: str = "",
) -> Path:
    """Accuracy per view across checkpoints (left axis) and the gap with its CI (right panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if gap is not None else 1, figsize=(9 if gap is not None else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    for name, values in curves.items():
        ax.plot(steps, [math.nan if v is None else v for v in values], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title(title or "accuracy per view")
    if gap is not None:
        ax2 = axes[0][1]
        g = [math.nan if v is None else v for v in gap]
        ax2.plot(steps, g, marker="o", color="#C44E52", label="crop - full")
        if gap_ci:
            ax2.fill_between(steps, [lo for lo, _ in gap_ci], [hi for _, hi in gap_ci], color="#C44E52", alpha=0.2)
        ax2.axhline(0.0, color="grey", lw=0.8)
        ax2.set_xlabel("training step")
        ax2.set_ylabel("gap (points)")
        ax2.set_title("regional-to-global gap (95% CI)")
    return _save_figure(fig, path)


def write_summary(summary: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``summary.json``, ``summary.md`` and ``summary.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "summary.json", "markdown": out / "summary.md", "png": out / "summary.png"}
    paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    paths["markdown"].write_text(summary_markdown(summary), encoding="utf-8")
    labels, values, judged = [], [], []
    for r in summary["rows"]:
        bad = r["failed"] + r["judge_failed"]
        labels.append(r["benchmark"] + (f"\n({bad} failed)" if bad else ""))
        values.append(r["overall"])
        judged.append(r["judged_overall"])
    if summary["paper_average"]["value"] is not None:
        labels.append("paper avg (6)")
        values.append(summary["paper_average"]["value"])
        judged.append(None)
    plot_bars(
        labels,
        values,
        paths["png"],
        title=summary["model"] or "evaluation",
        markers=judged if summary.get("failures") else None,
        marker_label="judged only",
    )
    return paths


def _save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
