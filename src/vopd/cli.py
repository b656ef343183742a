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
    from vopd.datasets import load_records

    loaded = load_records(args.path, on_error="skip")
    samples = getattr(loaded, "samples", loaded)
    print(f"{args.path}: {len(samples)} usable samples")
    report = getattr(loaded, "report", None)
    if report:
        print(report)
    return 0


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
    q = dsub.add_parser("check", help="load a JSONL (ours or Vision-OPD-6K) and report bad rows")
    q.add_argument("path")
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
