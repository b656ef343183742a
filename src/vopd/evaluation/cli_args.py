"""Argument parsers for ``vopd gap`` and ``vopd eval``; the CLI mounts them as sub-commands.

    sub = parser.add_subparsers(dest="command")
    add_gap_arguments(sub.add_parser("gap", help="measure the regional-to-global gap"))
    add_eval_arguments(sub.add_parser("eval", help="evaluate on benchmarks"))
    ...
    if args.command == "gap": run_gap(args)

Each ``*_config_from_args`` turns the namespace into the dataclass the library takes, so the
library never sees argparse.
"""

from __future__ import annotations

import argparse
from typing import Any

from vopd.config import CROP_SOURCES
from vopd.evaluation.backends import BackendConfig
from vopd.evaluation.judge import JudgeConfig

__all__ = [
    "add_eval_arguments",
    "add_gap_arguments",
    "eval_config_from_args",
    "gap_config_from_args",
    "failure_message",
    "run_eval",
    "run_gap",
]


def _add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    d = BackendConfig()
    g = parser.add_argument_group("model / backend")
    g.add_argument("--model", default="", help="checkpoint path or hub id (hf), or the served model name (openai)")
    g.add_argument(
        "--backend", choices=("hf", "openai"), default=d.kind, help="local HF model or OpenAI-compatible server"
    )
    g.add_argument("--url", default=d.url, help="server base URL for --backend openai")
    g.add_argument(
        "--api-key-env",
        default=d.api_key_env,
        help="NAME of the environment variable holding the API key (never the key itself)",
    )
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="answer budget (greedy decoding)")
    g.add_argument(
        "--thinking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="chat-template thinking mode (default: non-thinking where the template has the switch)",
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per generate call / per round")
    g.add_argument("--concurrency", type=int, default=d.concurrency, help="parallel server requests")
    g.add_argument(
        "--timeout",
        type=float,
        default=d.timeout_s,
        help="hard wall-clock limit per request attempt in seconds, reply included (server)",
    )
    g.add_argument("--retries", type=int, default=d.retries, help="extra attempts per failed request (server)")
    g.add_argument("--dtype", default=d.dtype, help="weights dtype for hf (float32 on CPU)")
    g.add_argument("--device", default=d.device, help="device for hf: auto, cpu, cuda, cuda:1, ...")
    j = parser.add_argument_group("judge (optional, for answers the rules cannot settle)")
    j.add_argument("--judge-url", default=None, help="OpenAI-compatible judge base URL; no judge if unset")
    j.add_argument("--judge-model", default=None, help="served judge model name")
    j.add_argument(
        "--judge-api-key-env", default="OPENAI_API_KEY", help="NAME of the environment variable with the judge key"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="remove this command's earlier output (answers, verdicts, results) in --out first; without it "
        "a rerun resumes only when every setting that determines an answer is the same",
    )
    parser.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even when requests or judgements failed (they count as wrong in the scores)",
    )


def _backend_config(args: argparse.Namespace) -> BackendConfig:
    return BackendConfig(
        kind=args.backend,
        model=args.model,
        url=args.url,
        api_key_env=args.api_key_env,
        max_new_tokens=args.max_new_tokens,
        thinking=args.thinking,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        retries=args.retries,
        dtype=args.dtype,
        device=args.device,
    )


def _judge_config(args: argparse.Namespace) -> JudgeConfig | None:
    if not args.judge_url:
        return None
    if not args.judge_model:
        raise SystemExit("--judge-url needs --judge-model (the served judge model name)")
    return JudgeConfig(url=args.judge_url, model=args.judge_model, api_key_env=args.judge_api_key_env)


