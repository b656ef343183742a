"""``vopd data propose``: write the model's own crop proposals into a record file as its boxes.

The input records are read as training reads them (our JSONL or Vision-OPD-6K); each output
record is the input record with its ``boxes`` replaced by the one proposed box (gold boxes and a
ready-made ``teacher_image`` are dropped before the model sees the sample, as in training) and
its provenance in ``meta``: ``box_source``, ``box_score``, ``box_status`` and ``box_model``.
Train on the result with ``views.crop_source=box``.

Proposals are cached in ``<out stem>.proposals.jsonl`` beside the output as they are made (each
row names the model), so an interrupted run resumes where it stopped and a rerun with another
model is refused; the output file itself is written once, atomically,
at the end. The input file is never written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vopd.config import ViewConfig
from vopd.datasets import load_records
from vopd.outputs import OutputError
from vopd.proposals import (
    PROPOSAL_SOURCES,
    ProposalConfig,
    cached_proposals,
    check_cache_model,
    load_or_propose,
    proposal_quality,
)
from vopd.proposals.grounding import FALLBACK_STATUSES
from vopd.records import Sample, write_records

__all__ = ["ProposedBoxes", "proposals_cache_path", "write_proposed_boxes"]

log = logging.getLogger(__name__)


@dataclass
class ProposedBoxes:
    """What :func:`write_proposed_boxes` wrote: the output file, its cache, and how the proposals went."""

    out: Path
    cache: Path
    written: int
    reused: int  # proposals taken from the cache of an earlier (interrupted) run
    left_out: int  # grounding fallbacks not written (``skip_fallbacks``)
    quality: dict[str, Any]

    def report(self) -> str:
        q = self.quality
        parts = [
            f"wrote {self.written} records with proposed boxes ({q['source']}) to {self.out}",
            f"proposals cached in {self.cache} ({self.reused} reused)",
        ]
        if "unparsed" in q:
            parts.append(
                f"{q['unparsed']} answers without a box and {q['degenerate']} with a box of no area "
                + ("left out" if self.left_out else f"written with the {q['fallback_box']} as their box")
            )
        if q["n"]:
            parts.append(
                f"against the input's gold boxes ({q['n']} records): hit rate {q['hit_rate']:.1%}, "
                f"mean IoU {q['mean_iou']:.2f}"
            )
        return "; ".join(parts)


def proposals_cache_path(out: str | Path) -> Path:
    """Where the proposals behind ``out`` are cached: ``<out stem>.proposals.jsonl`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".proposals.jsonl")


def _with_box(sample: Sample, proposal: Any, model_name: str) -> Sample:
    meta = {
        **sample.meta,
        "box_source": proposal.source,
        "box_score": proposal.score,
        "box_status": proposal.status,
        "box_model": model_name,
    }
    return dataclasses.replace(sample, boxes=[proposal.box], teacher_image=None, meta=meta)


def write_proposed_boxes(
    path: str | Path,
    out: str | Path,
    load_model: Callable[[], tuple[Any, Any]],
    *,
    source: str,
    model_name: str = "",
    view_cfg: ViewConfig | None = None,
    limit: int | None = None,
    skip_fallbacks: bool = False,
    batch_size: int = 100,
    progress: bool = True,
    thinking: bool | None = None,
    overwrite: bool = False,
) -> ProposedBoxes:
    """Propose a box for each record of ``path`` and write the records to ``out``.

    Args:
        load_model: returns ``(model, processor)``; called once, after the input was read, and
            only when some record has no cached proposal yet.
        source: ``search``, ``attention`` or ``grounding`` (:mod:`vopd.proposals`).
        model_name: written to each record's ``meta.box_model``.
        view_cfg: the views the proposals are made and measured with (default :class:`ViewConfig`).
        limit: only the first ``limit`` records.
        skip_fallbacks: leave out records whose grounding answer held no usable box (counted)
            instead of writing them with the whole image as their box.
        thinking: the chat template's thinking switch for the proposer's prompts (the
            ``--config``'s ``model.thinking``).
        overwrite: remove ``out`` and its cache first. Without it an existing ``out`` with no
            cache beside it (not written by this command) is refused, and so is a cached
            proposal made by another model, with other settings, or from another image under
            the same id (:func:`vopd.proposals.cached_proposals`).

    Raises:
        ValueError: ``out`` is empty or a folder, ``out`` or its cache is the input file, the cache
            holds another model's proposals, or a bad ``source`` / ``limit`` / ``batch_size``.
        RecordError: the input is missing or a row is bad (``file:row``).
    """
    if source not in PROPOSAL_SOURCES:
        raise ValueError(f"source {source!r} is not one of {', '.join(PROPOSAL_SOURCES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if str(out).strip() in ("", ".") or Path(out).is_dir():  # Path("") is "." and has no name for the cache
        raise ValueError(f"--out {str(out)!r} is not a file name: name the records file, e.g. --out data/prop.jsonl")
    loaded = load_records(path)
    out, cache = Path(out), proposals_cache_path(out)
    if Path(loaded.source).resolve() in (out.resolve(), cache.resolve()):  # the cache is appended to
        raise ValueError(
            f"--out {out} (cache {cache.name}) would overwrite the input {loaded.source}; write to another file"
        )
    if overwrite:
        for stale in (cache, out):
            stale.unlink(missing_ok=True)
    elif out.exists() and not cache.is_file():  # ours always has its cache beside it
        raise OutputError(
            f"--out {out} already exists and vopd did not write it (no {cache.name} beside it); choose another "
            "--out, or pass --overwrite to replace it"
        )
    samples = list(loaded.samples)[:limit]
    view_cfg = view_cfg or ViewConfig()
    cfg = ProposalConfig(source=source, batch_size=batch_size, thinking=thinking)
    blind = [dataclasses.replace(s, boxes=[], teacher_image=None) for s in samples]
    if cache.is_file():
        check_cache_model(cache, source, model_name)
    done = set(cached_proposals(cache, blind, cfg, model_name)) if cache.is_file() else set()
    todo = [s for s in blind if s.id not in done]
    model, processor = load_model() if todo else (None, None)
    chunk = max(1, 4 * batch_size)
    with tqdm(
        total=len(blind),
        initial=len(blind) - len(todo),
        desc=f"vopd data propose ({source})",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            load_or_propose(model, processor, part, view_cfg, cfg, cache, model_name=model_name)
            bar.update(len(part))
    proposals = load_or_propose(model, processor, blind, view_cfg, cfg, cache, model_name=model_name)  # all cached
    keep = [(s, p) for s, p in zip(samples, proposals) if not (skip_fallbacks and p.status in FALLBACK_STATUSES)]
    write_records([_with_box(s, p, model_name) for s, p in keep], out)
    quality = {"source": source, **proposal_quality(proposals, samples, view_cfg)}
    return ProposedBoxes(out, cache, len(keep), len(blind) - len(todo), len(samples) - len(keep), quality)
