"""Atomic, resumable checkpoints in the Hugging Face layout.

``output_dir/checkpoint-<step>/`` holds the student as ``save_pretrained`` files (model +
processor: loadable with the transformers Auto classes) and ``trainer_state/`` with everything a
resume needs: teacher weights (safetensors), optimiser and scheduler state, RNG states and the
step counter (the data position is a function of the step). A checkpoint is written to a temporary
folder, every file and the folder are fsynced, and only then is it renamed into place, so neither a
crash nor a power cut mid-write leaves a half checkpoint behind or destroys a finished one.

``state.json`` (written last) lists every file of the checkpoint with its size; `check_checkpoint`
verifies that list and each safetensors header cheaply, and `load_resume_point` falls back to the
newest checkpoint that passes, saying which file of the newer one is broken.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vopd.outputs import public_weight_modes
from vopd.stock_processor import make_processor_stock

STATE_DIR = "trainer_state"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_RE = re.compile(r"^\.checkpoint-\d+\.tmp-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do."""


_REPLACED_RE = re.compile(r"^\.checkpoint-(\d+)\.old-\d+$")
BROKEN_PREFIX = "broken-"  # broken checkpoints are moved aside to broken-checkpoint-N (not counted, not resumed)


def _restore_replaced(root: Path) -> None:
    """Undo a crash in the middle of re-saving a step.

    Re-saving ``checkpoint-N`` moves the finished one aside to ``.checkpoint-N.old-<pid>`` before
    the new one is renamed in. A crash between the two renames would leave no ``checkpoint-N``
    at all: put the finished one back. If the new one did land, the aside copy is just removed.
    """
    for aside in root.iterdir():
        m = _REPLACED_RE.match(aside.name)
        if not m or not (aside / STATE_DIR / "state.json").is_file():
            continue
        final = root / f"checkpoint-{m.group(1)}"
        try:
            if (final / STATE_DIR / "state.json").is_file():
                shutil.rmtree(aside)
            elif not final.exists():
                aside.rename(final)
        except OSError:  # another process got there first
            pass


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints under ``output_dir``, oldest first (restoring one a crash left aside)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    _restore_replaced(root)
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest finished checkpoint (by its state.json; contents not verified)."""
    dirs = [d for d in checkpoint_dirs(output_dir) if (d / STATE_DIR / "state.json").is_file()]
    return dirs[-1] if dirs else None


def load_resume_point(output_dir: str | Path, *, say: Any = print) -> tuple[Path, dict[str, Any]] | None:
    """``(checkpoint, trainer state)`` of the newest checkpoint that passes `check_checkpoint`
    and whose trainer state loads; broken newer ones are reported through ``say`` and skipped.

    Raises:
        CheckpointError: checkpoints exist but every one of them is broken.
    """

    def check_and_load(ckpt: Path) -> dict[str, Any]:
        check_checkpoint(ckpt)
        state = load_trainer_state(ckpt)
        named = int(_CKPT_RE.match(ckpt.name).group(1))  # type: ignore[union-attr]
        if state.get("step") != named:  # copied in or renamed: the recorded step is what resumes
            say(
                f"resume: warning: {ckpt} records step {state.get('step')}, not {named} as its name says "
                f"(copied or renamed?); resuming at the recorded step {state.get('step')}"
            )
        return state

    return _newest_passing(output_dir, check_and_load, say)


def _newest_passing(output_dir: str | Path, test: Any, say: Any) -> Any:
    problems: list[str] = []
    for ckpt in reversed(checkpoint_dirs(output_dir)):
        try:
            value = test(ckpt)
        except CheckpointError as err:
            problems.append(str(err))
            say(f"resume: skipping broken checkpoint: {err}")
            continue
        if problems:
            say(f"resume: falling back to {ckpt}, the newest intact checkpoint")
        return ckpt, value
    if problems:
        raise CheckpointError(
            f"no intact checkpoint under {output_dir}: "
            + "; ".join(problems)
            + ". Start a new run (another output_dir, or --overwrite)"
        )
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (header and size only), or None."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"header of {n} bytes but the file has {size} bytes (truncated)"
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"unreadable safetensors header ({err})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{size} bytes but its header needs {need} (truncated)"
    return None


def check_checkpoint(checkpoint: str | Path) -> None:
    """Cheap integrity check of a checkpoint (no tensor is loaded).

    ``state.json`` must parse; every file it lists must exist with its recorded size (older
    checkpoints without the list: the required files must exist); every safetensors file must
    have a complete header and be as long as the header says.

    Raises:
        CheckpointError: naming the first broken file and what is wrong with it.
    """
    ckpt = Path(checkpoint)
    state_file = ckpt / STATE_DIR / "state.json"
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_file}: unreadable ({err})") from None
    files = state.get("files")
    if not isinstance(files, dict):  # written before the file list existed
        files = {f"{STATE_DIR}/optim_rng.pt": None}
        if not any(ckpt.glob("*.safetensors")):
            files["model.safetensors"] = None
    for rel, size in files.items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if size is not None and path.stat().st_size != size:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, {size} were written (truncated or altered)")
    for path in sorted(ckpt.rglob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise CheckpointError(f"{path}: {problem}")


def clean_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Remove ``.checkpoint-N.tmp-PID`` folders left by crashed saves (PID no longer running).

    Returns the removed folders. Temporaries of a live process (another save under way) stay.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        m = _TMP_RE.match(path.name)
        if m and path.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier call in this process that crashed mid-save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(obj: Any) -> Any:
    """numpy arrays/ints -> lists/ints so the RNG state round-trips through torch.save safely."""
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested dict (e.g. an optimiser state), by dotted name."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        out: dict[str, torch.Tensor] = {}
        for k, v in tree.items():
            out.update(_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {}


def _first_non_finite(tensors: dict[str, torch.Tensor], what: str) -> str | None:
    """``"<what> tensor <name>"`` for the first floating tensor with a NaN or inf, else None."""
    for name, t in tensors.items():
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            return f"{what} tensor {name!r}"
    return None


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: Any,
    processor: Any,
    teacher_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int = 0,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    say: Any = print,
    tmp: Path | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; keep the newest ``keep`` intact ones (0 = keep all;
    see `prune_checkpoints`).

    ``model_state`` / ``optimizer_state``: full states gathered from a sharded model (FSDP2),
    written instead of ``model``'s and ``optimizer``'s own. ``tmp``: the temporary folder
    (`temporary_folder`) when other processes already wrote their shards into it
    (`vopd.sharded_checkpoint`); it is completed, listed in ``state.json`` and renamed like any other.
    """
    optimizer_state = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    bad = (
        _first_non_finite(model_state if model_state is not None else model.state_dict(), "model")
        or _first_non_finite(teacher_state, "teacher")
        or _first_non_finite(_tensors(optimizer_state.get("state", {})), "optimizer state")
    )
    if bad:
        raise CheckpointError(f"refusing to write checkpoint-{step}: {bad} holds NaN or inf values")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    if tmp is None:
        tmp = temporary_folder(root, step, os.getpid())
        if tmp.exists():
            shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
            make_processor_stock(tmp)  # stock class name (+ video processor entry): servable outside vopd
        state_dir = tmp / STATE_DIR
        state_dir.mkdir(exist_ok=True)
        if teacher_state:
            # Tied weights share storage; safetensors wants each tensor once, so clone.
            save_file(
                {k: v.detach().cpu().clone().contiguous() for k, v in teacher_state.items()},
                state_dir / "teacher.safetensors",
            )
        torch.save(
            {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": _to_plain(rng_state())},
            state_dir / "optim_rng.pt",
        )
        public_weight_modes(tmp)  # the safetensors writer makes 0600 files; others get the umask's mode
        # state.json last: it lists every other file with its size, so a resume can tell a complete
        # checkpoint from one whose bytes an OS crash lost.
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (state_dir / "state.json").write_text(json.dumps({"step": step, **extra, "files": files}, indent=2))
        _fsync_tree(tmp)
    # A full disk, a quota, a vanished mount: leave no half-written folder behind. torch.save reports a
    # full disk as a RuntimeError from its zip writer ("enforce fail at inline_container.cc"), so both.
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        need = _state_bytes(model_state if model_state is not None else model.state_dict())
        need += _state_bytes(teacher_state) + _state_bytes(_tensors(optimizer_state.get("state", {})))
        raise CheckpointError(
            f"could not write checkpoint-{step} under {root} ({type(err).__name__}: {err}); "
            f"{_disk_line(root, need)}; the earlier checkpoints are untouched and the temporary folder "
            "was removed. Free space (or fix the folder) and --resume"
        ) from err
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it atomically
        old = root / f".checkpoint-{step}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)  # make the rename itself durable before older checkpoints are pruned
    if keep > 0:
        prune_checkpoints(root, keep, say=say)
    return final


def temporary_folder(output_dir: str | Path, step: int, pid: int) -> Path:
    """Where ``checkpoint-<step>`` is written before its rename (``pid``: the writing process, rank 0's
    when several write; `clean_stale_temporaries` removes it once that process is gone)."""
    return Path(output_dir) / f".checkpoint-{step}.tmp-{pid}"


def broken_checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Checkpoints `prune_checkpoints` moved aside as broken (``broken-checkpoint-N[.K]``)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(BROKEN_PREFIX + "checkpoint-"))


