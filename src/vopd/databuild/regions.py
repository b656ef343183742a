"""Stage 1 of ``vopd data build``: the images, and the evidence regions to write questions about.

Images come from folders (searched recursively), single files or ``.txt`` lists; each is read
once for its content hash (which keys every later cache) and its header (its size). An
unreadable image is skipped and named in the summary. Regions come from a boxes file (one JSON
object per line: ``image``, ``boxes``, optional ``labels``, ``box_format``, ``box_normalized``) or
from a model's own proposal (:mod:`vopd.proposals`, one region per image, cached by content hash),
and are kept when small: area at most ``max_area`` of the image and both sides at least ``min_side``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vopd.config import ViewConfig
from vopd.databuild.settings import RegionConfig, fingerprint, view_settings
from vopd.images import ImageError, load_image
from vopd.records import Box, RecordError, safe_file_name

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageEntry",
    "Region",
    "area_rule",
    "find_images",
    "proposals_fingerprint",
    "given_regions",
    "proposed_regions",
    "read_boxes_file",
    "scan_images",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageEntry:
    """One readable input image: absolute path, a readable unique id, content hash and upright size."""

    path: Path
    id: str
    sha256: str
    size: tuple[int, int]


@dataclass(frozen=True)
class Region:
    """One evidence box on one image, and where it came from (``given`` or a proposal source)."""

    id: str
    image: ImageEntry
    box: Box
    label: str | None = None
    source: str = "given"
    score: float | None = None
    model: str | None = None

    @property
    def area_ratio(self) -> float:
        width, height = self.image.size
        return self.box.clip(self.image.size).area / float(width * height)

    def key(self) -> dict[str, Any]:
        """What identifies this region's content in later caches (image bytes, box, label)."""
        return {"image": self.image.sha256, "box": [round(v, 3) for v in self.box.as_list()], "label": self.label}


def find_images(specs: Iterable[str]) -> list[Path]:
    """Image paths named by ``specs`` (folders recursively, files, ``.txt`` lists), in order, without repeats.

    Raises:
        FileNotFoundError: a spec that does not exist.
        ValueError: a file that is neither an image nor a ``.txt`` list, or nothing found at all.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file() and path.suffix.lower() == ".txt":
            base = path.parent
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    item = Path(line.strip()).expanduser()
                    found.append(item if item.is_absolute() else base / item)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) nor a .txt list of images")
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image, folder or list file")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, specs))}")
    return unique


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _readable_ids(paths: list[Path]) -> list[str]:
    """Short unique ids: the path below the inputs' common folder, without suffix, made file-name safe."""
    try:
        root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path()
    except ValueError:  # paths on different drives
        root = Path()
    ids: list[str] = []
    used: set[str] = set()
    for p in paths:
        try:
            rel = p.with_suffix("").relative_to(root)
        except ValueError:
            rel = Path(p.stem)
        name = safe_file_name(rel.as_posix().replace("/", "__"))
        while name in used:
            name += "_"
        used.add(name)
        ids.append(name)
    return ids


def scan_images(paths: list[Path]) -> tuple[list[ImageEntry], list[tuple[str, str]]]:
    """Decode, hash and measure every image; returns the readable ones and ``(path, reason)`` for the others."""
    entries: list[ImageEntry] = []
    unreadable: list[tuple[str, str]] = []
    for path, image_id in zip(paths, _readable_ids(paths)):
        try:
            size = load_image(path).size  # a full decode: a truncated file is caught here, not mid-build
            sha = _file_sha256(path)
        except (ImageError, OSError) as err:
            unreadable.append((str(path), str(err).splitlines()[0] if str(err) else type(err).__name__))
            continue
        entries.append(ImageEntry(path, image_id, sha, size))
    return entries, unreadable


