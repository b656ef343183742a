"""Training and evaluation records: the :class:`Sample` schema, evidence boxes, JSONL I/O.

A sample is an image, a question (with optional multiple-choice options and answer) and the
evidence boxes that decide the answer. The teacher sees a crop around the boxes; the student
sees the full image (see :mod:`vopd.views`). Our JSONL format is documented in ``docs/data.md``;
:func:`load_records` also reads other row layouts registered with :func:`register_layout`
(importing :mod:`vopd.datasets` registers the released Vision-OPD-6K layout).

Paths inside a record file are relative to that file's folder. They are resolved when records
are loaded and made relative again when records are written, so a dataset folder can move.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from vopd.images import ImageError, check_model_shape, image_size, load_image
from vopd.jsonl import write_rows

__all__ = [
    "Box",
    "Issue",
    "LoadedRecords",
    "OnError",
    "OutOfBounds",
    "RecordError",
    "Sample",
    "load_records",
    "no_usable_records",
    "resolve_record_path",
    "safe_file_name",
    "validate_sample",
    "write_records",
]

OutOfBounds = Literal["clip", "reject"]
OnError = Literal["raise", "skip"]
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")

# Keys of our own JSONL rows; anything else is an error so typos ("questoin") do not pass.
_REQUIRED_KEYS = ("image", "question")
_OPTIONAL_KEYS = (
    "id",
    "options",
    "answer",
    "boxes",
    "box_format",
    "box_normalized",
    "category",
    "teacher_image",
    "meta",
)


class RecordError(ValueError):
    """A record is malformed. The message starts with ``file:row``, then the field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = message
        self.file = None if file is None else str(file)
        self.row = row
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.file or ""
        if self.row is not None:
            where = f"{where}:{self.row}" if where else f"row {self.row}"
        head = f"{where}: " if where else ""
        fld = f"field '{self.field}': " if self.field else ""
        return f"{head}{fld}{self.reason}"

    def located(self, *, file: str | Path | None = None, row: int | None = None) -> RecordError:
        """Return a copy of this error with the file and row filled in where missing."""
        return RecordError(
            self.reason,
            file=self.file if self.file is not None else file,
            row=self.row if self.row is not None else row,
            field=self.field,
        )


