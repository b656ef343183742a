"""Where ``vopd data build`` keeps its work: the stage caches, and the guard that never overwrites others' files.

Everything lives beside the output ``OUT.jsonl``: ``OUT.build/`` holds ``build.json`` (what wrote
the folder, and every stage cache's provenance) and one append-only JSONL per stage and
fingerprint (``writer-<fp>.jsonl``, ``filter-<fp>.jsonl``, ``regions-<fp>.jsonl``); the summary
is ``OUT.summary.json`` and the gallery ``OUT.gallery.png``. A cache row is appended (and
fsynced) as soon as its reply arrives, so a killed build loses at most the requests in flight.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vopd.jsonl import append_record, end_with_newline, read_records

__all__ = ["BuildFiles", "StageCache", "atomic_write_text"]

WRITTEN_BY = "vopd data build"


class BuildFiles:
    """The paths of one build and the check that they are ours to write."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.folder = self.out.with_name(self.out.stem + ".build")
        self.manifest = self.folder / "build.json"
        self.summary = self.out.with_name(self.out.stem + ".summary.json")
        self.gallery = self.out.with_name(self.out.stem + ".gallery.png")

    def claim(self, inputs: list[Path]) -> None:
        """Create the cache folder, refusing to touch any file that an earlier ``vopd data build`` did not write.

        Raises:
            ValueError: an output path is an input, or exists without this build's manifest.
        """
        mine = {p.resolve() for p in (self.out, self.summary, self.gallery, self.folder)}
        clash = [p for p in inputs if p.resolve() in mine]
        if clash:
            raise ValueError(f"--out {self.out} would overwrite the input {clash[0]}; write to another file")
        ours = self._ours()
        if not ours:
            present = [p for p in (self.out, self.summary, self.gallery) if p.exists()]
            if self.folder.exists() and any(self.folder.iterdir()):
                present.append(self.folder)
            if present:
                raise ValueError(
                    f"{present[0]} exists and was not written by {WRITTEN_BY} (no {self.manifest}); "
                    "choose another --out or move it away"
                )
        self.folder.mkdir(parents=True, exist_ok=True)
        if not ours:
            atomic_write_text(self.manifest, json.dumps({"written_by": WRITTEN_BY, "out": self.out.name, "stages": {}}))

    def _ours(self) -> bool:
        try:
            data = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("written_by") == WRITTEN_BY and data.get("out") == self.out.name

    def record_stage(self, name: str, fp: str, made_by: dict[str, Any]) -> None:
        """Note in the manifest what made the cache ``<name>-<fp>.jsonl``."""
        data = json.loads(self.manifest.read_text(encoding="utf-8"))
        data.setdefault("stages", {})[f"{name}-{fp}.jsonl"] = made_by
        atomic_write_text(self.manifest, json.dumps(data, indent=1, ensure_ascii=False))


class StageCache:
    """One stage's replies, one JSON row per item ``key``, in ``<folder>/<name>-<fp>.jsonl``.

    Rows are read once at start (a row torn by a kill is skipped with a warning and its item
    asked again) and appended as replies arrive; a later row for a key wins.
    """

    def __init__(self, files: BuildFiles, name: str, fp: str, made_by: dict[str, Any]):
        self.path = files.folder / f"{name}-{fp}.jsonl"
        self.fp = fp
        files.record_stage(name, fp, made_by)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self.rows = {row["key"]: row for row in read_records(self.path, ("key", "fp")) if row["fp"] == fp}
            end_with_newline(self.path)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict[str, Any]) -> None:
        row = {"key": key, "fp": self.fp, **row}
        append_record(self.path, row)
        self.rows[key] = row


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (a kill leaves the old file or the new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