def prune_checkpoints(output_dir: str | Path, keep: int, *, say: Any = print) -> list[Path]:
    """Keep the newest ``keep`` *intact* checkpoints (by step) and remove older intact ones.

    Every checkpoint is verified first (`check_checkpoint`): a broken one is moved aside to
    ``broken-checkpoint-N`` and reported through ``say``; it is neither counted among the kept
    ones nor deleted (the user decides). So a truncated newer checkpoint never pushes a good
    one out, and pruning by number alone cannot delete the checkpoint just written.
    Returns the removed checkpoints.
    """
    root = Path(output_dir)
    intact: list[Path] = []
    for ckpt in checkpoint_dirs(root):
        try:
            check_checkpoint(ckpt)
        except CheckpointError as err:
            aside = root / f"{BROKEN_PREFIX}{ckpt.name}"
            n = 1
            while aside.exists():
                aside, n = root / f"{BROKEN_PREFIX}{ckpt.name}.{n}", n + 1
            ckpt.rename(aside)
            say(f"checkpoint: moved the broken {ckpt.name} aside to {aside} ({err}); it is not resumed or counted")
            continue
        intact.append(ckpt)
    stale = intact[:-keep] if keep > 0 else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _state_bytes(tensors: Any) -> int:
    """Bytes the tensors of a state dict take on disk (about what a checkpoint of them needs)."""
    values = tensors.values() if isinstance(tensors, dict) else []
    return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))