def add_gap_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``vopd gap``."""
    parser.add_argument("data", help="record file/folder with boxes or crops, or benchmark files with --benchmark")
    parser.add_argument("--out", required=True, help="output folder (predictions, gap.json, gap.png)")
    parser.add_argument(
        "--benchmark", default=None, help="read data as this benchmark (zoombench, vstar original layout)"
    )
    parser.add_argument(
        "--boxed-full",
        dest="boxed_full",
        action="store_true",
        help="also ask the boxed_full view: the full image + red box + hint (the paper's training student's view)",
    )
    parser.add_argument(
        "--checkpoints",
        nargs="+",
        default=[],
        help="measure each checkpoint (e.g. run_dir/*) and plot the gap over training",
    )
    parser.add_argument("--zoom", type=float, default=2.0, help="zoom of the crop view (teacher view rules)")
    parser.add_argument("--context", type=float, default=0.5, help="padding around the evidence, fraction of its size")
    parser.add_argument("--min-side", type=int, default=56, help="minimum crop side in source pixels")
    parser.add_argument("--no-provided-crop", action="store_true", help="crop from boxes even if the data ships a crop")
    parser.add_argument(
        "--crop-source",
        default="box",
        choices=CROP_SOURCES,
        help="crop view from the data's boxes/crops (box), or from a region the model proposes "
        "itself (search, attention, grounding; boxes are not read; works on records without "
        "boxes)",
    )
    parser.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples for the gap interval")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap / option-shuffle seed")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    _add_backend_arguments(parser)
    return parser


def gap_config_from_args(args: argparse.Namespace) -> Any:
    """``GapConfig`` from parsed ``vopd gap`` arguments."""
    from vopd.config import ViewConfig
    from vopd.evaluation.gap import GapConfig

    view = ViewConfig(
        zoom=args.zoom,
        context=args.context,
        min_side=args.min_side,
        use_provided_crop=not args.no_provided_crop,
        crop_source=args.crop_source,
    )
    views = ("full", "crop", "boxed_full") if args.boxed_full else ("full", "crop")
    return GapConfig(
        data=args.data,
        out_dir=args.out,
        benchmark=args.benchmark,
        backend=_backend_config(args),
        views=views,
        view=view,
        checkpoints=list(args.checkpoints),
        n_boot=args.n_boot,
        level=args.level,
        seed=args.seed,
        limit=args.limit,
        judge=_judge_config(args),
        overwrite=args.overwrite,
    )


def _bench_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. vstar=/data/vstar), got {text!r}")
    return name.strip(), path.strip()


def _prompt_pair(text: str) -> tuple[str, str]:
    name, sep, template = text.partition("=")
    if not sep or not name or not template:
        raise argparse.ArgumentTypeError(f"expected NAME=TEMPLATE (e.g. hrbench_4k=letters), got {text!r}")
    return name.strip(), template.strip()


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``vopd eval``."""
    from vopd.evaluation.benchmarks import BENCHMARKS

    parser.add_argument(
        "benchmarks",
        nargs="+",
        type=_bench_pair,
        metavar="NAME=PATH",
        help=f"benchmark and its local files (or hf:<id>); names: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--out", required=True, help="output folder (predictions.jsonl, summary.md/json/png)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items of each benchmark")
    parser.add_argument("--seed", type=int, default=0, help="seed for option shuffles")
    parser.add_argument("--label", default="", help="model name in tables and plots")
    templates = "; ".join(f"{n}: {', '.join(b.prompts)}" for n, b in BENCHMARKS.items() if len(b.prompts) > 1)
    parser.add_argument(
        "--prompt",
        action="append",
        type=_prompt_pair,
        default=[],
        metavar="NAME=TEMPLATE",
        help=f"prompt template of a benchmark (default: paper, the paper's eval prompt); {templates}",
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="folder relative image paths start from (MME-RW JSON, POPE JSON, CV-Bench JSONL), "
        "instead of the data file's folder",
    )
    parser.add_argument(
        "--parse",
        choices=("vopd", "official"),
        default="vopd",
        help="how replies are read: vopd's rules (default), or each benchmark's official rule where it has "
        "one (MME-RW, MMStar, POPE, CV-Bench, MMVP), quirks included, for numbers comparable with a "
        "leaderboard (docs/evaluation.md)",
    )
    _add_backend_arguments(parser)
    return parser