# ----------------------------------------------------------------------------- boxes --


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates of the upright image: ``x1 <= x2``, ``y1 <= y2``.

    Pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``, so a box ``(0, 0, W, H)`` is the whole
    image and its area is in pixels.
    """

    x1: float
    y1: float
    x2: float
    y2: float

    @classmethod
    def from_format(
        cls,
        values: Sequence[float],
        fmt: str = "xyxy",
        *,
        normalized: bool = False,
        image_size: tuple[int, int] | None = None,
    ) -> Box:
        """Build a box from four numbers.

        Args:
            values: ``[x1, y1, x2, y2]`` (``"xyxy"``), ``[x, y, w, h]`` with ``(x, y)`` the
                top-left corner (``"xywh"``, COCO) or ``[cx, cy, w, h]`` (``"cxcywh"``, YOLO).
            normalized: the values are fractions of the image width (x, w) and height (y, h);
                needs ``image_size``.
            image_size: ``(width, height)`` of the image.

        Raises:
            RecordError: wrong count, non-numbers, an unknown format, or normalized values
                that look like pixels. The field is ``box``; callers relocate it.
        """
        if fmt not in BOX_FORMATS:
            raise RecordError(f"unknown box format '{fmt}'; use one of {list(BOX_FORMATS)}", field="box_format")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != 4:
            raise RecordError(f"expected 4 numbers in {fmt} order, got {values!r}", field="box")
        nums: list[float] = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RecordError(f"expected 4 finite numbers, got {list(values)!r}", field="box")
            nums.append(float(v))
        a, b, c, d = nums
        if fmt == "xywh":
            a, b, c, d = a, b, a + c, b + d
        elif fmt == "cxcywh":
            a, b, c, d = a - c / 2, b - d / 2, a + c / 2, b + d / 2
        if normalized:
            if image_size is None:
                raise RecordError("normalized box needs the image size", field="box")
            if max(abs(v) for v in nums) > 2.0:
                raise RecordError(
                    f"box_normalized is true but {list(values)!r} look like pixel coordinates; "
                    "set box_normalized to false",
                    field="box",
                )
            w, h = image_size
            a, b, c, d = a * w, b * h, c * w, d * h
        return cls(a, b, c, d)

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        """Area in square pixels; 0 for an inverted or degenerate box."""
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    def clip(self, image_size: tuple[int, int]) -> Box:
        """Intersect with the image ``(width, height)``; may return a zero-area box."""
        w, h = float(image_size[0]), float(image_size[1])
        x1, x2 = min(max(self.x1, 0.0), w), min(max(self.x2, 0.0), w)
        y1, y2 = min(max(self.y1, 0.0), h), min(max(self.y2, 0.0), h)
        return Box(x1, y1, max(x1, x2), max(y1, y2))

    def inside(self, image_size: tuple[int, int]) -> bool:
        w, h = image_size
        return self.x1 >= 0 and self.y1 >= 0 and self.x2 <= w and self.y2 <= h

    @staticmethod
    def union(boxes: Iterable[Box]) -> Box:
        """The smallest box containing all ``boxes`` (at least one)."""
        boxes = list(boxes)
        if not boxes:
            raise ValueError("Box.union needs at least one box")
        return Box(
            min(b.x1 for b in boxes), min(b.y1 for b in boxes), max(b.x2 for b in boxes), max(b.y2 for b in boxes)
        )

    def as_list(self) -> list[float]:
        """``[x1, y1, x2, y2]`` as plain floats (JSON-friendly)."""
        return [self.x1, self.y1, self.x2, self.y2]


# --------------------------------------------------------------------------- samples --


@dataclass
class Sample:
    """One question about one image.

    Attributes:
        id: unique within a dataset; used in every error message about the sample.
        image: the clean full image: a path (absolute once loaded), encoded bytes or a PIL image.
        question: the question text, without options, hint or answer instruction.
        options: multiple-choice options without their letters (``["red", "blue"]``).
        answer: the reference answer (an option letter for multiple choice); unused by the loss.
        boxes: evidence boxes in pixels of the upright image. May be empty for evaluation
            data; training needs boxes or a ``teacher_image``.
        teacher_image: a ready-made teacher crop (e.g. Vision-OPD-6K ``teacher_images``).
        category: a free label for per-category metrics.
        meta: anything else (JSON-serialisable if the sample is written).
    """

    id: str
    image: str | bytes | Image.Image
    question: str
    options: list[str] | None = None
    answer: str | None = None
    boxes: list[Box] = field(default_factory=list)
    teacher_image: str | bytes | Image.Image | None = None
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


_MAX_OPTIONS = 26  # option letters A-Z


def validate_sample(
    sample: Sample,
    image_size: tuple[int, int] | None,
    *,
    out_of_bounds: OutOfBounds = "clip",
) -> tuple[Sample, list[str]]:
    """Check a sample and return it (boxes possibly clipped) with a list of warnings.

    Args:
        image_size: ``(width, height)`` of the upright image, or ``None`` to skip the
            bounds checks (they run again when views are built).
        out_of_bounds: ``"clip"`` clips boxes that stick out of the image (one warning
            each); ``"reject"`` raises instead. Boxes entirely outside are always rejected.

    Raises:
        RecordError: naming the field (``question``, ``options[2]``, ``boxes[0]``, ...).
    """
    if out_of_bounds not in ("clip", "reject"):
        raise ValueError(f"out_of_bounds must be 'clip' or 'reject', got {out_of_bounds!r}")
    if not isinstance(sample.id, str) or not sample.id:
        raise RecordError("must be a non-empty string", field="id")
    if not isinstance(sample.question, str) or not sample.question.strip():
        raise RecordError("must be a non-empty string", field="question")
    _check_options(sample.options, sample.answer)
    if sample.answer is not None and not isinstance(sample.answer, str):
        raise RecordError(f"must be a string, got {type(sample.answer).__name__}", field="answer")
    boxes, warnings = _check_boxes(sample.boxes, image_size, out_of_bounds)
    return replace(sample, boxes=boxes), warnings


def _check_options(options: list[str] | None, answer: str | None) -> None:
    if options is None:
        return
    if not isinstance(options, list) or not 2 <= len(options) <= _MAX_OPTIONS:
        raise RecordError(f"must be a list of 2 to {_MAX_OPTIONS} strings, or omitted", field="options")
    for i, opt in enumerate(options):
        if not isinstance(opt, str) or not opt.strip():
            raise RecordError("must be a non-empty string", field=f"options[{i}]")
    if isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
        letter = answer.upper()
        last = chr(ord("A") + len(options) - 1)
        if not "A" <= letter <= last:
            raise RecordError(f"letter {answer!r} is not among the options A-{last}", field="answer")


def _check_boxes(
    boxes: Sequence[Box], size: tuple[int, int] | None, out_of_bounds: OutOfBounds
) -> tuple[list[Box], list[str]]:
    if not isinstance(boxes, (list, tuple)):
        raise RecordError("must be a list of boxes", field="boxes")
    out: list[Box] = []
    warnings: list[str] = []
    for i, box in enumerate(boxes):
        name = f"boxes[{i}]"
        if not isinstance(box, Box):
            raise RecordError(f"expected a Box, got {type(box).__name__}", field=name)
        if not all(math.isfinite(v) for v in box.as_list()):
            raise RecordError(f"{box.as_list()} has a non-finite coordinate", field=name)
        if box.width <= 0 or box.height <= 0:
            raise RecordError(
                f"{box.as_list()} has zero or negative area (need x1 < x2 and y1 < y2; "
                "if the numbers are [x, y, w, h] set box_format to 'xywh')",
                field=name,
            )
        if size is not None and not box.inside(size):
            clipped = box.clip(size)
            if clipped.area <= 0:
                raise RecordError(f"{box.as_list()} lies entirely outside the {size[0]}x{size[1]} image", field=name)
            if out_of_bounds == "reject":
                raise RecordError(
                    f"{box.as_list()} extends outside the {size[0]}x{size[1]} image (out_of_bounds='reject')",
                    field=name,
                )
            warnings.append(f"{name}: clipped {box.as_list()} to {clipped.as_list()}")
            box = clipped
        if box.width < 1 or box.height < 1:
            raise RecordError(
                f"{box.as_list()} is smaller than one pixel; if the numbers are fractions of "
                "the image size set box_normalized to true",
                field=name,
            )
        out.append(box)
    return out, warnings


# ------------------------------------------------------------------------ JSONL read --


@dataclass(frozen=True)
class Issue:
    """A skipped row or a clipped box, located at ``file:row``."""

    file: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.reason}"


@dataclass
class LoadedRecords:
    """Samples read from one file, plus what was skipped or clipped on the way.

    Iterating, ``len`` and indexing go to ``samples``.
    """

    samples: list[Sample]
    source: Path
    layout: str  # "vopd" or a registered layout ("visionopd6k")
    skipped: list[Issue] = field(default_factory=list)
    clipped: list[Issue] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # the file row of each sample (for file:row messages)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def summary(self) -> str:
        """One line: counts of loaded, skipped and clipped rows."""
        return (
            f"{self.source}: {len(self.samples)} samples ({self.layout} layout), "
            f"{len(self.skipped)} rows skipped, {len(self.clipped)} boxes clipped"
        )

    @property
    def report(self) -> str:
        """The summary, then one ``file:row: reason`` line per skipped row and clipped box
        (the first ``20`` of each kind, then a count of the rest)."""
        lines = [self.summary()]
        for title, issues in (("skipped", self.skipped), ("clipped", self.clipped)):
            lines += [f"  {title}: {issue}" for issue in issues[:20]]
            if len(issues) > 20:
                lines.append(f"  ... and {len(issues) - 20} more {title}")
        return "\n".join(lines)


def resolve_record_path(value: Any, base: Path, field_name: str) -> str:
    """Turn a path from a record into an absolute path string (data URLs pass through).

    Raises :class:`RecordError` naming ``field_name`` for non-strings and URLs.
    """
    if not isinstance(value, str) or not value.strip():
        raise RecordError("must be a non-empty path string", field=field_name)
    if value.startswith("data:image"):
        return value
    if re.match(r"^[a-z][a-z0-9+.-]*://", value, re.IGNORECASE):
        raise RecordError(
            f"URLs are not supported ({value!r}); download the images and use local paths", field=field_name
        )
    path = Path(value).expanduser()
    try:
        return str(path if path.is_absolute() else (base / path).resolve())
    except (RuntimeError, OSError) as err:  # a symlink loop: RuntimeError before Python 3.13, OSError after
        raise RecordError(f"{value!r} cannot be resolved ({err})", field=field_name) from None


def _find_record_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("train.jsonl", "records.jsonl"):
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.glob("*.jsonl"))
        if len(found) == 1:
            return path / found[0]
        raise RecordError(f"folder has {len(found)} .jsonl files {found}; pass the file itself", file=path)
    raise RecordError("no such file or folder", file=path)


def _read_rows(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines as bytes: decoding is per row (`_decode_row`), so one bad byte is one bad row."""
    try:
        fh = path.open("rb")
    except OSError as err:
        raise RecordError(f"cannot be read ({err.strerror or err})", file=path) from None
    with fh:
        for row, line in enumerate(fh, start=1):
            if row == 1 and line.startswith(b"\xef\xbb\xbf"):  # tolerate a BOM on row 1
                line = line[3:]
            if line.strip():
                yield row, line


