"""Arguments of ``vopd data build`` (mounted by the CLI; the library is imported only when the command runs)."""

from __future__ import annotations

import argparse

__all__ = ["add_build_args", "run_build"]


def add_build_args(q: argparse.ArgumentParser) -> None:
    """Add the ``vopd data build`` arguments to ``q``; defaults are the settings dataclasses'."""
    q.add_argument("images", nargs="+", help="image folders (searched recursively), image files, or .txt lists")
    q.add_argument(
        "--out", required=True, help="output JSONL; caches in <stem>.build/, <stem>.summary.json, <stem>.gallery.png"
    )
    q.add_argument("--config", help="training YAML whose views the crops are cut with (default: the library's)")
    q.add_argument("--limit", type=int, default=None, help="only the first N regions (a trial run)")
    q.add_argument("--gallery", type=int, default=12, help="questions shown in the gallery PNG (0: none)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = q.add_argument_group("regions")
    g.add_argument("--boxes", help="JSONL of {image, boxes, labels?} (e.g. a detector's output), paths relative to it")
    g.add_argument("--propose-model", help="model spec or folder whose own proposal is each image's region")
    g.add_argument("--source", default="attention", choices=("attention", "search", "grounding"), help="proposer")
    g.add_argument("--propose-question", default=None, help="what the proposer is asked about every image")
    g.add_argument("--max-area", type=float, default=0.15, help="keep regions of at most this fraction of the image")
    g.add_argument("--min-side", type=float, default=8.0, help="keep regions whose sides are at least this many px")
    g = q.add_argument_group("questions (an OpenAI-compatible writer)")
    g.add_argument("--writer-url", required=True, help="server base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--writer-model", required=True, help="the served model name")
    g.add_argument(
        "--writer-prompt", help="prompt template file ({image}, {label}, {views}); default: docs/data_build.md"
    )
    g.add_argument("--writer-full-image", action="store_true", help="also show the full image with the box in red")
    g.add_argument("--writer-temperature", type=float, default=0.0)
    g.add_argument("--writer-max-tokens", type=int, default=512)
    g = q.add_argument_group("filter")
    g.add_argument("--filter-url", help="server base URL of the filter model")
    g.add_argument("--filter-model", help="the filter's served model name")
    g.add_argument("--filter-local", help="model spec or folder answered locally (HF) instead of a server")
    g.add_argument("--filter-samples", type=int, default=8, help="answers sampled per question")
    g.add_argument("--filter-temperature", type=float, default=1.0)
    g.add_argument(
        "--filter-agree", type=float, default=0.75, help="keep when the writer's answer holds more than this share"
    )
    g.add_argument(
        "--drop-easy", action="store_true", help="also drop questions the filter answers as surely from the full image"
    )
    g = q.add_argument_group("requests")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="NAME of the variable with the writer's key")
    g.add_argument("--filter-api-key-env", default=None, help="NAME of the variable with the filter's key")
    g.add_argument(
        "--no-thinking-switch",
        action="store_true",
        help="send no chat_template_kwargs.enable_thinking=false (for hosted APIs that reject unknown fields)",
    )
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight per server")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt")
    g.add_argument("--retries", type=int, default=3, help="extra attempts before a request counts as failed")
    q.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    """Turn the arguments into a :class:`~vopd.databuild.settings.BuildConfig` and build."""
    from pathlib import Path

    from vopd.config import load_config
    from vopd.databuild.pipeline import build_dataset
    from vopd.databuild.settings import (
        DEFAULT_PROPOSE_QUESTION,
        BuildConfig,
        ChatConfig,
        FilterConfig,
        RegionConfig,
        WriterConfig,
    )

    views = load_config(args.config, []).views
    common = {
        "concurrency": args.concurrency,
        "timeout_s": args.timeout,
        "retries": args.retries,
        "thinking": None if args.no_thinking_switch else False,
    }
    writer_chat = ChatConfig(url=args.writer_url, model=args.writer_model, api_key_env=args.api_key_env, **common)
    filter_chat = None
    if args.filter_url or args.filter_model:
        key_env = args.filter_api_key_env or args.api_key_env
        filter_chat = ChatConfig(
            url=args.filter_url or "", model=args.filter_model or "", api_key_env=key_env, **common
        )
    cfg = BuildConfig(
        images=args.images,
        out=args.out,
        regions=RegionConfig(
            boxes_file=args.boxes,
            propose_model=args.propose_model,
            propose_source=args.source,
            propose_question=args.propose_question or DEFAULT_PROPOSE_QUESTION,
            max_area=args.max_area,
            min_side=args.min_side,
        ),
        writer=WriterConfig(
            chat=writer_chat,
            prompt=Path(args.writer_prompt).read_text(encoding="utf-8") if args.writer_prompt else None,
            show_full=args.writer_full_image,
            temperature=args.writer_temperature,
            max_tokens=args.writer_max_tokens,
        ),
        filter=FilterConfig(
            chat=filter_chat,
            local_model=args.filter_local,
            samples=args.filter_samples,
            temperature=args.filter_temperature,
            agree=args.filter_agree,
            drop_easy=args.drop_easy,
        ),
        views=views,
        limit=args.limit,
        gallery=args.gallery,
        progress=not args.no_progress,
    )
    print(build_dataset(cfg).report())
    return 0
