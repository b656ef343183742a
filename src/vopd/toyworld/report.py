"""The demo's report: report.md with plots (accuracy over training, gap before/after, teacher
health, example scenes with their crops and the model's answers before and after)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vopd.records import Sample
from vopd.toyworld.run_info import describe_configuration

VIEW_LABELS = {
    "full": "clean full image",
    "crop": "evidence crop (teacher view)",
    "boxed_full": "full + red box + hint",
}


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    health = results.get("health") or []
    fig, axes = plt.subplots(1, 2 if health else 1, figsize=(11 if health else 6, 4), squeeze=False)
    ax = axes[0][0]
    steps = [c["step"] for c in results["curve"]]
    for view, label in VIEW_LABELS.items():
        ax.plot(steps, [100 * c[view] for c in results["curve"]], marker="o", label=label)
    ax.set(
        xlabel=f"training step (objective {(results.get('config') or {}).get('objective', 'opd')})",
        ylabel="held-out accuracy (%)",
        ylim=(0, 102),
        title=f"Student accuracy per view ({results['n_eval']} held-out scenes)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if health:
        ax = axes[0][1]
        hs = [h["step"] for h in health]
        if all("health/teacher_acc" in h for h in health):
            ax.plot(
                hs, [100 * h["health/teacher_acc"] for h in health], marker="o", label="teacher on crops (probe acc, %)"
            )
        ax.set(xlabel="step", ylabel="probe accuracy (%)", ylim=(0, 102), title="Teacher health")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(
            hs,
            [h["health/teacher_drift"] for h in health],
            color="tab:red",
            marker="s",
            label="teacher drift (nats/token)",
        )
        twin.set_ylabel("KL(initial || teacher), nats/token")
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, [h.get_label() for h in lines], loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gap(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    views = list(VIEW_LABELS)
    xs = range(len(views))
    ax.bar([x - 0.2 for x in xs], [100 * results["base"][v] for v in views], width=0.4, label="base")
    ax.bar(
        [x + 0.2 for x in xs],
        [100 * results["final"][v] for v in views],
        width=0.4,
        label=f"after {results['steps']} steps",
    )
    for x, v in zip(xs, views):
        ax.text(x - 0.2, 100 * results["base"][v] + 1, f"{100 * results['base'][v]:.1f}", ha="center", fontsize=8)
        ax.text(x + 0.2, 100 * results["final"][v] + 1, f"{100 * results['final'][v]:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(xs), [VIEW_LABELS[v] for v in views], fontsize=8)
    ax.set(ylabel="held-out accuracy (%)", ylim=(0, 110), title="Regional-to-global gap, before and after")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(samples: list[Sample], base: Any, final: Any, path: Path, k: int = 6) -> None:
    """Scenes the base got wrong on the full image (first), with crops and both answers."""
    from vopd.toyworld.scenes import view_input

    plt = pyplot()
    order = [i for i in range(len(samples)) if not base.correct["full"][i]] + [
        i for i in range(len(samples)) if base.correct["full"][i]
    ]
    picks = order[:k]
    fig, axes = plt.subplots(2, len(picks), figsize=(2.3 * len(picks), 5.4), squeeze=False)
    for col, i in enumerate(picks):
        full, question = view_input(samples[i], "full")
        crop, _ = view_input(samples[i], "crop")
        axes[0][col].imshow(full)
        axes[0][col].set_title(question, fontsize=7)
        axes[1][col].imshow(crop)
        axes[1][col].set_title(
            f"before: {base.responses['full'][i]}\nafter: {final.responses['full'][i]}\n(truth: {samples[i].answer})",
            fontsize=6.5,
        )
        for row in (0, 1):
            axes[row][col].axis("off")
    fig.suptitle(
        "Full image (top) and the teacher's crop (bottom); the student's answers on the full image", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, results: dict[str, Any], samples: list[Sample], base: Any, final: Any) -> Path:
    out = Path(out)
    plot_curves(results, out / "accuracy_curve.png")
    plot_gap(results, out / "gap.png")
    plot_examples(samples, base, final, out / "examples.png")
    b, f = results["base"], results["final"]
    t = results["full_paired_table"]
    conf = results.get("config") or {}
    lines = [
        "# Vision-OPD toy-world demo",
        "",
        f"{results['steps']} training steps ({describe_configuration(conf)}), "
        f"{results['n_eval']} held-out scenes (seed {results['eval_seed']}), "
        f"wall time {results['wall_seconds']:.0f} s.",
        "",
        "Configuration that ran (read from the training config, overrides included):",
        "",
        "| knob | value |",
        "|---|---|",
        *[f"| {k} | {'-' if v is None else v} |" for k, v in conf.items()],
        f"| checkpoint | `{results['checkpoint']}` |",
        "",
        *_proposal_lines(results.get("proposals")),
        "| view | base | final | change |",
        "|---|---|---|---|",
        *[
            f"| {VIEW_LABELS[v]} | {100 * b[v]:.1f} % | {100 * f[v]:.1f} % | {100 * (f[v] - b[v]):+.1f} |"
            for v in VIEW_LABELS
        ],
        f"| gap (crop - full) | {100 * results['gap_base']:.1f} | {100 * results['gap_final']:.1f} | "
        f"{100 * results['gap_closed']:.0f} % of the gap closed |",
        "",
        f"Clean full image, paired over the same scenes: {t['only_b_right']} scenes fixed, {t['only_a_right']} broken, "
        f"exact McNemar p = {results['full_gain_p_value']:.2g}.",
        "",
        "![accuracy over training](accuracy_curve.png)",
        "",
        "![gap before and after](gap.png)",
        "",
        "![examples](examples.png)",
        "",
        _provenance(conf),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _provenance(conf: dict[str, Any]) -> str:
    """The report's closing sentence: where the training signal came from, per the configuration."""
    objective = conf.get("objective", "opd")
    if objective == "sft_self":
        return (
            "No answer label was used in training: the student was fine-tuned (cross-entropy) on the "
            "teacher's own answers on the crop (SFT on self-teacher answers)."
        )
    if objective == "sft_gold":
        return "Labels were used: the student was fine-tuned (cross-entropy) on the reference answers."
    if objective == "opsd":
        return (
            "Labels were used: the teacher saw the full image and the reference answer in its text (OPSD); "
            "the student learned from the teacher's distribution on its own samples."
        )
    if objective != "opd":
        return f"Objective {objective}: see the configuration above for the labels it read."
    if conf.get("teacher_view") == "full":
        return (
            "No answer label was used in training; the teacher saw the same full image as the student "
            "(control: no privileged view)."
        )
    if conf.get("crop_source", "box") != "box":
        return (
            f"No answer label and no gold box were used in training: the teacher saw the crop the model "
            f"proposed itself ({conf['crop_source']})."
        )
    return "No answer label was used in training: the student learned from the teacher's view of the crop."


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _iou(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def proposal_summary(p: dict[str, Any]) -> str:
    """One sentence on the quality of model-proposed training crops (``results["proposals"]``);
    ``-`` where nothing was measured (training records without gold boxes)."""
    return (
        f"Crops proposed by the model ({p['source']}, `{p['file']}`), measured against the gold boxes of the "
        f"{p['n']} training scenes after training: hit rate {_pct(p['hit_rate'])} (gold box wholly inside the "
        f"crop), centre hit rate {_pct(p['centre_hit_rate'])}, mean IoU with the gold crop "
        f"{_iou(p['mean_iou'])}." + _fallback_note(p) + _kept_note(p)
    )


def _kept_note(p: dict[str, Any]) -> str:
    """``views.proposal_keep`` < 1: the quality of the proposals training kept."""
    kept = p.get("kept")
    if not kept:
        return ""
    return (
        f" Training kept the surest {kept['keep']:g} of them (views.proposal_keep), {kept['n']} scenes: "
        f"hit rate {_pct(kept['hit_rate'])}, mean IoU {_iou(kept['mean_iou'])}."
    )


def _fallback_note(p: dict[str, Any]) -> str:
    """Grounding only: how many answers held no usable box (their crop was the whole image)."""
    if "unparsed" not in p:
        return ""
    total = p["parsed"] + p["degenerate"] + p["unparsed"]
    return (
        f" {p['unparsed']} of {total} answers held no box and {p['degenerate']} a box of no area: their crop "
        f"was the {p['fallback_box']} (counted as misses)."
    )


def _proposal_lines(p: dict[str, Any] | None) -> list[str]:
    return [proposal_summary(p), ""] if p else []
