"""What vopd wrote, and what made it: output ownership and cache keys for every resumable output.

A command that writes into a folder (``vopd eval``, ``vopd gap``, ``vopd data toyworld``) first
*claims* it (:func:`claim_output`): a manifest ``.vopd-output.json`` records which command wrote
the folder and the settings that determine its cached answers. Then

- a file vopd would write that is already there, in a folder no manifest (or another command's)
  claims, is someone else's: refused unless ``--overwrite``;
- a rerun whose settings differ from the recorded ones in a key both runs have (another model,
  other weights at the same path, another prompt template, seed, token budget, ...) is refused
  in one line naming the first differing setting, since reusing the cache would grade the old
  answers as the new run's;
- ``--overwrite`` removes every file and folder the command owns there (and the manifest), so the
  next run starts afresh; nothing else in the folder is touched;
- results never go inside a checkpoint folder (pruning would delete them with it).

A model's identity is its path plus :func:`weights_fingerprint` (sizes and sampled bytes of its
weight files), so a checkpoint retrained in place is not mistaken for the old one. Per-row caches
(model proposals) use :func:`content_hash` of each image, so other images under the same ids are
not given the old rows. Importing this module loads no model code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST",
    "OutputError",
    "checkpoint_containing",
    "claim_output",
    "content_hash",
    "public_mode",
    "settings_diff",
    "weights_fingerprint",
]

MANIFEST = ".vopd-output.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLES = 16  # chunks read per weight file: enough to tell two trainings apart, cheap for 10 GB files
_CHUNK = 1 << 16


class OutputError(ValueError):
    """An output folder or cache that cannot be used as asked; the message says what to do."""


def content_hash(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes (images: small enough to read whole)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _sampled_hash(path: Path, h: Any) -> None:
    """Feed the size and ``_SAMPLES`` evenly spaced chunks of ``path`` (header included) into ``h``."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as fh:
        if size <= _SAMPLES * _CHUNK:
            h.update(fh.read())
            return
        for i in range(_SAMPLES):
            fh.seek((size - _CHUNK) * i // (_SAMPLES - 1))
            h.update(fh.read(_CHUNK))


def weights_fingerprint(model: str) -> str:
    """A short fingerprint of the weights at ``model`` (a folder or file); the name itself for
    anything else (a hub id, a ``tiny:`` spec, a served model name).

    Reads each weight file's size and 16 chunks of 64 KiB spread over it, so retraining into the
    same path changes it while a 10 GB checkpoint costs milliseconds.
    """
    path = Path(model).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
        files = [p for p in files if "trainer_state" not in p.parts]  # the optimiser is not the model
    else:
        return f"name:{model}"
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        _sampled_hash(f, h)
    return h.hexdigest()[:16]


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for each key both mappings hold with different values (sorted)."""
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def checkpoint_containing(path: str | Path) -> Path | None:
    """The checkpoint folder ``path`` is (or lies inside), or None: a folder holding
    ``trainer_state/state.json`` or model weights beside a ``config.json``."""
    p = Path(path).resolve()
    for folder in (p, *p.parents):
        if (folder / "trainer_state" / "state.json").is_file():
            return folder
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder
    return None


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def claim_output(
    folder: str | Path,
    *,
    command: str,
    owned: Iterable[str],
    overwrite: bool = False,
    settings: Mapping[str, Any] | None = None,
    say: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Make ``folder`` this command's output (see the module doc); returns the manifest written.

    Args:
        command: e.g. ``"vopd eval"``; a folder another command claimed is refused.
        owned: the names (files or folders) this command writes in ``folder`` (glob patterns
            allowed); these are what ``overwrite`` removes.
        overwrite: remove what the command owns there (and the manifest) before claiming.
        settings: what determines the cached results, flat ``key -> JSON value``; keys the
            recorded run also has must match (new keys are added to the record).

    Raises:
        OutputError: ``folder`` is a file or lies inside a checkpoint; it holds files vopd would
            write that this command did not write; or the settings differ (named).
    """
    root = Path(folder)
    if str(folder).strip() == "":
        raise OutputError("the output folder is empty ('') : name a folder, e.g. --out runs/eval1")
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root} is a file, not a folder: choose another output folder")
    ckpt = checkpoint_containing(root)
    if ckpt is not None:
        raise OutputError(
            f"{root} is inside the checkpoint {ckpt}: results written there would be deleted or mixed up "
            "with it when checkpoints are pruned; choose an output folder outside it"
        )
    names = list(owned)
    present = sorted({p.name for pat in names for p in root.glob(pat)}) if root.is_dir() else []
    manifest = _read_manifest(root) if root.is_dir() else None
    if overwrite:
        removed = [n for n in present if (root / n).exists()]
        for n in removed:
            _remove(root / n)
        if (root / MANIFEST).exists():
            (root / MANIFEST).unlink()
        if removed:
            say(f"--overwrite: removed {', '.join(removed)} from {root}")
        manifest, present = None, []
    if manifest is not None and manifest.get("command") != command:
        if present:
            raise OutputError(
                f"{root} holds the output of {manifest.get('command')!r} ({', '.join(present[:4])}); {command} "
                "would overwrite it: choose another output folder (or pass --overwrite to replace it)"
            )
        manifest = None
    if manifest is None and present:
        raise OutputError(
            f"{root} already holds {', '.join(present[:4])}, which {command} did not write (no readable {MANIFEST}); "
            "choose another output folder, or pass --overwrite to replace them"
        )
    # The record binds only while results it describes are there: a first run that failed before
    # writing any (a typo in --model, a wrong path) must not lock the folder to its settings.
    recorded = dict((manifest or {}).get("settings") or {}) if present else {}
    new = dict(settings or {})
    changed = settings_diff(recorded, new)
    if changed:
        raise OutputError(
            f"{root} holds results made with other settings ({changed[0]}"
            + (f"; and {len(changed) - 1} more" if len(changed) > 1 else "")
            + "): reusing them would report the old answers as this run's. Use another output folder, "
            "or pass --overwrite to start afresh there"
        )
    out = {"command": command, "settings": {**recorded, **new}}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(out, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return out


def public_mode(path: str | Path) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode a plain ``open`` would: 0666
    less the umask, so record files are readable by the group/others as the user's umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def public_weight_modes(folder: str | Path) -> None:
    """`public_mode` for every ``*.safetensors`` under ``folder``: the safetensors writer makes them 0600,
    so a checkpoint or export would be unreadable to the group/others (a server under another account)
    while its config beside it is readable."""
    for path in Path(folder).rglob("*.safetensors"):
        public_mode(path)