def read_boxes_file(
    path: str | Path, sizes: dict[Path, tuple[int, int]]
) -> tuple[dict[Path, list[tuple[Box, str | None]]], int]:
    """Boxes per resolved image path from a boxes JSONL (see the module doc), and the number of
    boxes given for images that are not inputs (left out).

    ``sizes`` gives the size of every input image (needed for normalized boxes). An image path
    that is not an input is matched by its file name when exactly one input has that name.

    Raises:
        RecordError: ``file:row`` and the field, for a row that is not usable.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError("no such boxes file", file=path)
    by_name: dict[str, list[Path]] = {}
    for p in sizes:
        by_name.setdefault(p.name, []).append(p)
    out: dict[Path, list[tuple[Box, str | None]]] = {}
    stray = 0
    with path.open("rb") as fh:
        for row, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                out_key, boxes, left_out = _parse_boxes_row(raw, path.parent, sizes, by_name)
            except RecordError as err:
                raise err.located(file=path, row=row) from None
            stray += left_out
            if out_key is not None:
                out.setdefault(out_key, []).extend(boxes)
    return out, stray


def _parse_boxes_row(
    raw: bytes, base: Path, sizes: dict[Path, tuple[int, int]], by_name: dict[str, list[Path]]
) -> tuple[Path | None, list[tuple[Box, str | None]], int]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"not a JSON object ({err})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise RecordError("expected an object with an 'image' path", field="image")
    image = Path(obj["image"]).expanduser()
    image = (image if image.is_absolute() else base / image).resolve()
    boxes = obj.get("boxes")
    if not isinstance(boxes, list):
        raise RecordError("must be a list of [4 numbers] lists", field="boxes")
    if image not in sizes:
        same = by_name.get(image.name, [])
        if len(same) != 1:
            return None, [], len(boxes)  # not one of the inputs: counted as boxes for no input
        image = same[0]
    labels = obj.get("labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(boxes)):
        raise RecordError(f"must be a list with one label per box ({len(boxes)})", field="labels")
    fmt = obj.get("box_format", "xyxy")
    normalized = obj.get("box_normalized", False)
    if not isinstance(normalized, bool):
        raise RecordError("must be true or false", field="box_normalized")
    parsed = []
    for i, values in enumerate(boxes):
        try:
            box = Box.from_format(values, fmt, normalized=normalized, image_size=sizes[image])
        except RecordError as err:
            raise RecordError(err.reason, field=f"boxes[{i}]") from None
        label = None if labels is None or labels[i] is None else str(labels[i])
        parsed.append((box, label))
    return image, parsed, 0


def given_regions(entries: list[ImageEntry], boxes_file: str | Path) -> tuple[list[Region], list[ImageEntry], int]:
    """Regions from a boxes file: (regions in input order, images without any box, boxes of no input image).

    A box with no area inside its image is dropped here with a warning (it cannot be cropped).
    """
    sizes = {e.path: e.size for e in entries}
    given, stray = read_boxes_file(boxes_file, sizes)
    regions: list[Region] = []
    without: list[ImageEntry] = []
    for entry in entries:
        boxes = given.get(entry.path, [])
        if not boxes:
            without.append(entry)
        for k, (box, label) in enumerate(boxes):
            if box.clip(entry.size).area <= 0:
                log.warning("%s: box %s lies outside the image; skipped", entry.path, box.as_list())
                continue
            regions.append(Region(f"{entry.id}-r{k}", entry, box.clip(entry.size), label))
    return regions, without, stray


def area_rule(region: Region, cfg: RegionConfig) -> str | None:
    """Why a region is not kept (``too_large`` / ``too_small``), or None when it is small enough to keep."""
    if region.area_ratio > cfg.max_area:
        return "too_large"
    if region.box.width < cfg.min_side or region.box.height < cfg.min_side:
        return "too_small"
    return None


def proposals_fingerprint(cfg: RegionConfig, views: ViewConfig) -> str:
    """The name of a proposal cache: proposer, source, question and views."""
    return fingerprint(
        {
            "model": cfg.propose_model,
            "source": cfg.propose_source,
            "question": cfg.propose_question,
            "views": view_settings(views),
        }
    )


def proposed_regions(entries: list[ImageEntry], cfg: RegionConfig, views: ViewConfig, cache: Path) -> list[Region]:
    """One region per image: the proposer's own box (:mod:`vopd.proposals`), cached in ``cache``.

    The cache is keyed by image content (a moved or renamed image is not proposed again); the
    proposer is loaded only when some image has no cached proposal.
    """
    import dataclasses

    from vopd.proposals import ProposalConfig, load_or_propose, read_proposals
    from vopd.records import Sample

    assert cfg.propose_model is not None
    samples = {e.sha256: Sample(id=e.sha256, image=str(e.path), question=cfg.propose_question) for e in entries}
    done = {p.sample_id for p in read_proposals(cache)} if cache.is_file() else set()
    todo = [s for k, s in samples.items() if k not in done]
    model = processor = None
    if todo:
        from vopd.specs import resolve_model_spec

        model, processor = resolve_model_spec(cfg.propose_model)
        model.eval()
    pcfg = ProposalConfig(source=cfg.propose_source, batch_size=cfg.propose_batch_size)
    view_cfg = dataclasses.replace(views, hint=False, draw_box=False)
    proposals = load_or_propose(
        model, processor, list(samples.values()), view_cfg, pcfg, cache, model_name=cfg.propose_model
    )
    by_sha = {p.sample_id: p for p in proposals}
    out = []
    for e in entries:
        p = by_sha[e.sha256]
        out.append(Region(f"{e.id}-r0", e, p.box.clip(e.size), None, p.source, p.score, cfg.propose_model))
    return out
