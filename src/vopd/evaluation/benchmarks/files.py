"""Reading the file formats benchmarks ship in: parquet, TSV/CSV, JSON and JSONL.

Rows come back as plain dicts. Images stay encoded (bytes, a path, a ``data:`` URL) until an
item is asked for its pixels, so loading 20k rows costs memory for their bytes only.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vopd.images import ImageSource, decode_base64_image

__all__ = [
    "HUB_EXTRA",
    "HUB_PREFIX",
    "BenchmarkFormatError",
    "Rows",
    "choice_prompt",
    "image_source",
    "read_rows",
    "require_columns",
    "select_files",
]

#: ``hf:<dataset id>[:<split>]`` loads through the optional ``datasets`` package.
HUB_PREFIX = "hf:"

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class BenchmarkFormatError(ValueError):
    """A benchmark file does not have the expected layout; the message names file and field."""


class Rows(list):
    """Table rows (dicts) plus ``files`` (each file read -> its row count) and ``notes``
    (files present but not read, and why). Each row carries ``_where`` (``file:row``, for
    errors), ``_source`` (its file relative to the path given, without suffix: part of the
    prediction key) and ``_base`` (the folder relative image paths start from)."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, int] = {}
        self.notes: list[str] = []


def select_files(
    path: Path,
    suffixes: Iterable[str],
    *,
    include: Callable[[Path], bool] | None = None,
    why_excluded: str = "",
) -> tuple[list[Path], list[str]]:
    """The files to read under ``path``, and notes on those left out.

    A file given directly is read as it is. In a folder (searched recursively), the same table
    shipped in several formats (``hr_bench_4k.tsv`` and ``.parquet``, ``mmstar.parquet`` and
    ``MMStar.tsv``) is read once, in the first format of ``suffixes``; ``include`` (called with the
    path relative to ``path``) keeps only the files of the configuration asked for.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    if path.is_file():
        return [path], []
    if not path.exists():
        raise FileNotFoundError(f"benchmark data not found: {path}")
    # hidden folders (a hub download's .cache/, .git/) never hold the benchmark's tables
    found = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(suffixes)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    notes: list[str] = []
    if include is not None:
        kept = [p for p in found if include(p.relative_to(path))]
        left = [p.relative_to(path).as_posix() for p in found if p not in kept]
        if left:
            notes.append(f"not read ({why_excluded or 'another configuration'}): {', '.join(left)}")
        found = kept
    chosen: dict[tuple[str, str], Path] = {}
    for p in found:
        key = (p.parent.as_posix(), _stem(p, suffixes).lower())
        if key not in chosen or _rank(p, suffixes) < _rank(chosen[key], suffixes):
            chosen[key] = p
    for p in found:
        best = chosen[(p.parent.as_posix(), _stem(p, suffixes).lower())]
        if best != p:
            notes.append(
                f"not read (same table as {best.relative_to(path).as_posix()}): {p.relative_to(path).as_posix()}"
            )
    files = sorted(chosen.values())
    if not files:
        raise BenchmarkFormatError(
            f"{path}: no {'/'.join(suffixes)} files inside" + (f" ({notes[0]})" if notes else "")
        )
    return files, notes


def _stem(path: Path, suffixes: tuple[str, ...]) -> str:
    name = path.name
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _rank(path: Path, suffixes: tuple[str, ...]) -> int:
    return next(i for i, s in enumerate(suffixes) if path.name.lower().endswith(s))


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(f"reading {path} needs pyarrow: pip install 'vision-opd[parquet]'") from err
    return pq.read_table(path).to_pylist()


def _read_delimited(path: Path, delimiter: str) -> list[dict[str, Any]]:
    # Base64 images in HR-Bench TSVs are far longer than csv's default field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # JSON lines, whatever the suffix (POPE ships coco_pope_*.json as JSON lines).
        if path.suffix.lower() == ".jsonl" or err.msg == "Extra data":
            return _read_json_lines(path, text)
        raise BenchmarkFormatError(f"{path}: invalid JSON ({err})") from err
    if isinstance(data, dict):
        for key in ("data", "questions", "items"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    if not isinstance(data, list):
        raise BenchmarkFormatError(f"{path}: expected a JSON list of records")
    return data


def _read_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BenchmarkFormatError(f"{path}:{n}: invalid JSON line ({err})") from err
            if not isinstance(row, dict):
                raise BenchmarkFormatError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
    return rows


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


def read_rows(
    source: str | Path,
    suffixes: Iterable[str] = (".parquet", ".tsv"),
    *,
    include: Callable[[Path], bool] | None = None,
    why_excluded: str = "",
) -> Rows:
    """Rows of a file, of the selected files in a folder (see :func:`select_files`), or of a
    hub dataset (``hf:<id>[:split]``)."""
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        return _read_hub(source[len(HUB_PREFIX) :])
    path = Path(source)
    files, notes = select_files(path, suffixes, include=include, why_excluded=why_excluded)
    rows = Rows()
    rows.notes.extend(notes)
    for file in files:
        name = file.name if file == path else file.relative_to(path).as_posix()
        source_name = _stem(Path(name), tuple(s.lower() for s in suffixes))
        file_rows = read_file(file)
        for n, row in enumerate(file_rows):
            if not isinstance(row, dict):
                raise BenchmarkFormatError(f"{file}:{n}: expected a record (object), got {type(row).__name__}")
            row["_where"] = f"{file}:{n}"
            row["_source"] = source_name
            row["_base"] = file.parent
            rows.append(row)
        rows.files[name] = len(file_rows)
    return rows


#: The extra that installs what ``hf:`` ids need.
HUB_EXTRA = "hf"


def _read_hub(spec: str) -> Rows:
    """Load ``<id>[:<split>]`` with the optional ``datasets`` package (needs internet)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"loading '{HUB_PREFIX}{spec}' needs the optional 'datasets' package: "
            f"pip install 'vision-opd[{HUB_EXTRA}]' (and internet); or download the files and pass a local folder"
        ) from err
    dataset_id, _, split = spec.partition(":")
    split = split or "test"
    ds = datasets.load_dataset(dataset_id, split=split)
    rows = Rows()
    for n, row in enumerate(ds):
        row = dict(row)
        row["_where"] = f"{dataset_id}[{split}][{n}]"
        row["_source"] = split
        row["_base"] = Path.cwd()
        rows.append(row)
    rows.files[f"{HUB_PREFIX}{dataset_id}:{split}"] = len(rows)
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


