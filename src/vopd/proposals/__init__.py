"""Evidence crops proposed by the model itself, for data without box annotations.

Vision-OPD's teacher sees a crop around the evidence; :mod:`vopd.views` cuts it around the
sample's gold boxes (``views.crop_source=box``). The sources here find the region without them:

- ``search`` (label-free): cut a grid of candidate windows, let the model answer the question
  on each window's teacher view (greedy), and keep the window where it is most confident
  (highest mean log-probability of its greedy answer tokens). What is scored is exactly the crop
  the teacher would see for that window.
- ``attention`` (ViCrop-style, label-free): the attention of the prompt's last token over the
  image tokens under the question, divided by the same attention under a generic prompt, summed
  over layers and heads; the window centred on the strongest image token is the proposal, scored
  by how far the peak stands above the strongest token outside that window.
- ``grounding``: ask the model for the box of the evidence in its family's box format and parse
  it (:mod:`vopd.proposals.grounding`); an answer without a usable box falls back to the whole image and is
  counted (``Proposal.status``).

A proposal is one box per sample; :func:`with_proposed_boxes` puts it in place of the gold boxes
(which are dropped first, so nothing downstream can read them). :func:`proposal_quality`
measures proposals against gold boxes where they exist (hit rate, IoU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vopd.config import CROP_SOURCES, RolloutConfig, ViewConfig
from vopd.images import load_image
from vopd.jsonl import append_record, end_with_newline, read_records
from vopd.models import build_prompts
from vopd.outputs import OutputError, content_hash, settings_diff, weights_fingerprint
from vopd.proposals.grounding import FALLBACK_STATUSES, ground, status_counts
from vopd.records import Box, Sample
from vopd.rollout import HFGenerateEngine
from vopd.views import evidence_region, prompt_text, teacher_view

__all__ = [
    "CROP_SOURCES",
    "PROPOSAL_SOURCES",
    "ProposalConfig",
    "Proposal",
    "candidate_windows",
    "search_proposals",
    "attention_proposals",
    "grounding_proposals",
    "propose",
    "proposal_quality",
    "with_proposed_boxes",
    "load_or_propose",
    "check_cache_model",
    "read_proposals",
    "crops_from_model",
    "surest",
    "PROPOSALS_FILE",
    "cached_proposals",
    "proposal_settings",
]

log = logging.getLogger(__name__)

#: Proposals of a training run, beside its checkpoints (one JSON row per sample; resumable).
PROPOSALS_FILE = "proposals.jsonl"

#: The proposal sources: every ``views.crop_source`` but the gold ``box``.
PROPOSAL_SOURCES = CROP_SOURCES[1:]

#: The generic prompt whose attention ViCrop divides by (it attends to salient, not asked-for, regions).
GENERIC_PROMPT = "Write a general description of the image."


@dataclass
class ProposalConfig:
    """How proposals are made.

    Attributes:
        source: ``search``, ``attention`` or ``grounding`` (see the module doc).
        window: side of a candidate window as a fraction of the image's shorter side.
        stride: step between candidate windows as a fraction of the window side (0.5: half
            overlapping; any object up to half a window wide lies wholly inside one window).
        max_new_tokens: greedy answer budget per window (``search``).
        box_tokens: greedy answer budget for the box (``grounding``; the first box is read).
        batch_size: prompts per forward pass.
        thinking: the chat template's thinking switch for the proposer's prompts (``model.thinking``
            in training, ``--thinking`` in ``vopd gap``); None is the template's default.
    """

    source: str = "search"
    window: float = 1 / 3
    stride: float = 0.5
    max_new_tokens: int = 16
    box_tokens: int = 64
    batch_size: int = 100
    thinking: bool | None = None

    def __post_init__(self) -> None:
        if self.source not in PROPOSAL_SOURCES:
            raise ValueError(f"proposal source {self.source!r} is not one of {', '.join(PROPOSAL_SOURCES)}")
        if not 0 < self.window <= 1 or not 0 < self.stride <= 1:
            raise ValueError(f"window ({self.window}) and stride ({self.stride}) must be in (0, 1]")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.box_tokens < 1:
            raise ValueError(
                f"batch_size ({self.batch_size}), max_new_tokens ({self.max_new_tokens}) and "
                f"box_tokens ({self.box_tokens}) must be >= 1"
            )


@dataclass
class Proposal:
    """The region proposed for one sample and the score that chose it (higher = surer).

    ``status`` is ``ok`` for search and attention; grounding's answers may also be ``repaired``,
    ``degenerate`` or ``unparsed`` (the last two: no usable box, the whole image stands in).
    """

    sample_id: str
    box: Box
    score: float
    source: str
    status: str = "ok"


def _starts(limit: int, side: int, step: int) -> list[int]:
    starts = list(range(0, max(limit - side, 0) + 1, step))
    if starts[-1] + side < limit:  # the last window touches the far edge
        starts.append(limit - side)
    return starts


def candidate_windows(image_size: tuple[int, int], window: float = 1 / 3, stride: float = 0.5) -> list[Box]:
    """Square windows of ``window`` x the shorter side, every ``stride`` windows, covering the image."""
    width, height = image_size
    side = max(1, round(window * min(width, height)))
    step = max(1, round(stride * side))
    return [Box(x, y, x + side, y + side) for y in _starts(height, side, step) for x in _starts(width, side, step)]


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def search_proposals(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    view_cfg: ViewConfig,
    cfg: ProposalConfig = ProposalConfig(),
) -> list[Proposal]:
    """Label-free search: the candidate window whose teacher view the model answers most surely.

    Confidence is the mean log-probability of the model's greedy answer tokens (end of turn
    included) on the window's crop, with the sample's question text.
    """
    engine = HFGenerateEngine(processor)
    greedy = RolloutConfig(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    jobs: list[tuple[int, Box, Any, str]] = []
    for i, sample in enumerate(samples):
        image = load_image(sample.image, where=f"sample {sample.id!r}")
        text = prompt_text(sample, hint=view_cfg.hint)
        for window in candidate_windows(image.size, cfg.window, cfg.stride):
            jobs.append((i, window, teacher_view(image, [window], view_cfg), text))
    best: dict[int, tuple[float, Box]] = {}
    for chunk in _batches(jobs, cfg.batch_size):
        batch = build_prompts(processor, [j[2] for j in chunk], [j[3] for j in chunk], thinking=cfg.thinking)
        rollouts = engine.sample(model, batch, greedy)
        mask = rollouts.mask_B_T.float()
        scores = (rollouts.sampler_logp_B_T * mask).sum(1) / mask.sum(1).clamp(min=1)
        for (i, window, _, _), score in zip(chunk, scores.tolist()):
            if i not in best or score > best[i][0]:
                best[i] = (score, window)
    return [Proposal(s.id, best[i][1], best[i][0], "search") for i, s in enumerate(samples)]


def _image_token_attention(model: Any, batch: Any, image_token_id: int) -> list[torch.Tensor]:
    """Per row: attention of the last prompt token over that row's image tokens, summed over layers and heads."""
    device = getattr(model, "device", None)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v for k, v in batch.items()}
    with torch.no_grad():
        out = model(**batch, output_attentions=True, use_cache=False)
    total = torch.stack([a.float().sum(dim=1) for a in out.attentions]).sum(0)  # B x Q x K
    last = total[:, -1, :]
    is_image = (batch["input_ids"] == image_token_id).to(last.device)
    return [last[b][is_image[b]] for b in range(last.shape[0])]