def _decode_row(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(
            f"not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1}); re-save the file as UTF-8"
        ) from None


def _parse_json(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object per line, got {type(obj).__name__}")
    return obj


def parse_vopd_row(obj: Mapping[str, Any], base: Path, row: int, stem: str) -> Sample:
    """Map one row of our JSONL format to a :class:`Sample` (paths resolved against ``base``).

    Normalized boxes read the image header to learn the size.
    """
    unknown = sorted(set(obj) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        raise RecordError(
            f"unknown field; known fields are {list(_REQUIRED_KEYS + _OPTIONAL_KEYS)} (put extra data under 'meta')",
            field=unknown[0],
        )
    for key in _REQUIRED_KEYS:
        if key not in obj:
            raise RecordError("missing required field", field=key)
    image = resolve_record_path(obj["image"], base, "image")
    teacher = obj.get("teacher_image")
    teacher = None if teacher is None else resolve_record_path(teacher, base, "teacher_image")
    fmt = obj.get("box_format", "xyxy")
    normalized = obj.get("box_normalized", False)
    if not isinstance(normalized, bool):
        raise RecordError("must be true or false", field="box_normalized")
    try:
        size = image_size(image) if normalized else None
    except ImageError as err:  # normalized boxes need the size: the image must be readable
        raise RecordError(str(err), field="image") from None
    raw_boxes = obj.get("boxes") or []
    if not isinstance(raw_boxes, list):
        raise RecordError("must be a list of [4 numbers] lists", field="boxes")
    boxes = []
    for i, values in enumerate(raw_boxes):
        try:
            boxes.append(Box.from_format(values, fmt, normalized=normalized, image_size=size))
        except RecordError as err:
            fld = "box_format" if err.field == "box_format" else f"boxes[{i}]"
            raise RecordError(err.reason, field=fld) from None
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise RecordError("must be a JSON object", field="meta")
    for key in ("id", "answer", "category"):
        if obj.get(key) is not None and not isinstance(obj[key], (str, int)):
            raise RecordError("must be a string", field=key)
    return Sample(
        id=str(obj["id"]) if obj.get("id") is not None else f"{stem}-{row}",
        image=image,
        question=obj["question"],
        options=obj.get("options"),
        answer=None if obj.get("answer") is None else str(obj["answer"]),
        boxes=boxes,
        teacher_image=teacher,
        category=None if obj.get("category") is None else str(obj["category"]),
        meta=dict(meta),
    )


def load_records(
    path: str | Path,
    *,
    out_of_bounds: OutOfBounds = "clip",
    on_error: OnError = "raise",
    check_images: bool = False,
    allow_empty: bool = False,
) -> LoadedRecords:
    """Read a JSONL record file (our format or a registered layout such as Vision-OPD-6K, detected on row 1).

    Args:
        path: a ``.jsonl`` file, or a folder holding ``train.jsonl``, ``records.jsonl`` or a
            single ``.jsonl`` file.
        out_of_bounds: ``"clip"`` boxes that stick out of the image (counted in
            ``clipped``) or ``"reject"`` the row. Needs the image size, so it only applies
            with ``check_images=True`` (or normalized boxes); otherwise the views clamp.
        on_error: ``"raise"`` the first :class:`RecordError`, or ``"skip"`` bad rows and list
            them in ``skipped`` (each with ``file:row`` and the reason).
        check_images: open every image header (fast, no pixel decoding) to check that it
            exists, is readable, and to validate boxes against its size; also checks that
            ``teacher_image`` files exist.
        allow_empty: return (with everything in ``skipped``) instead of raising when no row
            is usable; for reports such as ``vopd data check``.

    Raises:
        RecordError: ``file:row: field 'x': reason``, for the first bad row if ``on_error``
            is ``"raise"``; also when the file has no usable rows at all.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    file = _find_record_file(Path(path))
    base = file.parent.resolve()
    layout: str | None = None
    result = LoadedRecords(samples=[], source=file, layout="vopd")
    seen: dict[str, int] = {}
    for row, line in _read_rows(file):
        try:
            obj = _parse_json(_decode_row(line))
            if layout is None:
                layout = _detect_layout(obj)
            sample = _parse_row(obj, layout, base, row, file.stem)
            if sample.id in seen:
                raise RecordError(f"duplicate id {sample.id!r} (first on row {seen[sample.id]})", field="id")
            size = _checked_size(sample, row) if check_images else None
            sample, warnings = validate_sample(sample, size, out_of_bounds=out_of_bounds)
        except RecordError as err:
            err = err.located(file=file, row=row)
            if on_error == "raise":
                raise err from None
            result.skipped.append(
                Issue(str(file), row, str(err.reason if err.field is None else f"{err.field}: {err.reason}"))
            )
            continue
        seen[sample.id] = row
        result.clipped.extend(Issue(str(file), row, w) for w in warnings)
        result.samples.append(sample)
        result.rows.append(row)
    result.layout = layout or "vopd"
    if not result.samples and not allow_empty:
        raise no_usable_records(file, result.skipped)
    return result


def no_usable_records(file: str | Path, skipped: Sequence[Issue]) -> RecordError:
    """The error for a record file without a usable row (`vopd train` and `vopd data check` alike)."""
    why = f"; {len(skipped)} rows skipped, first: {skipped[0]}" if skipped else ""
    return RecordError(f"no usable records{why}", file=file)


# Row layouts other than ours, registered by the modules that read them (importing
# `vopd.datasets` registers the Vision-OPD-6K layout): name -> (is_layout(row), parse(row, ...)).
# A registry keeps this module free of imports from the dataset readers, which build on it.
_LAYOUTS: dict[str, tuple[Callable[[Mapping[str, Any]], bool], Callable[..., Sample]]] = {}


def register_layout(name: str, detect: Callable[[Mapping[str, Any]], bool], parse: Callable[..., Sample]) -> None:
    """Teach :func:`load_records` another row layout, detected on a file's first row.

    ``parse(row_obj, base, row=..., stem=...)`` returns a :class:`Sample` or raises RecordError.
    """
    _LAYOUTS[name] = (detect, parse)


def _detect_layout(obj: Mapping[str, Any]) -> str:
    for name, (detect, _) in _LAYOUTS.items():
        if detect(obj):
            return name
    if "problem" in obj and "question" not in obj:
        raise RecordError(
            "this row looks like the Vision-OPD-6K layout, which is not registered: load it "
            "with vopd.datasets.load_records (importing vopd.datasets registers it)"
        )
    return "vopd"


def _parse_row(obj: Mapping[str, Any], layout: str, base: Path, row: int, stem: str) -> Sample:
    if layout != "vopd":
        return _LAYOUTS[layout][1](obj, base, row=row, stem=stem)
    return parse_vopd_row(obj, base, row, stem)


def _checked_size(sample: Sample, row: int) -> tuple[int, int]:
    """Read the image header (and check a teacher crop exists); ImageError -> RecordError."""
    where = f"sample {sample.id!r}"
    try:
        size = image_size(sample.image, where=where)
        check_model_shape(size, where=where)  # a 3x1000 strip fails its row here, not a whole batch later
    except ImageError as err:
        raise RecordError(str(err), field="image") from None
    if isinstance(sample.teacher_image, (str, bytes)):
        try:
            image_size(sample.teacher_image, where=where)
        except ImageError as err:
            raise RecordError(str(err), field="teacher_image") from None
    return size


# ----------------------------------------------------------------------- JSONL write --


def safe_file_name(text: str) -> str:
    """``text`` with everything but letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def _store_image(
    image: str | bytes | Image.Image,
    out_dir: Path,
    image_dir: Path,
    stem: str,
    used: set[str],
) -> str:
    """Return a path for ``image`` relative to ``out_dir``, saving in-memory images first."""
    if isinstance(image, str):
        if image.startswith("data:image"):
            image = load_image(image, where=stem)
        else:
            path = Path(image)
            if not path.is_absolute():
                raise RecordError(
                    f"relative path {image!r} in memory is ambiguous; store absolute paths "
                    "in Sample.image (load_records does)",
                    field="image",
                )
            try:
                return Path(os.path.relpath(path, out_dir)).as_posix()
            except ValueError:  # another drive on Windows: no relative path exists
                return path.as_posix()
    name = safe_file_name(stem)
    while name in used:
        name = f"{name}_"
    used.add(name)
    image_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(image, (bytes, bytearray)):
        # Keep encoded bytes as they are (no re-encoding loss); the suffix is cosmetic.
        with Image.open(io.BytesIO(image)) as im:
            fmt = (im.format or "bin").lower()
        suffix = {"jpeg": ".jpg"}.get(fmt, f".{fmt}")
        target = image_dir / f"{name}{suffix}"
        target.write_bytes(bytes(image))
    else:
        target = image_dir / f"{name}.png"
        image.save(target, format="PNG")
    return target.relative_to(out_dir).as_posix()


def write_records(samples: Iterable[Sample], path: str | Path, *, image_dir: str = "images") -> Path:
    """Write samples as our JSONL format; image paths are relative to the file's folder.

    In-memory images are saved next to the file under ``image_dir``: PIL images as PNG,
    encoded bytes as they are. The file is written atomically (temporary file + rename).
    Boxes are written as pixel ``xyxy``. Returns the written path.
    """
    path = Path(path)
    out_dir = path.parent.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    lines = []
    for sample in samples:
        row: dict[str, Any] = {"id": sample.id}
        row["image"] = _store_image(sample.image, out_dir, out_dir / image_dir, sample.id, used)
        row["question"] = sample.question
        for key in ("options", "answer", "category"):
            if getattr(sample, key) is not None:
                row[key] = getattr(sample, key)
        if sample.boxes:
            row["boxes"] = [b.as_list() for b in sample.boxes]
        if sample.teacher_image is not None:
            row["teacher_image"] = _store_image(
                sample.teacher_image, out_dir, out_dir / image_dir, f"{sample.id}.teacher", used
            )
        if sample.meta:
            row["meta"] = sample.meta
        try:
            lines.append(json.dumps(row, ensure_ascii=False))
        except TypeError as err:
            raise RecordError(f"sample {sample.id!r} is not JSON-serialisable ({err})", field="meta") from None
    return write_rows(lines, path)
