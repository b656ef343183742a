"""The ``vopd`` command line: parses arguments and calls the library (no logic of its own)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

COMMANDS: dict[str, str] = {
    "train": "Train a model with Vision-OPD (config YAML + key=value overrides; --resume continues).",
    "demo": "CPU toy world: measure the gap, train label-free, measure again, write a report.",
    "gap": "Measure the regional-to-global gap (crop vs full image) of a model on boxed data.",
    "eval": "Evaluate on fine-grained benchmarks (V*, HR-Bench, MME-RealWorld, ZoomBench, ...).",
    "data": "Build or import training data (toyworld scenes, Vision-OPD-6K check).",
    "toyworld": "Toy-world utilities: pretrain the tiny base model.",
    "config": "Print every training knob with its default and meaning.",
}


def _train(args: argparse.Namespace) -> int:
    from vopd.config import load_config
    from vopd.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 130 if result.interrupted else 0


def _config(args: argparse.Namespace) -> int:
    from vopd.config import config_markdown, describe_config

    if args.markdown:
        print(config_markdown(), end="")
        return 0
    for key, default, help_text in describe_config():
        print(f"{key:32s} {default:24s} {help_text}")
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.kind == "toyworld":
        from vopd.toyworld.scenes import write_dataset

        path = write_dataset(args.out, args.n, args.seed)
        print(f"wrote {args.n} toy scenes to {path}")
        return 0
    return _data_check(args)


def _data_check(args: argparse.Namespace) -> int:
    from vopd.config import load_config
    from vopd.datacheck import check_data, load_processor

    cfg = load_config(args.config, [])  # views, out_of_bounds, max_prompt_tokens as training uses them
    path = args.path or cfg.data.train
    processor = load_processor(args.model, trust_remote_code=cfg.model.trust_remote_code) if args.model else None
    found = check_data(
        path, views=cfg.views, out_of_bounds=cfg.data.out_of_bounds, decode=args.decode, processor=processor,
        max_prompt_tokens=args.max_prompt_tokens or cfg.data.max_prompt_tokens, thinking=cfg.model.thinking,
    )
    print(found.report())
    if not found.ok:
        print(f"{len(found.problems)} unusable row(s): fix them, or train with data.on_error=skip to skip them",
              file=sys.stderr)
    return 0 if found.ok else 1


def _mounted(module: str, attr: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), attr)(args) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vopd", description="Vision-OPD: teach multimodal LLMs to see fine details.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help=COMMANDS["train"], description=COMMANDS["train"])
    p.add_argument("--config", help="YAML recipe, e.g. configs/tiny_cpu.yaml")
    p.add_argument("--resume", action="store_true", help="continue output_dir from its newest intact checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in output_dir (deletes its checkpoints and metrics.jsonl)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_dir=runs/x optim.lr=1e-5")
    p.set_defaults(func=_train)

    p = sub.add_parser("config", help=COMMANDS["config"], description=COMMANDS["config"])
    p.add_argument("--markdown", action="store_true", help="print docs/config.md (a Markdown table)")
    p.set_defaults(func=_config)

    p = sub.add_parser("data", help=COMMANDS["data"], description=COMMANDS["data"])
    dsub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    q = dsub.add_parser("toyworld", help="generate toy scenes in the standard record format")
    q.add_argument("--n", type=int, default=500)
    q.add_argument("--seed", type=int, default=123)
    q.add_argument("--out", required=True)
    q.set_defaults(func=_data)
    q = dsub.add_parser("check", help="check a JSONL (ours or Vision-OPD-6K) as training would; exit 1 on bad rows")
    q.add_argument("path", nargs="?", help="record file or folder (default: data.train of --config)")
    q.add_argument("--config", help="training YAML whose views and data.* settings to check with")
    q.add_argument("--decode", action="store_true", help="decode every image fully and build both views (slower)")
    q.add_argument("--model", help="model spec or folder: measure every prompt with its processor")
    q.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="prompt length limit with --model (default: data.max_prompt_tokens)")
    q.set_defaults(func=_data)

    _mount_optional(sub)
    return parser


def _mount_optional(sub: argparse._SubParsersAction) -> None:
    """Sub-commands whose arguments live beside their implementation (imported lazily)."""
    import importlib

    mounts = [
        ("demo", "vopd.toyworld.cli_args", "add_demo_args", None),
        ("toyworld", "vopd.toyworld.cli_args", "add_toyworld_args", None),
        ("gap", "vopd.evaluation.cli_args", "add_gap_arguments", "run_gap"),
        ("eval", "vopd.evaluation.cli_args", "add_eval_arguments", "run_eval"),
    ]
    for name, module, add, run in mounts:
        p = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        try:
            mod = importlib.import_module(module)
            getattr(mod, add)(p)
        except (ImportError, AttributeError) as err:
            p.set_defaults(func=lambda a, e=err, n=name: _unavailable(n, e))
            continue
        if run is not None:
            p.set_defaults(func=lambda a, f=getattr(mod, run): int(f(a) or 0))


def _unavailable(name: str, err: Exception) -> int:
    print(f"vopd {name} is not available in this install: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import vopd.toyworld  # noqa: F401  registers toy-base and toyworld:N with vopd.specs (cheap: no model code)

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from vopd.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
