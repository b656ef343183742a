"""Arguments of ``vopd demo`` and ``vopd toyworld ...`` (mounted by the CLI; imports stay lazy for a
fast --help)."""

from __future__ import annotations

import argparse


def add_toyworld_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)
    p = sub.add_parser(
        "pretrain",
        help="train the tiny toy base from scratch with labels (the shipped checkpoint)",
        description="Supervised pretraining of the toy base (docs/toyworld.md). Deterministic from "
        "--seed at a fixed thread count.",
    )
    p.add_argument("--out", required=True, help="folder for the checkpoint and toy_base.json")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the shipped recipe's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--snapshot-dir", default=None, help="also save a checkpoint at every evaluation step")
    p.add_argument("--world", default="M", help="toy world of the scenes (M: the shipped one; R: resolution gap)")
    p.add_argument(
        "--full-world",
        default=None,
        help="world of the full-image training rows (default: --world); R's base uses M: it learns "
        "where the target is where the colour is readable",
    )
    p.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    import dataclasses

    from vopd.toyworld.pretrain import PretrainConfig, pretrain_base
    from vopd.toyworld.scenes import world_config

    given = {
        "out": args.out,
        "steps": args.steps,
        "seed": args.seed,
        "threads": args.threads,
        "eval_every": args.eval_every,
        "snapshot_dir": args.snapshot_dir,
        "scene": None if args.world == "M" else world_config(args.world),
        "full_scene": None if args.full_world is None else world_config(args.full_world),
    }
    cfg = dataclasses.replace(PretrainConfig(), **{k: v for k, v in given.items() if v is not None})
    _, _, report = pretrain_base(cfg)
    held = report.get("heldout") or {}
    print(
        f"toy base saved to {cfg.out}: held-out accuracy {held.get('accuracy')}, "
        f"{report['timing']['train_seconds']} s of training"
    )
    return 0


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vopd demo`` (mounted by the CLI)."""
    from vopd.toyworld.demo import DemoConfig

    d = DemoConfig()
    parser.add_argument("--out", default=d.out, help="output folder (report.md, results.json, plots, checkpoints)")
    parser.add_argument("--steps", type=int, default=d.steps, help="label-free training steps")
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--n-eval", type=int, default=d.n_eval, help="held-out scenes per evaluation")
    parser.add_argument("--eval-seed", type=int, default=d.eval_seed)
    parser.add_argument("--train-seed", type=int, default=d.train_seed)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument(
        "--teacher", default=d.teacher, help="frozen (default here: stable in the toy world), ema, live"
    )
    parser.add_argument("--teacher-rate", type=float, default=d.teacher_rate)
    parser.add_argument(
        "--world",
        default=d.world,
        help="toy world of the scenes (M: the shipped one; R: resolution gap, needs model.path=DIR "
        "of a base pretrained on it)",
    )
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=None,
        metavar="NAME",
        help="run the ablation suite instead (all, or variants whose name contains NAME)",
    )
    parser.add_argument("overrides", nargs="*", help="extra `vopd train` overrides, e.g. optim.lr=2e-4")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from vopd.toyworld.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        out=args.out,
        steps=args.steps,
        eval_every=args.eval_every,
        n_eval=args.n_eval,
        eval_seed=args.eval_seed,
        train_seed=args.train_seed,
        seed=args.seed,
        threads=args.threads,
        teacher=args.teacher,
        teacher_rate=args.teacher_rate,
        overrides=tuple(args.overrides),
        world=args.world,
    )
    if args.ablations is not None:
        from vopd.toyworld.ablations import run_ablations

        run_ablations(cfg, only=args.ablations or None)
        return 0
    run_demo(cfg)
    return 0