def _centred_window(image_size: tuple[int, int], cx: float, cy: float, window: float) -> Box:
    """A square of ``window`` x the shorter side centred on (cx, cy), shifted inside the image."""
    width, height = image_size
    side = max(1, round(window * min(width, height)))
    x1 = min(max(round(cx - side / 2), 0), width - side)
    y1 = min(max(round(cy - side / 2), 0), height - side)
    return Box(x1, y1, x1 + side, y1 + side)


def _grid_of(batch: Any, row: int, merge: int) -> tuple[int, int]:
    _, h, w = (int(v) for v in batch["image_grid_thw"][row])
    return h // merge, w // merge


def _peak_margin(ratio: torch.Tensor, window: Box, size: tuple[int, int]) -> float:
    """How singular the peak is: the strongest cell over the strongest cell whose centre lies
    outside ``window`` (a second object the question might be about). 1.0 when nothing is outside.

    In the toy world the top fifth of samples by this margin hold the target 74 % of the time,
    against 46 % for all samples (``benchmarks/bench_proposal_signal.py``, 400 scenes).
    """
    gh, gw = ratio.shape
    xs = (torch.arange(gw, dtype=torch.float32, device=ratio.device) + 0.5) * size[0] / gw  # on the map's device
    ys = (torch.arange(gh, dtype=torch.float32, device=ratio.device) + 0.5) * size[1] / gh
    inside = (
        (ys[:, None] >= window.y1)
        & (ys[:, None] <= window.y2)
        & (xs[None, :] >= window.x1)
        & (xs[None, :] <= window.x2)
    )
    outside = ratio[~inside]
    if outside.numel() == 0:
        return 1.0
    return float(ratio.max() / outside.max().clamp(min=1e-12))


