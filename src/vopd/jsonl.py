"""Append-only JSONL logs that survive a kill mid-write (predictions, judge verdicts, proposals).

A run killed while writing leaves a last line without its newline, or half a record. Readers
close such a line before appending (:func:`end_with_newline`) and skip lines that are not
JSON objects with the fields they need, with one warning naming file and line
(:func:`read_records`), so a resume never dies on its own log.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["append_record", "end_with_newline", "read_records"]

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