def choice_prompt(
    question: str, options: list[str], *, style: str = "paren", instruction: str = CHOICE_INSTRUCTION
) -> str:
    """Question, one option per line (``(A) x`` or ``A. x``), then the instruction."""
    letters = "ABCDEFGH"
    if style == "paren":
        lines = [f"({letters[i]}) {opt}" for i, opt in enumerate(options)]
    else:
        lines = [f"{letters[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join([question.strip(), *lines, instruction])


def strip_option_prefix(option: str) -> str:
    """``"(A) red"`` / ``"A. red"`` / ``"A: red"`` / ``"（A）红色"`` / ``"A、红"`` -> the option text.

    A prefix needs brackets or punctuation after the letter: ``"A cat"`` and ``"Apple"`` stay.
    """
    text = str(option)
    m = re.match(r"^\s*(?:[\(（]\s*[A-Ha-h]\s*[\)）]|[A-Ha-h]\s*[\.:：、．)）])\s*", text)
    return text[m.end() :].strip() if m else text.strip()


def letter(value: Any) -> str:
    """``"(b)"`` / ``"B"`` / ``" b. "`` -> ``"B"``."""
    return str(value).strip().strip("().").strip().upper()[:1]


#: The prompt every benchmark uses unless told otherwise: the paper's own eval prompt.
DEFAULT_PROMPT = "paper"


def check_prompt(benchmark: str, prompt: str, choices: Iterable[str]) -> None:
    """Raise naming the prompt templates ``benchmark`` has."""
    choices = tuple(choices)
    if prompt not in choices:
        raise ValueError(f"{benchmark}: unknown prompt template {prompt!r}; choose from {', '.join(choices)}")


def rows_base(row: dict[str, Any], image_root: str | Path | None) -> Path:
    """Where relative image paths of ``row`` start: ``image_root`` if given, else the row's folder."""
    return Path(image_root) if image_root else Path(row.get("_base", "."))
