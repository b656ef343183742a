"""Reading the file formats benchmarks ship in: parquet, TSV/CSV, JSON and JSONL.

Rows come back as plain dicts. Images stay encoded (bytes, a path, a ``data:`` URL) until an
item is asked for its pixels, so loading 20k rows costs memory for their bytes only.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vopd.images import ImageSource, decode_base64_image

__all__ = [
    "HUB_PREFIX",
    "BenchmarkFormatError",
    "choice_prompt",
    "image_source",
    "read_rows",
    "require_columns",
    "table_files",
]

#: ``hf:<dataset id>[:<split>]`` loads through the optional ``datasets`` package.
HUB_PREFIX = "hf:"

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class BenchmarkFormatError(ValueError):
    """A benchmark file does not have the expected layout; the message names file and field."""


def table_files(path: Path, suffixes: Iterable[str]) -> list[Path]:
    """``path`` itself, or every file under it (recursively, sorted) with one of ``suffixes``."""
    suffixes = tuple(suffixes)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"benchmark data not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise BenchmarkFormatError(f"{path}: no {'/'.join(suffixes)} files inside")
    return files


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            f"reading {path} needs pyarrow: pip install 'vision-opd[parquet]'"
        ) from err
    return pq.read_table(path).to_pylist()


def _read_delimited(path: Path, delimiter: str) -> list[dict[str, Any]]:
    # Base64 images in HR-Bench TSVs are far longer than csv's default field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise BenchmarkFormatError(f"{path}:{n}: invalid JSON ({err})") from err
        return rows
    data = json.loads(text)
    if isinstance(data, dict):
        for key in ("data", "questions", "items"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list of records")
    return data


def read_file(path: Path) -> list[dict[str, Any]]:
    """Rows of one parquet / TSV / CSV / JSON / JSONL file."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _read_parquet(path)
    if name.endswith(".tsv"):
        return _read_delimited(path, "\t")
    if name.endswith(".csv"):
        return _read_delimited(path, ",")
    if name.endswith((".json", ".jsonl")):
        return _read_json(path)
    raise BenchmarkFormatError(f"{path}: unsupported file type; expected parquet, tsv, csv, json or jsonl")


def read_rows(source: str | Path, suffixes: Iterable[str] = (".parquet", ".tsv")) -> tuple[list[dict[str, Any]], Path]:
    """Rows of a file, of all matching files in a folder, or of a hub dataset.

    Returns ``(rows, base_dir)``; ``base_dir`` resolves relative image paths. Each row gets a
    ``_where`` entry (``file:row``) for error messages.
    """
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        return _read_hub(source[len(HUB_PREFIX) :]), Path.cwd()
    path = Path(source)
    rows: list[dict[str, Any]] = []
    for file in table_files(path, suffixes):
        for n, row in enumerate(read_file(file)):
            row["_where"] = f"{file}:{n}"
            rows.append(row)
    return rows, path if path.is_dir() else path.parent


def _read_hub(spec: str) -> list[dict[str, Any]]:
    """Load ``<id>[:<split>]`` with the optional ``datasets`` package (needs internet)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"loading '{HUB_PREFIX}{spec}' needs the 'datasets' package (pip install datasets) "
            "and internet; or download the files and pass a local folder"
        ) from err
    dataset_id, _, split = spec.partition(":")
    ds = datasets.load_dataset(dataset_id, split=split or "test")
    rows = []
    for n, row in enumerate(ds):
        row = dict(row)
        row["_where"] = f"{dataset_id}[{n}]"
        rows.append(row)
    return rows


def require_columns(row: dict[str, Any], columns: Iterable[str], what: str) -> None:
    """Raise naming the missing columns, the columns present and the file/row."""
    missing = [c for c in columns if c not in row]
    if missing:
        present = sorted(k for k in row if not k.startswith("_"))
        raise BenchmarkFormatError(
            f"{row.get('_where', '?')}: {what} rows need columns {missing}; found {present}. "
            "Check that you downloaded the right file for this benchmark."
        )


_PATHLIKE = re.compile(r"^[\w\-. /\\:]+\.(?:jpe?g|png|webp|bmp|gif|tiff?)$", re.IGNORECASE)


def image_source(value: Any, base_dir: Path, where: str) -> ImageSource:
    """Turn a table cell into something :func:`vopd.images.load_image` opens.

    Accepts parquet image structs (``{"bytes", "path"}``), raw bytes, PIL images, ``data:``
    URLs, paths relative to ``base_dir`` and bare base64 text (HR-Bench, MMStar TSVs).
    """
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return image_source(value["path"], base_dir, where)
        raise BenchmarkFormatError(f"{where}: image struct has neither bytes nor path")
    if isinstance(value, list) and value:  # VisualProbe and others store a list of images
        return image_source(value[0], base_dir, where)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        if value.startswith("data:image"):
            return value
        if _PATHLIKE.match(value.strip()) or (len(value) < 255 and _exists(base_dir / value)):
            path = Path(value.strip())
            return path if path.is_absolute() else base_dir / path
        return decode_base64_image(value, where=where)
    if hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image from `datasets`
        return value
    raise BenchmarkFormatError(f"{where}: cannot read an image from a {type(value).__name__} cell")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a base64 string too long to be a file name
        return False


def choice_prompt(question: str, options: list[str], *, style: str = "paren", instruction: str = CHOICE_INSTRUCTION) -> str:
    """Question, one option per line (``(A) x`` or ``A. x``), then the instruction."""
    letters = "ABCDEFGH"
    if style == "paren":
        lines = [f"({letters[i]}) {opt}" for i, opt in enumerate(options)]
    else:
        lines = [f"{letters[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join([question.strip(), *lines, instruction])


def strip_option_prefix(option: str) -> str:
    """``"(A) red"`` / ``"A. red"`` / ``"A: red"`` -> ``"red"``."""
    return re.sub(r"^\s*\(?[A-Ha-h]\)?\s*[\.:：)]?\s+", "", str(option), count=1).strip()


def letter(value: Any) -> str:
    """``"(b)"`` / ``"B"`` / ``" b. "`` -> ``"B"``."""
    return str(value).strip().strip("().").strip().upper()[:1]