def _disk_line(root: Path, need: int) -> str:
    """``"the disk at <mount> has X free, a checkpoint needs about Y"`` for a failed save."""
    mount = root.resolve()
    while not os.path.ismount(mount) and mount.parent != mount:
        mount = mount.parent
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return f"a checkpoint needs about {_size(need)} ({need} bytes)"
    short = "; too little space" if free < need else ""
    return f"the disk at {mount} has {_size(free)} free, a checkpoint needs about {_size(need)} ({need} bytes){short}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders: nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder (deepest first), under ``root``."""
    dirs = [root]
    for path in root.rglob("*"):
        if path.is_dir():
            dirs.append(path)
        elif path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d)


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """Read ``trainer_state/`` of a checkpoint (only tensors and plain types are unpickled).

    Raises:
        CheckpointError: a file is missing, truncated or unreadable (the message names it).
    """
    state_dir = Path(checkpoint) / STATE_DIR
    if not (state_dir / "state.json").is_file():
        raise CheckpointError(f"{checkpoint} has no {STATE_DIR}/state.json: not a resumable vopd checkpoint")
    try:
        out: dict[str, Any] = json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_dir / 'state.json'}: unreadable ({err})") from None
    optim_file = state_dir / "optim_rng.pt"
    try:
        blob = torch.load(optim_file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle/zip errors, EOFError, ... on a bad file
        raise CheckpointError(f"{optim_file}: cannot be loaded ({type(err).__name__}: {err})") from None
    out.update(blob)
    teacher_file = state_dir / "teacher.safetensors"
    listed = isinstance(out.get("files"), dict) and f"{STATE_DIR}/teacher.safetensors" in out["files"]
    if listed and not teacher_file.is_file():
        raise CheckpointError(f"{teacher_file}: missing (this checkpoint was saved with a teacher)")
    try:
        out["teacher"] = load_file(teacher_file) if teacher_file.is_file() else {}
    except Exception as err:  # safetensors raises its own error types on a bad header
        raise CheckpointError(f"{teacher_file}: cannot be loaded ({type(err).__name__}: {err})") from None
    return out


def restore_rng(saved: dict[str, Any]) -> None:
    state = dict(saved)
    np_state = state["numpy"]
    state["numpy"] = {**np_state, "state": {**np_state["state"]}}
    set_rng_state(state)
