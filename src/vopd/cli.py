"""The ``vopd`` command line: parses arguments and calls the library (no logic of its own).

Failures end with one line on stderr that says what went wrong and what to do, and a non-zero
exit status (2: bad configuration or arguments, 1: any other failure, 130: interrupted). The
Python traceback is shown only with ``--debug`` (anywhere on the command line) or ``VOPD_DEBUG=1``.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_early(signum: int, frame: object) -> None:
    """Ctrl-C before `main` takes over (this module's own imports): the one line, no traceback."""
    sys.stderr.write("vopd: interrupted\n")
    os._exit(130)


# First, before the heavier imports below: only when this module is the program (the `vopd` script or
# `python -m vopd.cli`), and only if Ctrl-C has its default meaning (a shell's background job ignores it).
if (__name__ == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "") == "vopd") and (
    signal.getsignal(signal.SIGINT) is signal.default_int_handler
):
    try:
        signal.signal(signal.SIGINT, _interrupted_early)
    except ValueError:  # not the main thread: leave Python's handler
        pass

import argparse  # noqa: E402  after the early handler on purpose
from collections.abc import Callable  # noqa: E402

#: ``vopd data propose --source`` choices: vopd.proposals.PROPOSAL_SOURCES (not imported here: torch).
PROPOSAL_SOURCES = ("search", "attention", "grounding")

COMMANDS: dict[str, str] = {
    "train": "Train a model with Vision-OPD (config YAML + key=value overrides; --resume continues).",
    "demo": "CPU toy world: measure the gap, train label-free, measure again, write a report.",
    "gap": "Measure the regional-to-global gap (crop vs full image) of a model on boxed data.",
    "eval": "Evaluate on fine-grained benchmarks (V*, HR-Bench, MME-RealWorld, ZoomBench, ...).",
    "data": "Build or import training data (toyworld scenes, Vision-OPD-6K check, proposed boxes, data from images).",
    "toyworld": "Toy-world utilities: pretrain the tiny base model.",
    "config": "Print every training knob with its default and meaning.",
    "export": "Write a checkpoint's student as a plain Hugging Face folder (sharded checkpoints included).",
    "model": "Model utilities: build a random model from a real checkpoint's small files (no weights needed).",
}


def _train(args: argparse.Namespace) -> int:
    from vopd.config import load_config

    cfg = load_config(args.config, args.overrides)  # before importing torch: config errors come fast
    from vopd.trainer import train

    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 130 if result.interrupted else 0


def _config(args: argparse.Namespace) -> int:
    from vopd.config import config_markdown, describe_config

    if args.markdown:
        print(config_markdown(), end="")
        return 0
    for row in describe_config():
        allowed = f"  [{row.allowed}]" if row.allowed else ""
        print(f"{row.key:32s} {row.default:24s} {row.help}{allowed}")
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.kind == "toyworld":
        from vopd.toyworld.scenes import write_dataset

        if args.n < 1:
            raise SystemExit("vopd data toyworld: --n must be >= 1")
        path = write_dataset(args.out, args.n, args.seed, overwrite=args.overwrite)
        print(f"wrote {args.n} toy scenes to {path}")
        return 0
    if args.kind == "propose":
        return _data_propose(args)
    return _data_check(args)


def _data_propose(args: argparse.Namespace) -> int:
    from vopd.config import load_config

    cfg = load_config(args.config, [])  # the views the proposals are made with
    from vopd.proposals.boxes import write_proposed_boxes
    from vopd.specs import resolve_model_spec

    def load() -> tuple:
        return resolve_model_spec(args.model, trust_remote_code=cfg.model.trust_remote_code)

    done = write_proposed_boxes(
        args.path,
        args.out,
        load,
        source=args.source,
        model_name=args.model,
        view_cfg=cfg.views,
        limit=args.limit,
        skip_fallbacks=args.skip_fallbacks,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        thinking=cfg.model.thinking,
        overwrite=args.overwrite,
    )
    print(done.report())
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from vopd.config import load_config
    from vopd.datacheck import check_data
    from vopd.specs import resolve_processor

    cfg = load_config(args.config, [])  # views, out_of_bounds, max_prompt_tokens as training uses them
    path = args.path or cfg.data.train
    processor = resolve_processor(args.model, trust_remote_code=cfg.model.trust_remote_code) if args.model else None
    found = check_data(
        path,
        views=cfg.views,
        out_of_bounds=cfg.data.out_of_bounds,
        decode=args.decode,
        processor=processor,
        max_prompt_tokens=args.max_prompt_tokens or cfg.data.max_prompt_tokens,
        thinking=cfg.model.thinking,
    )
    print(found.report())
    if found.usable == 0:  # what `vopd train` stops with on this file: the same error, exit status and message
        from vopd.records import no_usable_records

        raise no_usable_records(found.source, found.problems)
    if not found.ok:
        print(
            f"{len(found.problems)} unusable row(s): fix them, or train with data.on_error=skip to skip them",
            file=sys.stderr,
        )
    return 0 if found.ok else 1