def attention_proposals(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    view_cfg: ViewConfig,
    cfg: ProposalConfig = ProposalConfig(),
) -> list[Proposal]:
    """ViCrop-style relative attention: question attention / generic-prompt attention per image
    token (summed over layers and heads); the proposal is a window centred on the strongest token,
    scored by the peak over the strongest token outside the window (:func:`_peak_margin`).

    Needs a Qwen-VL-style model (``image_grid_thw``, ``image_token_id``) whose attention weights
    can be returned (the eager attention implementation is switched on for the call).
    """
    image_token_id = getattr(model.config, "image_token_id", None)
    merge = getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", None)
    if image_token_id is None or merge is None:
        raise ValueError(
            f"crop_source=attention needs a Qwen-VL-style model; {type(model).__name__} has no "
            "image_token_id / vision_config.spatial_merge_size"
        )
    previous = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")  # sdpa does not return attention weights
    was_training = model.training
    model.eval()
    proposals: list[Proposal] = []
    try:
        for chunk in _batches(list(samples), max(1, cfg.batch_size // 2)):
            images = [load_image(s.image, where=f"sample {s.id!r}") for s in chunk]
            asked = build_prompts(
                processor, images, [prompt_text(s, hint=view_cfg.hint) for s in chunk], thinking=cfg.thinking
            )
            generic = build_prompts(processor, images, [GENERIC_PROMPT] * len(chunk), thinking=cfg.thinking)
            a_q = _image_token_attention(model, asked, image_token_id)
            a_g = _image_token_attention(model, generic, image_token_id)
            for row, (sample, image) in enumerate(zip(chunk, images)):
                gh, gw = _grid_of(asked, row, merge)
                ratio = (a_q[row] / a_g[row].clamp(min=1e-8)).reshape(gh, gw)
                # The window is centred on the strongest cell (a grid of windows averages the peak away).
                k = int(ratio.argmax())
                r, c = divmod(k, gw)
                cx, cy = (c + 0.5) * image.width / gw, (r + 0.5) * image.height / gh
                window = _centred_window(image.size, cx, cy, cfg.window)
                proposals.append(Proposal(sample.id, window, _peak_margin(ratio, window, image.size), "attention"))
    finally:
        if previous is not None:
            model.set_attn_implementation(previous)
        model.train(was_training)
    return proposals


def grounding_proposals(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    view_cfg: ViewConfig,
    cfg: ProposalConfig = ProposalConfig(),
) -> list[Proposal]:
    """The box the model gives when asked where the evidence is (greedy; :func:`vopd.proposals.grounding.ground`).

    Answers without a usable box get the whole image (no zoom) and are logged here and counted
    by :func:`proposal_quality`.
    """
    was_training = model.training
    model.eval()
    try:
        found = ground(
            model,
            processor,
            HFGenerateEngine(processor),
            samples,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.box_tokens,
            thinking=cfg.thinking,
        )
    finally:
        model.train(was_training)
    fallbacks = [g for g in found if g.status in FALLBACK_STATUSES]
    if fallbacks:
        log.warning(
            "crop_source=grounding: %d of %d answers held no usable box, their crop is the whole image (first: %r)",
            len(fallbacks),
            len(found),
            fallbacks[0].answer[:120],
        )
    return [Proposal(s.id, g.box, g.score, "grounding", g.status) for s, g in zip(samples, found)]


def propose(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    view_cfg: ViewConfig,
    cfg: ProposalConfig = ProposalConfig(),
) -> list[Proposal]:
    """Proposals from ``cfg.source`` for ``samples`` (their boxes, if any, are never read)."""
    blind = [dataclasses.replace(s, boxes=[]) for s in samples]
    fn = {"search": search_proposals, "attention": attention_proposals, "grounding": grounding_proposals}[cfg.source]
    return fn(model, processor, blind, view_cfg, cfg)


def proposal_quality(proposals: Sequence[Proposal], samples: Sequence[Sample], view_cfg: ViewConfig) -> dict[str, Any]:
    """Proposals against gold boxes (samples without boxes are not counted).

    ``hit_rate``: the proposal's crop holds every gold box whole; ``centre_hit_rate``: it holds
    the centre of the gold boxes' union; ``mean_iou``: IoU of the proposal's crop with the gold
    crop (both from :func:`vopd.views.evidence_region` with ``view_cfg``). A grounding fallback
    (no usable box: the whole image) is a miss, whatever it contains. Grounding proposals add
    how their answers parsed over all samples (:func:`vopd.proposals.grounding.status_counts`).
    """
    by_id = {s.id: s for s in samples}
    hits = centre = n = 0
    ious: list[float] = []
    for p in proposals:
        sample = by_id[p.sample_id]
        if not sample.boxes:
            continue
        size = load_image(sample.image, where=f"sample {sample.id!r}").size
        mine = evidence_region([p.box], size, view_cfg)
        gold = evidence_region(sample.boxes, size, view_cfg)
        union = Box.union(sample.boxes).clip(size)
        n += 1
        located = p.status not in FALLBACK_STATUSES
        hits += located and _contains(mine, union)
        cx, cy = union.center
        centre += located and mine.x1 <= cx <= mine.x2 and mine.y1 <= cy <= mine.y2
        ious.append(_iou(mine, gold))
    quality = {
        "n": n,
        "hit_rate": hits / n if n else None,
        "centre_hit_rate": centre / n if n else None,
        "mean_iou": sum(ious) / n if n else None,
    }
    if any(p.source == "grounding" for p in proposals):
        quality.update(status_counts([p.status for p in proposals]))
    return quality


def _contains(outer: Box, inner: Box) -> bool:
    return outer.x1 <= inner.x1 and outer.y1 <= inner.y1 and inner.x2 <= outer.x2 and inner.y2 <= outer.y2


def _iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    h = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = w * h
    return inter / (a.area + b.area - inter) if inter > 0 else 0.0


def with_proposed_boxes(samples: Sequence[Sample], proposals: Sequence[Proposal]) -> list[Sample]:
    """``samples`` with their gold boxes and ready-made crops replaced by the proposals' boxes."""
    by_id = {p.sample_id: p for p in proposals}
    missing = [s.id for s in samples if s.id not in by_id]
    if missing:
        raise ValueError(f"no proposal for {len(missing)} samples (first: {missing[0]!r})")
    return [dataclasses.replace(s, boxes=[by_id[s.id].box], teacher_image=None) for s in samples]


def read_proposals(path: str | Path, *, source: str | None = None) -> list[Proposal]:
    """Rows of a proposals JSONL file (of one ``source``, if given); later rows win per sample.

    A row cut short by a kill mid-write (or otherwise not a proposal) is skipped with a warning
    naming file and line (:func:`vopd.jsonl.read_records`): its sample is proposed again.
    """
    done: dict[str, Proposal] = {}
    for row in read_records(Path(path), ("id", "box", "score", "source")):
        if source is None or row.get("source") == source:
            done[row["id"]] = Proposal(
                row["id"], Box(*row["box"]), row["score"], row["source"], row.get("status", "ok")
            )
    return list(done.values())


def check_cache_model(cache: str | Path, source: str, model_name: str) -> None:
    """Refuse to reuse ``source`` proposals in ``cache`` that another model made.

    Rows older than the ``model`` field name none and are accepted.
    """
    others = {r.get("model") for r in read_records(Path(cache), ("id", "source")) if r["source"] == source}
    others -= {model_name, None}
    if others:
        raise ValueError(
            f"{cache} holds {source} proposals made by {', '.join(sorted(map(str, others)))}, not "
            f"{model_name}: delete that cache or write to another --out"
        )


def _image_key(image: Any) -> str:
    """Content hash of a sample's image (a path, encoded bytes or a PIL image)."""
    if isinstance(image, (str, Path)):
        return content_hash(image)
    data = image if isinstance(image, bytes) else image.tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def proposal_settings(cfg: ProposalConfig, model_name: str | None) -> dict[str, Any]:
    """What makes a proposal besides its image: the proposing model (name and a fingerprint of
    its weights) and every setting of ``cfg`` that changes the box (not the batch size)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "batch_size"}
    if model_name:
        local = Path(model_name).exists()
        settings["model"] = str(Path(model_name).resolve()) if local else model_name
        settings["weights"] = weights_fingerprint(model_name)
    return settings


def cached_proposals(
    path: str | Path, samples: Sequence[Sample], cfg: ProposalConfig, model_name: str | None
) -> dict[str, Proposal]:
    """The cached proposals of ``samples`` in ``path``; a row made otherwise (another model, weights,
    setting, or another image under the same id) is refused by name. Rows written before a field
    existed are not checked on that field."""
    wanted = {s.id: s for s in samples}
    settings = proposal_settings(cfg, model_name)
    done: dict[str, Proposal] = {}
    for n, row in enumerate(read_records(Path(path), ("id", "box", "score", "source")), 1):
        if row.get("source") != cfg.source or row["id"] not in wanted:
            continue
        recorded = row.get("made_with") if isinstance(row.get("made_with"), dict) else {}
        changed = settings_diff(recorded, settings)
        if not recorded and model_name and row.get("model") not in (None, model_name):  # rows before made_with
            changed = [f"model: {row['model']!r} -> {model_name!r}"]
        if not changed and row.get("image") is not None:
            here = _image_key(wanted[row["id"]].image)
            if row["image"] != here:
                changed = [f"image content: {row['image']} -> {here} (another image under the same id)"]
        if changed:
            raise OutputError(
                f"{path}:{n}: sample {row['id']!r} was proposed otherwise ({changed[0]}); reusing it would "
                "give this run another run's boxes: pass --overwrite (or delete that cache), or write to another "
                "--out / output_dir"
            )
        done[row["id"]] = Proposal(row["id"], Box(*row["box"]), row["score"], row["source"], row.get("status", "ok"))
    return done


def load_or_propose(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    view_cfg: ViewConfig,
    cfg: ProposalConfig,
    cache: str | Path | None = None,
    *,
    write: bool = True,
    model_name: str | None = None,
) -> list[Proposal]:
    """:func:`propose`, reusing (and, if ``write``, extending) a JSONL cache of earlier proposals.

    The cache holds one row per sample (``id``, ``box`` [x1, y1, x2, y2], ``score``, ``source``,
    ``status`` when it is not ``ok``, ``model`` when ``model_name`` is given, ``image``: the
    image's content hash, ``made_with``: :func:`proposal_settings`); rows of another source are
    ignored, so an interrupted run resumes where it stopped.

    Raises:
        OutputError: a cached row of one of ``samples`` was made by another model (or other
            weights at the same path), with other settings, or from another image under the same
            id (rows written before these fields existed are reused).
    """
    path = Path(cache) if cache else None
    done = cached_proposals(path, samples, cfg, model_name) if path and path.is_file() else {}
    todo = [s for s in samples if s.id not in done]
    made_with = proposal_settings(cfg, model_name) if todo and path and write else {}
    for chunk in _batches(todo, max(1, 4 * cfg.batch_size)):
        new = propose(model, processor, chunk, view_cfg, cfg)
        if path and write:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                end_with_newline(path)  # a row torn by a kill mid-write stays on a line of its own
            for p, s in zip(new, chunk):
                row = {
                    "id": p.sample_id,
                    "box": p.box.as_list(),
                    "score": p.score,
                    "source": p.source,
                    **({"model": model_name} if model_name else {}),
                    "image": _image_key(s.image),
                    "made_with": made_with,
                }
                append_record(path, {**row, **({"status": p.status} if p.status != "ok" else {})}, fsync=False)
        done.update({p.sample_id: p for p in new})
    return [done[s.id] for s in samples]


def crops_from_model(
    samples: Sequence[Sample],
    view_cfg: ViewConfig,
    model: Any,
    processor: Any,
    output_dir: str | Path,
    *,
    main: bool = True,
    thinking: bool | None = None,
    model_name: str | None = None,
) -> list[Sample]:
    """Training samples whose evidence box is the model's own proposal (``views.crop_source``).

    Gold boxes and ready-made crops are dropped before anything is computed; proposals are
    cached in ``output_dir/proposals.jsonl`` and reused on resume. ``model`` is the policy at the
    start of the run. Only the main process writes the cache: call it there first, then (after a
    barrier) in the others with ``main=False``, which read the main process's proposals, so every
    rank trains on the same crops (on resume the policy is the checkpoint's and would propose others).
    """
    cfg = ProposalConfig(source=view_cfg.crop_source, thinking=thinking)
    blind = [dataclasses.replace(s, boxes=[], teacher_image=None) for s in samples]
    proposals = load_or_propose(
        model, processor, blind, view_cfg, cfg, Path(output_dir) / PROPOSALS_FILE, write=main, model_name=model_name
    )
    keep = getattr(view_cfg, "proposal_keep", 1.0)
    if keep < 1.0:
        kept = surest(proposals, keep)
        if main:
            print(
                f"views.proposal_keep={keep:g}: training on the {len(kept)} of {len(proposals)} samples whose "
                f"{cfg.source} proposals are surest",
                flush=True,
            )
        ids = {p.sample_id for p in kept}
        blind, proposals = [s for s in blind if s.id in ids], kept
    return with_proposed_boxes(blind, proposals)


def surest(proposals: Sequence[Proposal], keep: float) -> list[Proposal]:
    """The ``keep`` fraction (at least one) of ``proposals`` with the highest scores, in their input order.

    Fallbacks without a usable box (grounding's ``degenerate`` / ``unparsed``) rank below every
    real proposal; ties go to the earlier proposal, so the choice is deterministic.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    n = max(1, round(keep * len(proposals))) if proposals else 0
    order = sorted(
        range(len(proposals)), key=lambda i: (proposals[i].status in FALLBACK_STATUSES, -proposals[i].score, i)
    )[:n]
    return [proposals[i] for i in sorted(order)]
