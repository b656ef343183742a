"""``vopd data build``: images -> regions -> questions -> filter -> records, summary and gallery.

Each request stage caches every reply as it arrives (:mod:`vopd.databuild.store`), keyed by what
made it (the stage's fingerprint names the file, the item's content names the row), so a killed
build resumes where it stopped and a changed writer or filter starts afresh. What is cached is
the model's raw reply; parsing and the keep rules run again on every build, so changing
``--filter-agree`` needs no new request. A request that fails after its retries is not cached: the
item is dropped from this build (counted) and asked again by the next one.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from tqdm.auto import tqdm

from vopd.databuild.chat import ChatClient, LocalSampler, Sampler
from vopd.databuild.filtering import Votes, count_votes, crop_verdict, passes
from vopd.databuild.gallery import GalleryItem, write_gallery
from vopd.databuild.regions import (
    ImageEntry,
    Region,
    area_rule,
    find_images,
    given_regions,
    proposals_fingerprint,
    proposed_regions,
    scan_images,
)
from vopd.databuild.settings import BuildConfig, fingerprint, view_settings
from vopd.databuild.store import BuildFiles, StageCache, atomic_write_text
from vopd.databuild.writer import DEFAULT_WRITER_PROMPT, WrittenQuestion, parse_question, render_prompt
from vopd.images import load_image
from vopd.records import Sample, write_records
from vopd.views import prompt_text, student_view, teacher_view

__all__ = ["BuildSummary", "build_dataset"]

T = TypeVar("T")


@dataclass
class BuildSummary:
    """What a build did: per stage, how many items went in, came out, and why the others were dropped."""

    out: Path
    files: BuildFiles
    counts: dict[str, dict[str, Any]] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    records: int = 0
    gallery: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": self.out.name,
            "records": self.records,
            "stages": self.counts,
            "unreadable_images": [{"path": p, "reason": r} for p, r in self.unreadable],
        }

    def report(self) -> str:
        lines = []
        for stage, counts in self.counts.items():
            lines.append(f"  {stage:8s} " + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "agreement"))
        for path, reason in self.unreadable[:20]:
            lines.append(f"  unreadable image skipped: {path}: {reason}")
        if len(self.unreadable) > 20:
            lines.append(f"  ... and {len(self.unreadable) - 20} more unreadable images (see {self.files.summary})")
        tail = f"; gallery {self.gallery}" if self.gallery else ""
        return "\n".join([f"wrote {self.records} records to {self.out}", *lines, f"summary {self.files.summary}{tail}"])


def _run(
    items: Sequence[T],
    ask: Callable[[T], Any],
    done: Callable[[T, Any], None],
    *,
    concurrency: int,
    desc: str,
    progress: bool,
) -> int:
    """``ask`` for every item, ``concurrency`` at a time; ``done`` (in this thread) for each answer.

    Returns how many failed (their error is swallowed here: the item stays uncached, so the
    caller counts it as dropped and the next build asks again).
    """
    failed = 0
    with (
        ThreadPoolExecutor(max_workers=concurrency) as pool,
        tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True) as bar,
    ):
        futures = {pool.submit(ask, item): item for item in items}
        for future in as_completed(futures):
            try:
                answer = future.result()
            except Exception:  # noqa: BLE001 - a failed request (after its retries) drops its item, counted
                failed += 1
            else:
                done(futures[future], answer)
            bar.update(1)
    return failed


def _crop(region: Region, views: Any) -> Image.Image:
    return teacher_view(load_image(region.image.path), [region.box], views)


def _regions(cfg: BuildConfig, entries: list[ImageEntry], files: BuildFiles) -> tuple[list[Region], dict[str, Any]]:
    """Stage 1: every region, then the small-area rule and ``limit``."""
    counts: dict[str, Any] = {}
    if cfg.regions.boxes_file is not None:
        regions, without, stray = given_regions(entries, cfg.regions.boxes_file)
        counts.update(source="boxes file", images_without_boxes=len(without), boxes_for_no_input=stray)
    else:
        fp = proposals_fingerprint(cfg.regions, cfg.views)
        made_by = {"model": cfg.regions.propose_model, "source": cfg.regions.propose_source}
        files.record_stage("regions", fp, {**made_by, "question": cfg.regions.propose_question})
        regions = proposed_regions(entries, cfg.regions, cfg.views, files.folder / f"regions-{fp}.jsonl")
        counts.update(source=f"{cfg.regions.propose_source} proposals of {cfg.regions.propose_model}")
    counts["found"] = len(regions)
    kept = []
    for region in regions:
        why = area_rule(region, cfg.regions)
        if why:
            counts[why] = counts.get(why, 0) + 1
        else:
            kept.append(region)
    if cfg.limit is not None and len(kept) > cfg.limit:
        counts["over_limit"] = len(kept) - cfg.limit
        kept = kept[: cfg.limit]
    counts["kept"] = len(kept)
    return kept, counts


def _writer(
    cfg: BuildConfig, regions: list[Region], files: BuildFiles
) -> tuple[list[tuple[Region, WrittenQuestion]], dict[str, Any], str]:
    """Stage 2: one question per region from the writer; unusable replies are counted by reason."""
    w = cfg.writer
    template = w.prompt if w.prompt is not None else DEFAULT_WRITER_PROMPT
    made_by = {
        "model": w.chat.model,
        "prompt": template,
        "show_full": w.show_full,
        "temperature": w.temperature,
        "max_tokens": w.max_tokens,
        "thinking": w.chat.thinking,
        "views": view_settings(cfg.views),
    }
    cache = StageCache(files, "writer", fingerprint(made_by), made_by)
    client = ChatClient(w.chat)
    boxed = dataclasses.replace(cfg.views, draw_box=True)
    keys = {r.id: fingerprint(r.key()) for r in regions}

    def ask(r: Region) -> str:
        image = load_image(r.image.path)
        shown = [teacher_view(image, [r.box], cfg.views)]
        if w.show_full:
            shown.append(student_view(image, [r.box], boxed))
        text = render_prompt(template, image=r.image.path.name, label=r.label, show_full=w.show_full)
        return client.ask(shown, text, n=1, temperature=w.temperature, max_tokens=w.max_tokens)[0]

    todo = list({keys[r.id]: r for r in regions if cache.get(keys[r.id]) is None}.values())
    _run(
        todo,
        ask,
        lambda r, reply: cache.put(keys[r.id], {"region": r.id, "reply": reply}),
        concurrency=w.chat.concurrency,
        desc="vopd data build: questions",
        progress=cfg.progress,
    )
    counts: Counter[str] = Counter(asked=len(regions), requests=len(todo))
    written = []
    for r in regions:
        row = cache.get(keys[r.id])
        question, why = parse_question(row["reply"]) if row else (None, "writer_failed")
        if question is None:
            counts[str(why)] += 1
        else:
            written.append((r, question))
    counts["written"] = len(written)
    return written, dict(counts), cache.fp


def _sampler(cfg: BuildConfig) -> Sampler:
    """The filter's sampler: the local model (loaded here) or the server's client."""
    f = cfg.filter
    if f.local_model is not None:
        return LocalSampler(f.local_model, seed=f.seed, thinking=False)
    assert f.chat is not None
    return ChatClient(f.chat)


def _votes(
    cfg: BuildConfig, items: list[tuple[Region, WrittenQuestion]], cache: StageCache, view: str, sampler: Any
) -> tuple[dict[str, Votes], int]:
    """K sampled answers per question on ``view`` (``crop`` or ``full``), read as votes; and the requests made."""
    f = cfg.filter

    def key(item: tuple[Region, WrittenQuestion]) -> str:
        r, q = item
        return fingerprint({"region": r.key(), "view": view, "question": q.question, "options": q.options})

    def ask(item: tuple[Region, WrittenQuestion]) -> list[str]:
        r, q = item
        image = _crop(r, cfg.views) if view == "crop" else load_image(r.image.path)
        text = prompt_text(Sample(id=r.id, image=image, question=q.question, options=q.options), hint=False)
        return sampler().ask([image], text, n=f.samples, temperature=f.temperature, max_tokens=f.max_tokens)

    todo = list({key(i): i for i in items if cache.get(key(i)) is None}.values())
    concurrency = 1 if f.local_model is not None else f.chat.concurrency  # type: ignore[union-attr]
    _run(
        todo,
        ask,
        lambda i, replies: cache.put(key(i), {"region": i[0].id, "view": view, "replies": replies}),
        concurrency=concurrency,
        desc=f"vopd data build: filter ({view})",
        progress=cfg.progress,
    )
    votes = {}
    for item in items:
        row = cache.get(key(item))
        if row is not None:
            votes[item[0].id] = count_votes(row["replies"], item[1].options)
    return votes, len(todo)


def _filter(
    cfg: BuildConfig, written: list[tuple[Region, WrittenQuestion]], files: BuildFiles
) -> tuple[list[tuple[Region, WrittenQuestion, Votes]], dict[str, Any], str]:
    """Stage 3: keep the questions whose sampled answers agree with the writer (:mod:`.filtering`)."""
    f = cfg.filter
    made_by = {
        "model": f.model_name,
        "local": f.local_model is not None,
        "samples": f.samples,
        "temperature": f.temperature,
        "max_tokens": f.max_tokens,
        "views": view_settings(cfg.views),
        **({"seed": f.seed} if f.local_model is not None else {"thinking": f.chat.thinking}),  # type: ignore[union-attr]
    }
    cache = StageCache(files, "filter", fingerprint(made_by), made_by)
    loaded: list[Sampler] = []

    def sampler() -> Sampler:  # a local filter model is loaded only when some answer is not cached
        if not loaded:
            loaded.append(_sampler(cfg))
        return loaded[0]

    counts: Counter[str] = Counter(asked=len(written))
    votes, counts["requests"] = _votes(cfg, written, cache, "crop", sampler)
    kept = []
    for r, q in written:
        v = votes.get(r.id)
        why = "filter_failed" if v is None else crop_verdict(v, q.answer, f.agree)
        if why:
            counts[why] += 1
        else:
            kept.append((r, q, votes[r.id]))
    if f.drop_easy and kept:
        full, requests = _votes(cfg, [(r, q) for r, q, _ in kept], cache, "full", sampler)
        counts["requests"] += requests
        hard = []
        for r, q, v in kept:
            if r.id not in full:
                counts["filter_failed"] += 1
            elif passes(full[r.id], q.answer, f.agree):
                counts["filter_too_easy"] += 1
            else:
                hard.append((r, q, v))
        kept = hard
    counts["kept"] = len(kept)
    counts["agreement"] = dict(sorted(Counter(f"{v.share:.2f}" for v in votes.values()).items()))
    return kept, dict(counts), cache.fp


def _record(cfg: BuildConfig, r: Region, q: WrittenQuestion, v: Votes, writer_fp: str, filter_fp: str) -> Sample:
    meta = {
        "image_sha256": r.image.sha256,
        "area_ratio": round(r.area_ratio, 5),
        "region": {"source": r.source, "label": r.label, "score": r.score, "model": r.model},
        "writer": {"model": cfg.writer.chat.model, "cache": f"writer-{writer_fp}"},
        "filter": {"model": cfg.filter.model_name, "cache": f"filter-{filter_fp}", **v.as_dict()},
    }
    return Sample(
        id=r.id,
        image=str(r.image.path),
        question=q.question,
        options=q.options,
        answer=q.answer,
        boxes=[r.box],
        category=r.label,
        meta=meta,
    )


def build_dataset(cfg: BuildConfig) -> BuildSummary:
    """Run every stage (each resuming from its cache) and write the records, summary and gallery.

    Raises:
        ValueError: an output exists that vopd did not write, an output is an input, or bad settings.
        RecordError: a bad row in the boxes file (``file:row``).
    """
    files = BuildFiles(cfg.out)
    # The gallery is a PNG too: an --out inside an image folder must not feed it back as an input.
    paths = [p for p in find_images(cfg.images) if p != files.gallery.resolve()]
    extra = [Path(cfg.regions.boxes_file)] if cfg.regions.boxes_file else []
    files.claim(paths + extra + [Path(p) for p in cfg.images if Path(p).is_file()])
    entries, unreadable = scan_images(paths)
    summary = BuildSummary(files.out, files, unreadable=unreadable)
    summary.counts["images"] = {"found": len(paths), "unreadable": len(unreadable), "read": len(entries)}
    if not entries:
        raise ValueError(
            f"none of the {len(paths)} images could be read (first: {unreadable[0][0]}: {unreadable[0][1]})"
        )
    regions, summary.counts["regions"] = _regions(cfg, entries, files)
    written, summary.counts["writer"], writer_fp = _writer(cfg, regions, files)
    kept, summary.counts["filter"], filter_fp = _filter(cfg, written, files)
    samples = [_record(cfg, r, q, v, writer_fp, filter_fp) for r, q, v in kept]
    write_records(samples, files.out)
    summary.records = len(samples)
    if cfg.gallery:
        shown = [GalleryItem(_crop(r, cfg.views), q.question, q.options, q.answer) for r, q, _ in kept[: cfg.gallery]]
        summary.gallery = write_gallery(shown, files.gallery)
    atomic_write_text(files.summary, json.dumps(summary.as_dict(), indent=1, ensure_ascii=False))
    return summary
