"""JSONL files that survive a kill mid-write: append-only logs and whole files written at once.

Logs (predictions, judge verdicts, proposals, training metrics) grow one record at a time
(:func:`append_record`). A run killed while writing leaves a last line without its newline, or
half a record. Readers close such a line before appending (:func:`end_with_newline`) and skip
lines that are not JSON objects with the fields they need, with one warning naming file and
line (:func:`read_records`), so a resume never dies on its own log.

A file written whole (a record file, a trimmed log) goes to a temporary file that is then
renamed into place (:func:`write_rows`): a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vopd.outputs import public_mode

__all__ = ["append_record", "end_with_newline", "read_records", "write_rows"]

log = logging.getLogger(__name__)


def end_with_newline(path: Path) -> None:
    """Close a last line that lacks its newline, so the next append starts a line of its own."""
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def read_records(path: Path, required: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Yield each line of ``path`` that is a JSON object holding every ``required`` key.

    Other lines (half-written, ``{}``, a list, bad bytes) are skipped with a warning that
    names the file and line; the caller redoes those items.
    """
    required = tuple(required)
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                log.warning("%s:%d: unreadable line skipped (interrupted write?)", path, n)
                continue
            if not isinstance(rec, dict) or any(k not in rec for k in required):
                log.warning("%s:%d: line skipped: not a record with %s", path, n, ", ".join(required))
                continue
            yield rec


def append_record(path: Path, record: dict[str, Any], *, fsync: bool = True) -> None:
    """Append one record as a line, flushed (and fsynced) before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_rows(rows: Iterable[dict[str, Any] | str], path: str | Path) -> Path:
    """Write JSON objects (or already-encoded lines), one per line, atomically; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        public_mode(tmp)  # mkstemp makes 0600; the file is as readable as any file the user writes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
