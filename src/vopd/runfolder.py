"""One run folder holds one run: claiming ``output_dir``, checking a resume against the saved run.

A new run into a folder that already holds checkpoints or ``metrics.jsonl`` is refused unless the
user asks to overwrite (then the old run's checkpoints and metrics are removed, saying so), so an
older run is never pruned or mixed into silently. ``--resume`` compares this run's config and
world size with the ones saved in the checkpoint: keys that change what is trained (seed, data,
batch sizes, model, teacher, loss, ...) are refused by name; knobs that only change how long,
how often or where (``max_steps``, ``save_every``, ``optim.lr``, ...) are allowed with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vopd.checkpoint import broken_checkpoint_dirs, checkpoint_dirs, clean_stale_temporaries
from vopd.jsonl import write_rows

__all__ = [
    "HARMLESS_KEYS",
    "RunFolderError",
    "check_resume_config",
    "check_world_size",
    "lock_run_folder",
    "release_run_folder",
    "prepare_run_folder",
    "truncate_metrics",
]

METRICS_FILE = "metrics.jsonl"
PROPOSALS_FILE = "proposals.jsonl"  # views.crop_source's cache (vopd.proposals.PROPOSALS_FILE): part of the run
LOCK_FILE = ".vopd-train.lock"  # held (flock) by the process training into the folder
_HELD: dict[str, int] = {}  # folders this process holds the lock of -> lock file descriptor
TRACKER_DIR = "vopd"  # accelerate's tracker logs (TensorBoard) under output_dir

#: Config keys (dotted) a resume may change with only a warning: run length, logging, paths,
#: performance knobs that do not change what is computed, and ``optim.lr`` (applied on resume).
#: A key ending in ``.`` covers a whole section.
HARMLESS_KEYS: tuple[str, ...] = (
    "max_steps",
    "epochs",
    "save_every",
    "save_minutes",
    "keep_checkpoints",
    "log_every",
    "report_to",
    "output_dir",
    "max_bad_steps",
    "threads",
    "device",
    "naive",
    "mixed_precision",
    "optim.lr",
    "data.num_workers",
    "model.gradient_checkpointing",
    "model.attn_implementation",
    "loss.chunk_size",
    "health.",
    "checkpoint.",  # a resume reads each checkpoint by the format it records
)


class RunFolderError(RuntimeError):
    """``output_dir`` holds another run, or a resume does not match the run it continues."""


def _has_run(root: Path) -> list[str]:
    """What in ``root`` belongs to an earlier run (checkpoint folders, a non-empty metrics file)."""
    found = [p.name for p in checkpoint_dirs(root)] + [p.name for p in broken_checkpoint_dirs(root)]
    metrics = root / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    if (root / PROPOSALS_FILE).is_file():  # made by the earlier run's model: --overwrite must not keep it
        found.append(PROPOSALS_FILE)
    return found


def prepare_run_folder(
    output_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    main_process: bool = True,
    say: Callable[[str], Any] = print,
) -> None:
    """Claim ``output_dir`` for this run; clean temporaries that crashed saves left behind.

    An empty ``output_dir`` is refused (it would train into the current folder).

    Without ``resume`` a folder holding an earlier run is refused unless ``overwrite``, which
    removes that run's checkpoints, ``metrics.jsonl`` and tracker logs (only the main process
    deletes; every process raises the same refusal).

    Raises:
        RunFolderError: the folder holds a run and neither ``resume`` nor ``overwrite`` is set,
            or both are set.
    """
    if str(output_dir).strip() == "":
        raise RunFolderError(
            f"output_dir={str(output_dir)!r} would train into the current folder; name a folder, e.g. output_dir=runs/x"
        )
    root = Path(output_dir)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: pick one")
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"output_dir={root} is a file, not a folder")
    if main_process:
        lock_run_folder(root)
        for path in clean_stale_temporaries(root):
            say(f"removed {path}, left by a save that crashed")
    if resume or not root.is_dir():
        return
    found = _has_run(root)
    if not found:
        return
    if not overwrite:
        raise RunFolderError(
            f"output_dir={root} already holds a run ({', '.join(found)}). Continue it with --resume, "
            "replace it with --overwrite (deletes its checkpoints and metrics), or choose another output_dir"
        )
    if main_process:
        for name in found:
            path = root / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if (root / TRACKER_DIR).is_dir():
            shutil.rmtree(root / TRACKER_DIR)
        say(f"--overwrite: removed the earlier run in {root} ({', '.join(found)})")


def lock_run_folder(output_dir: str | Path) -> None:
    """Hold an advisory lock on ``output_dir`` until this process exits, so that a second
    ``vopd train`` into the same folder (launched twice, a scheduler retry) is refused instead of
    interleaving its metrics and checkpoints with the first. A no-op where ``fcntl`` is missing.

    Raises:
        RunFolderError: another live process holds the folder.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return
    root = Path(output_dir)
    key = str(root.resolve())
    if key in _HELD:
        return
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunFolderError(
            f"output_dir={root} is in use by another running vopd train (pid {owner}); wait for it to "
            "finish, stop it, or choose another output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = fd


def release_run_folder(output_dir: str | Path) -> None:
    """Give up the lock `lock_run_folder` took (a finished run; also released at process exit)."""
    fd = _HELD.pop(str(Path(output_dir).resolve()), None)
    if fd is not None:
        os.close(fd)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(tree, default=str))}  # tuples -> lists, paths -> str


def _harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS_KEYS)


def check_resume_config(
    saved: dict[str, Any] | None,
    current: dict[str, Any],
    *,
    checkpoint: str | Path,
    say: Callable[[str], Any] = print,
) -> list[str]:
    """Compare the config saved in ``checkpoint`` with this run's; return the harmless changes.

    Harmless changes (see :data:`HARMLESS_KEYS`) are reported through ``say``.

    Raises:
        RunFolderError: naming every other key whose value differs, with both values.
    """
    if not isinstance(saved, dict):
        say(f"resume: {checkpoint} holds no config; cannot check that this run matches it")
        return []
    old, new = _flatten(saved), _flatten(current)
    refused, warned = [], []
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            continue  # a knob added or removed between versions: nothing to compare
        if old[key] == new[key]:
            continue
        line = f"{key}: {old[key]!r} -> {new[key]!r}"
        (warned if _harmless(key) else refused).append(line)
    if refused:
        raise RunFolderError(
            f"--resume: this run's config differs from the one saved in {checkpoint} in what is trained: "
            + "; ".join(refused)
            + ". Use the saved values to continue that run, or start a new run (another output_dir; "
            f"model.path={checkpoint} starts from its weights)"
        )
    for line in warned:
        say(f"resume: {line} (allowed)")
    return warned


def check_world_size(saved: int | None, current: int, *, checkpoint: str | Path) -> None:
    """Refuse a resume on another number of processes (the data shards and the RNG states differ).

    The one place to relax when a sharded run learns to reshard its checkpoint.

    Raises:
        RunFolderError: ``saved`` differs from ``current``.
    """
    if saved is not None and int(saved) != int(current):
        raise RunFolderError(
            f"--resume: {checkpoint} was saved by {saved} process(es), this run has {current}. Resume with "
            f"{saved} process(es), or start a new run from its weights (model.path={checkpoint})"
        )


def truncate_metrics(output_dir: str | Path, step: int) -> int:
    """Drop the lines of ``metrics.jsonl`` after ``step`` (and any line a crash cut short).

    A resumed run re-logs the steps after its checkpoint; without this they would appear twice.
    Returns the number of lines dropped. The file is rewritten atomically.
    """
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row.get("step", step + 1)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_rows(kept, path)
    return dropped