def _export(args: argparse.Namespace) -> int:
    from vopd.sharded_checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out} (load it with the transformers Auto classes or serve it)")
    return 0


def _model(args: argparse.Namespace) -> int:
    from vopd.random_model import write_random_model

    made = write_random_model(
        args.src,
        args.out,
        layers=args.layers,
        vision_layers=args.vision_layers,
        hidden=args.hidden,
        vision_hidden=args.vision_hidden,
        dtype=args.dtype,
        seed=args.seed,
    )
    print(made.report())
    return 0


def _mounted(module: str, attr: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), attr)(args) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vopd", description="Vision-OPD: teach multimodal LLMs to see fine details.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback on errors (also VOPD_DEBUG=1; accepted anywhere)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help=COMMANDS["train"], description=COMMANDS["train"])
    from vopd.config import recipes  # light: no model code

    p.add_argument(
        "--config",
        help=f"YAML recipe: a file (e.g. configs/tiny_cpu.yaml) or a shipped recipe's name ({', '.join(recipes())})",
    )
    p.add_argument("--resume", action="store_true", help="continue output_dir from its newest intact checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in output_dir (deletes its checkpoints and metrics.jsonl)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. output_dir=runs/x optim.lr=1e-5")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help=COMMANDS["export"], description=COMMANDS["export"])
    p.add_argument("checkpoint", help="a checkpoint-N folder of a vopd run (checkpoint.format dcp or hf)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.set_defaults(func=_export)
    p = sub.add_parser("config", help=COMMANDS["config"], description=COMMANDS["config"])
    p.add_argument("--markdown", action="store_true", help="print docs/config.md (a Markdown table)")
    p.set_defaults(func=_config)

    p = sub.add_parser("data", help=COMMANDS["data"], description=COMMANDS["data"])
    dsub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    q = dsub.add_parser("toyworld", help="generate toy scenes in the standard record format")
    q.add_argument("--n", type=int, default=500)
    q.add_argument("--seed", type=int, default=123)
    q.add_argument("--out", required=True)
    q.add_argument(
        "--overwrite", action="store_true", help="replace records.jsonl/images in --out that vopd did not write"
    )
    q.set_defaults(func=_data)
    q = dsub.add_parser("check", help="check a JSONL (ours or Vision-OPD-6K) as training would; exit 1 on bad rows")
    q.add_argument("path", nargs="?", help="record file or folder (default: data.train of --config)")
    q.add_argument("--config", help="training YAML whose views and data.* settings to check with")
    q.add_argument("--decode", action="store_true", help="decode every image fully and build both views (slower)")
    q.add_argument("--model", help="model spec or folder: measure every prompt with its processor")
    q.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="prompt length limit with --model (default: data.max_prompt_tokens)",
    )
    q.set_defaults(func=_data)
    q = dsub.add_parser(
        "propose",
        help="write the model's own crop proposals into a copy of a record file as its "
        "boxes (then train with views.crop_source=box)",
    )
    q.add_argument("path", help="record file or folder (ours or Vision-OPD-6K); never written")
    q.add_argument("--model", required=True, help="model spec or folder that proposes the boxes")
    q.add_argument(
        "--source", required=True, choices=PROPOSAL_SOURCES, help="how the model proposes (docs/proposals.md)"
    )
    q.add_argument(
        "--out",
        required=True,
        help="output JSONL; proposals are cached beside it in <stem>.proposals.jsonl, so a rerun resumes",
    )
    q.add_argument("--limit", type=int, default=None, help="only the first N records")
    q.add_argument("--config", help="training YAML whose views (and model.trust_remote_code) to propose with")
    q.add_argument("--batch-size", type=int, default=100, help="prompts per forward pass")
    q.add_argument(
        "--skip-fallbacks",
        action="store_true",
        help="grounding: leave out records whose answer held no usable box (default: write them with "
        "the whole image as their box, flagged in meta.box_status)",
    )
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh: remove the proposals cached beside --out and replace --out, even if vopd did not write it",
    )
    q.set_defaults(func=_data)
    q = dsub.add_parser(
        "build",
        help="make training data from your own images: regions, a writer model's questions, a filter "
        "model's check (docs/data_build.md)",
    )
    from vopd.databuild.cli_args import add_build_args  # light: argparse only

    add_build_args(q)

    p = sub.add_parser("model", help=COMMANDS["model"], description=COMMANDS["model"])
    msub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    q = msub.add_parser(
        "random",
        help="write SRC's model with random weights (optionally shrunk) and SRC's tokenizer, chat template, "
        "processor and generation files unchanged: a local model folder for every vopd command "
        "(docs/real_checkpoints.md)",
    )
    q.add_argument("src", help="checkpoint folder with config.json (weights not needed)")
    q.add_argument("--out", required=True, help="new or empty output folder")
    q.add_argument("--layers", type=int, default=None, help="text layers (default: SRC's)")
    q.add_argument("--vision-layers", type=int, default=None, help="vision tower blocks (default: SRC's)")
    q.add_argument(
        "--hidden", type=int, default=None, help="text width, a multiple of the head dimension (default: SRC's)"
    )
    q.add_argument(
        "--vision-hidden",
        type=int,
        default=None,
        help="vision tower width, a multiple of its head dimension (default: SRC's)",
    )
    q.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="weights (default: SRC's dtype)"
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    q.set_defaults(func=_model)

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
            p.set_defaults(func=lambda a, f=getattr(mod, run): _exit_code(f(a)))


