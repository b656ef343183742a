"""Atomic, resumable checkpoints in the Hugging Face layout.

``output_dir/checkpoint-<step>/`` holds the student as ``save_pretrained`` files (model +
processor: loadable with the transformers Auto classes) and ``trainer_state/`` with everything a
resume needs: teacher weights (safetensors), optimiser and scheduler state, RNG states and the
step counter (the data position is a function of the step). A checkpoint is written to a temporary
folder and renamed into place, so a crash mid-write never leaves a half checkpoint behind and never
destroys a finished one.
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

STATE_DIR = "trainer_state"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


_REPLACED_RE = re.compile(r"^\.checkpoint-(\d+)\.old-\d+$")


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
    dirs = [d for d in checkpoint_dirs(output_dir) if (d / STATE_DIR / "state.json").is_file()]
    return dirs[-1] if dirs else None


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
) -> Path:
    """Write ``checkpoint-<step>`` atomically; prune to the newest ``keep`` (0 = keep all)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(tmp)
    state_dir = tmp / STATE_DIR
    state_dir.mkdir()
    if teacher_state:
        # Tied weights share storage; safetensors wants each tensor once, so clone.
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in teacher_state.items()}, state_dir / "teacher.safetensors")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _to_plain(rng_state())},
        state_dir / "optim_rng.pt",
    )
    (state_dir / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it atomically
        old = root / f".checkpoint-{step}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if keep > 0:
        for stale in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """Read ``trainer_state/`` of a checkpoint (only tensors and plain types are unpickled)."""
    state_dir = Path(checkpoint) / STATE_DIR
    if not (state_dir / "state.json").is_file():
        raise FileNotFoundError(f"{checkpoint} has no {STATE_DIR}/state.json: not a resumable vopd checkpoint")
    out: dict[str, Any] = json.loads((state_dir / "state.json").read_text())
    blob = torch.load(state_dir / "optim_rng.pt", map_location="cpu", weights_only=True)
    out.update(blob)
    teacher_file = state_dir / "teacher.safetensors"
    out["teacher"] = load_file(teacher_file) if teacher_file.is_file() else {}
    return out


def restore_rng(saved: dict[str, Any]) -> None:
    state = dict(saved)
    np_state = state["numpy"]
    state["numpy"] = {**np_state, "state": {**np_state["state"]}}
    set_rng_state(state)
