"""``vopd gap --crop-source search|attention|grounding``: the gap with crops the model proposes itself.

Any record file works, with boxes or without: the proposer never sees the boxes (they are
dropped first); where gold boxes exist, the proposals are measured against them (hit rate, IoU)
and the result says so. Proposals are cached in ``<out>/proposals.jsonl`` (resumable) and made
once, by the model given with ``--model`` (else the first checkpoint), so every checkpoint of a
``--checkpoints`` sweep is asked about the same crops.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["propose_gap_crops"]


def propose_gap_crops(
    samples: list[Any],
    backend: Any,
    view_cfg: Any,
    out: str | Path,
    *,
    model_name: str | None = None,
    thinking: bool | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """``samples`` with the model's proposals as their only evidence box, and a quality summary.

    Args:
        backend: a local Hugging Face backend (``.model``, ``.processor``); servers cannot
            return the log-probs or attention the proposals are scored with.
        model_name: the proposing model (path or id), written into each cached row; a cache in
            ``out`` made by another model is refused rather than reused.
        thinking: the chat template's thinking switch for the proposer's prompts (``--thinking``).

    Raises:
        ValueError: ``backend`` is not a local model, or ``out`` caches another model's proposals.
    """
    from vopd.proposals import PROPOSALS_FILE, ProposalConfig, load_or_propose, proposal_quality, with_proposed_boxes

    model, processor = getattr(backend, "model", None), getattr(backend, "processor", None)
    if model is None or processor is None:
        raise ValueError(
            f"--crop-source {view_cfg.crop_source} needs a local model (--backend hf with --model); "
            f"the {type(backend).__name__} cannot score crops or return attention"
        )
    cache = Path(out) / PROPOSALS_FILE
    proposals = load_or_propose(
        model,
        processor,
        samples,
        view_cfg,
        ProposalConfig(source=view_cfg.crop_source, thinking=thinking),
        cache,
        model_name=model_name,
    )
    info = {
        "source": view_cfg.crop_source,
        "n_proposed": len(proposals),
        "file": os.path.basename(cache),
        **proposal_quality(proposals, samples, view_cfg),
    }
    return with_proposed_boxes(samples, proposals), info