def _exit_code(result: object) -> int:
    """A command's return value as an exit status: an int is the status, anything else means success."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _unavailable(name: str, err: Exception) -> int:
    print(f"vopd {name} is not available in this install: {err}", file=sys.stderr)
    return 2


# (module, class, what it is, what to do): expected failures and their one-line advice. A class is
# looked up only in modules already imported, since an error of that class implies its module ran.
EXPECTED_ERRORS: tuple[tuple[str, str, str, str], ...] = (
    (
        "vopd.knobs",
        "ConfigError",
        "config error",
        "fix the file or key named above (`vopd config` lists every key with its allowed values)",
    ),
    (
        "vopd.records",
        "RecordError",
        "data error",
        "fix the file or row named above (`vopd data check FILE` lists every bad row)",
    ),
    ("vopd.images", "ImageError", "image error", "fix or remove that image (`vopd data check FILE` lists them)"),
    (
        "vopd.evaluation.benchmarks.files",
        "BenchmarkFormatError",
        "benchmark file error",
        "check the benchmark file's format (docs/evaluation.md)",
    ),
    (
        "vopd.evaluation.backends",
        "BackendError",
        "backend error",
        "check --backend/--url/--model and that the server answers; rerunning the same command resumes",
    ),
    (
        "vopd.checkpoint",
        "CheckpointError",
        "checkpoint error",
        "remove or move the broken checkpoint folder named above, then resume from an intact one",
    ),
    ("vopd.runfolder", "RunFolderError", "run folder", ""),  # its message says what to do
    ("vopd.outputs", "OutputError", "output folder", ""),  # its message says what to do
    ("vopd.trainer", "TrainingError", "training stopped", "see metrics.jsonl in the run folder; the message says why"),
)


def _explain(err: BaseException) -> tuple[str, str, int]:
    """(label, advice, exit status) for an exception."""
    for module, name, label, advice in EXPECTED_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(err, cls):
            return label, advice, 2 if name == "ConfigError" else 1
    if type(err).__name__ == "OutOfMemoryError":
        return "out of memory", "lower micro_batch_prompts, rollout.n or rollout.max_new_tokens", 1
    if isinstance(err, FileNotFoundError):
        return "file not found", "check the path", 1
    if isinstance(err, PermissionError):
        return "permission denied", "check the path's permissions", 1
    if isinstance(err, OSError):
        return "cannot read or write", "check the path, hub id or disk named above", 1
    if isinstance(err, MemoryError):
        return "out of memory", "use a smaller batch or model", 1
    if isinstance(err, ValueError):  # the library's argument checks: the message names what is wrong
        return "invalid input", "fix what the message names (--debug or VOPD_DEBUG=1 shows where it was raised)", 1
    return f"unexpected error ({type(err).__name__})", "rerun with --debug (or VOPD_DEBUG=1) for the traceback", 1


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"


def _debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` wherever it appears; also honour ``VOPD_DEBUG=1``."""
    env = os.environ.get("VOPD_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return [a for a in argv if a != "--debug"], env or "--debug" in argv


def _close_process_group() -> None:
    """A torchrun rank's process group goes before exit (see `vopd.parallel.close_process_group`)."""
    if "torch.distributed" in sys.modules:  # never import torch just for this (`vopd --help` stays fast)
        from vopd.parallel import close_process_group

        close_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run ``vopd``; returns the exit status (see the module docstring)."""
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a launcher's rank ends without teardown
        from vopd.parallel import exit_rank

        exit_rank(code)
    return code


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv, debug = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    command = next((a for a in argv if not a.startswith("-")), "")
    try:  # everything inside: a Ctrl-C while the imports load is the same one line as one mid-run
        if signal.getsignal(signal.SIGINT) is _interrupted_early:  # from here on KeyboardInterrupt says it
            signal.signal(signal.SIGINT, signal.default_int_handler)
        import vopd.toyworld  # noqa: F401  registers toy-base and toyworld:N with vopd.specs (no model code)

        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        command = args.command
        try:
            return args.func(args)
        finally:
            _close_process_group()
    except BrokenPipeError:  # the reader went away (e.g. `vopd config | head`): nothing left to say
        sys.stderr.close()
        return 141
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vopd {command}: interrupted" if command else "vopd: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure becomes one line (traceback with --debug)
        if debug:
            raise
        label, advice, code = _explain(err)
        tail = f" -> {advice}" if advice else ""
        print(f"vopd {command}: {label}: {_one_line(err)}{tail}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
