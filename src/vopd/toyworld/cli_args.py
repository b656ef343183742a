"""Arguments of ``vopd toyworld ...`` (mounted by the CLI; imports stay lazy for a fast --help)."""

from __future__ import annotations

import argparse


def add_toyworld_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)
    p = sub.add_parser("pretrain", help="train the tiny toy base from scratch with labels (the shipped checkpoint)",
                       description="Supervised pretraining of the toy base (docs/toyworld.md). Deterministic from "
                                   "--seed at a fixed thread count.")
    p.add_argument("--out", required=True, help="folder for the checkpoint and toy_base.json")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the shipped recipe's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--snapshot-dir", default=None, help="also save a checkpoint at every evaluation step")
    p.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    import dataclasses

    from vopd.toyworld.pretrain import PretrainConfig, pretrain_base

    given = {"out": args.out, "steps": args.steps, "seed": args.seed, "threads": args.threads,
             "eval_every": args.eval_every, "snapshot_dir": args.snapshot_dir}
    cfg = dataclasses.replace(PretrainConfig(), **{k: v for k, v in given.items() if v is not None})
    _, _, report = pretrain_base(cfg)
    held = report.get("heldout") or {}
    print(f"toy base saved to {cfg.out}: held-out accuracy {held.get('accuracy')}, "
          f"{report['timing']['train_seconds']} s of training")
    return 0