def eval_config_from_args(args: argparse.Namespace) -> Any:
    """``EvalConfig`` from parsed ``vopd eval`` arguments."""
    from vopd.evaluation.runner import EvalConfig

    names = [name for name, _ in args.benchmarks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # a dict would keep only the last path: say so instead of evaluating one silently
        from vopd.knobs import ConfigError

        paths = [p for n, p in args.benchmarks if n == twice[0]]
        raise ConfigError(
            f"benchmark {twice[0]!r} is named twice ({', '.join(paths)}); evaluate each into its own --out, "
            "or put the files in one folder"
        )
    return EvalConfig(
        benchmarks=dict(args.benchmarks),
        out_dir=args.out,
        backend=_backend_config(args),
        judge=_judge_config(args),
        limit=args.limit,
        seed=args.seed,
        label=args.label,
        prompts=dict(args.prompt),
        image_root=args.image_root,
        parse=args.parse,
        overwrite=args.overwrite,
    )


#: Exit status of a run that finished but had items without a verdict (see ``--allow-failures``).
EXIT_FAILURES = 3


def run_gap(args: argparse.Namespace) -> int:
    """Entry point for the CLI: parse -> config -> :func:`vopd.evaluation.gap.main_gap`.

    Returns the exit status: 0, or :data:`EXIT_FAILURES` when answers or verdicts are missing
    (unless ``--allow-failures``). Errors raise (bad data: ``ValueError``; server down:
    ``BackendError``).
    """
    import sys

    from vopd.evaluation.gap import main_gap

    result = main_gap(gap_config_from_args(args))
    print(gap_summary(result, args.out))
    runs = result.get("checkpoints", []) if "views" not in result else [result]
    missing = sum(block.get("unjudged", 0) for r in runs for block in r.get("views", {}).values())
    if missing and not args.allow_failures:
        print(
            f"vopd gap: {missing} answers or verdicts missing (failed requests or judge); "
            "rerun the same command to retry them, or pass --allow-failures",
            file=sys.stderr,
        )
        return EXIT_FAILURES
    return 0


def gap_summary(result: dict[str, Any], out: str) -> str:
    """A few console lines: accuracy per view, the gap with its interval and the paired test."""
    if "views" not in result:  # --checkpoints: one result per checkpoint
        return f"gap over checkpoints written to {out}"
    lines = [f"{result['n_questions']} questions"]
    for view, block in result["views"].items():
        if block["ci"] is None:  # every answer of this view failed: no accuracy to show
            lines.append(f"  {view:9s}   n/a    (no answer judged; {block['unjudged']} unjudged)")
            continue
        lo, hi = block["ci"]
        lines.append(f"  {view:9s} {block['accuracy']:5.1f} %  [{lo:.1f}, {hi:.1f}]  ({block['unjudged']} unjudged)")
    gap = result["gap"]
    if gap["ci"] is None:
        lines.append("  gap (crop - full) n/a: no question was judged in both views")
    else:
        lines.append(
            f"  gap (crop - full) {gap['value']:+.1f} points, {result['interval']}: "
            f"[{gap['ci'][0]:+.1f}, {gap['ci'][1]:+.1f}]; exact McNemar p = {gap['mcnemar_p']:.3g}"
        )
    lines.append(f"  written: {out}/gap.json, {out}/gap.png")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    """Entry point for the CLI: parse -> config -> :func:`vopd.evaluation.runner.main_eval`.

    Returns the exit status: 0, or :data:`EXIT_FAILURES` when items failed (requests after
    their retries, or judgements), unless ``--allow-failures``: their scores count them as
    wrong, so a rerun (which retries exactly those) usually gives the number to report.
    """
    import sys
    from pathlib import Path

    from vopd.evaluation.runner import main_eval

    result = main_eval(eval_config_from_args(args))
    summary = Path(args.out) / "summary.md"
    if summary.is_file():
        print(summary.read_text())
    if result["failures"]:
        print(failure_message(result, allow=args.allow_failures), file=sys.stderr)
        if not args.allow_failures:
            return EXIT_FAILURES
    return 0


def failure_message(summary: dict[str, Any], *, allow: bool = False) -> str:
    """The console line for items without a verdict: their count by cause (image not found,
    request failed, judge failed, ...) and the fix for the largest group."""
    from collections import Counter

    from vopd.evaluation.runner import FAILURE_FIXES

    causes: Counter[str] = Counter()
    for row in summary["rows"]:
        causes.update(row.get("failure_causes") or {})
    total = summary["failures"]
    if not causes:  # a summary written before causes were recorded
        causes["request failed or judge failed"] = total
    ranked = causes.most_common()
    listed = ", ".join(f"{n} {cause}" for cause, n in ranked)
    top = ranked[0][0]
    fix = FAILURE_FIXES.get(top, "rerun the same command to retry them")
    tail = "" if allow else "; or pass --allow-failures to accept the scores as they are"
    return f"vopd eval: {total} items failed and were counted wrong ({listed}). {top}: {fix}{tail}"
