"""The vLLM server's weight snapshot written from an FSDP2-sharded student (``rollout.engine=vllm``
with ``parallel.strategy=fsdp2``), without a full copy of the model on any rank.

A safetensors file is an 8-byte header length, a JSON header (each tensor's name, dtype, shape and
byte range) and the tensors' bytes, row-major, back to back. The header needs only shapes and dtypes,
which every rank knows from its sharded (DTensor) parameters; FSDP2 shards each tensor along dim 0,
so a rank's local shard is one contiguous byte range of the full tensor in that file. Hence:

1. Rank 0 writes the header and sizes the file (``model.safetensors.tmp``; sparse, no data yet),
   and a token file holding a nonce it sends to every rank.
2. **direct** (every rank reads that nonce in the folder: one machine, or storage shared by all
   nodes): each rank writes its own shard's bytes at their offset (``os.pwrite``); nothing is
   gathered, no rank ever holds more than its own shards. Every rank fsyncs before the barrier
   that ends the step.
3. **gather** (some rank does not see rank 0's files, e.g. another node without shared storage): the
   tensors are gathered one at a time (``DTensor.full_tensor``, a collective all ranks enter in
   the same order) and rank 0 writes each; every rank holds at most one full tensor at a time.
4. Rank 0 renames the file into place (``model.safetensors``; the server never reads a half-written
   one), removes other weight files of an earlier snapshot, and writes ``config.json`` and
   ``generation_config.json``.

The tensor names are those ``save_pretrained`` writes (`vopd.sharded_checkpoint.hf_names`), the
names the server loaded at start; tied weights are written once. Every step is collective and
every rank's failure is raised on every rank (no rank waits forever for a failed one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vopd.sharded_checkpoint import first_error, hf_names, model_shards

__all__ = ["WEIGHTS_FILE", "is_sharded", "snapshot_plan", "write_sharded_snapshot"]

WEIGHTS_FILE = "model.safetensors"
_TOKEN = ".vopd-snapshot-token"  # rank 0's nonce: which ranks see its folder

_ST_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def is_sharded(model: nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP2 shards (DTensors)."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def snapshot_plan(model: nn.Module) -> tuple[bytes, list[tuple[str, Tensor, int]]]:
    """``(header bytes, [(saved name, state tensor, byte offset of its data in the file)])``.

    Computed from shapes and dtypes only (no communication, no copy); the same on every rank.
    The header is padded with spaces to a multiple of 8 bytes, as safetensors does.
    """
    state = model_shards(model)
    try:
        names = hf_names(model)
    except ValueError as err:  # the same on every rank: all raise
        raise ValueError(
            f"rollout.engine=vllm with parallel.strategy=fsdp2 writes the snapshot from the shards, tensor by "
            f"tensor, which this model's save format does not allow ({err}); use rollout.engine=hf or "
            "parallel.strategy=ddp"
        ) from None
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    plan, offset = [], 0
    for key, t in state.items():
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"{key}: dtype {t.dtype} has no safetensors name")
        name = names.get(key, key)
        nbytes = t.numel() * t.element_size()  # a DTensor's numel and shape are the full tensor's
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        plan.append((name, t, offset))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, plan


def _first_row(t: Tensor) -> int:
    """First row of this rank's dim-0 shard of the DTensor ``t`` (torch.chunk's ceil-sized chunks)."""
    from torch.distributed.tensor import Shard

    (placement,) = t.placements
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise ValueError(f"unexpected placement {placement} (FSDP2 shards dim 0)")
    world, rank = t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-t.shape[0] // world)
    return min(rank * chunk, t.shape[0])


def _pwrite(fd: int, t: Tensor, at: int) -> None:
    """Write ``t``'s bytes at file offset ``at`` (no copy for a contiguous CPU tensor)."""
    if t.numel() == 0:
        return
    data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    while data:  # pwrite may write less than asked (large writes)
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n


def write_sharded_snapshot(model: nn.Module, folder: str | Path, *, mode: str = "auto") -> str:
    """Write ``model``'s weights (FSDP2-sharded) as ``folder/model.safetensors`` (collective).

    ``mode``: ``"direct"`` (each rank writes its own shards into the file), ``"gather"`` (rank 0
    writes each tensor after a one-tensor gather) or ``"auto"`` (direct when every rank sees rank 0's
    file). Returns the mode used. Rank 0 also writes the model's config and generation config.

    Raises:
        RuntimeError: on every rank, when any rank failed (the message names the rank).
        ValueError: on every rank, when the model's save format converts tensors (fused experts).
    """
    import torch.distributed as dist

    if mode not in ("auto", "direct", "gather"):
        raise ValueError(f"mode={mode!r}: one of auto, direct, gather")
    rank = dist.get_rank()
    folder = Path(folder)
    final = folder / WEIGHTS_FILE
    tmp = folder / f"{WEIGHTS_FILE}.tmp"
    header, plan = snapshot_plan(model)
    base = len(header)
    size = base + sum(t.numel() * t.element_size() for _, t, _ in plan)
    token = folder / _TOKEN
    nonce = [os.urandom(8).hex()]
    dist.broadcast_object_list(nonce, src=0)  # rank 0's, new for every write
    error = None
    if rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as fh:
                fh.write(header)
                fh.truncate(size)  # sparse: the ranks fill it
            token.write_text(nonce[0])
        except Exception as err:  # noqa: BLE001 - any kind: the other ranks wait in the agreement below
            error = _failed(0, err)
    _raise(first_error(error), folder)
    if mode == "auto":  # every rank sees rank 0's files (same machine or shared storage): direct
        # The nonce, not the path: another node's folder of the same name (an earlier run's) is not rank 0's.
        try:
            sees = token.read_text() == nonce[0] and tmp.stat().st_size == size
        except OSError:
            sees = False
        mode = "gather" if first_error(None if sees else f"rank {rank} does not see {tmp}") else "direct"
    error = None
    if mode == "direct":
        try:
            fd = os.open(tmp, os.O_WRONLY)
            try:
                for _, t, offset in plan:
                    if hasattr(t, "device_mesh"):
                        local = t.to_local()
                        row_bytes = local[0].numel() * local.element_size() if local.dim() and len(local) else 0
                        _pwrite(fd, local, base + offset + _first_row(t) * row_bytes)
                    elif rank == 0:  # a replicated tensor (buffer): one writer
                        _pwrite(fd, t, base + offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except Exception as err:  # noqa: BLE001 - not only OSError: a rank raising alone would hang the others
            error = _failed(rank, err)
    else:  # rank 0 records its errors and keeps entering the gathers: the other ranks are in them too
        fd = -1
        if rank == 0:
            try:
                fd = os.open(tmp, os.O_WRONLY)
            except OSError as err:
                error = _failed(0, err)
        try:
            for _, t, offset in plan:
                full = t.full_tensor() if hasattr(t, "device_mesh") else t  # collective: same order everywhere
                if fd >= 0 and error is None:
                    try:
                        _pwrite(fd, full, base + offset)
                    except Exception as err:  # noqa: BLE001 - rank 0 must keep entering the gathers
                        error = _failed(0, err)
                del full
            if fd >= 0 and error is None:
                try:
                    os.fsync(fd)
                except OSError as err:
                    error = _failed(0, err)
        finally:
            if fd >= 0:
                os.close(fd)
    error = first_error(error)
    if rank == 0 and error is not None:
        tmp.unlink(missing_ok=True)
        token.unlink(missing_ok=True)
    if rank == 0 and error is None:
        try:
            os.replace(tmp, final)
            token.unlink(missing_ok=True)
            for stale in [*folder.glob("model-*.safetensors"), folder / "model.safetensors.index.json"]:
                stale.unlink(missing_ok=True)  # an earlier snapshot's files: the server would load them too
            model.config.save_pretrained(folder)
            if getattr(model, "can_generate", lambda: False)():
                model.generation_config.save_pretrained(folder)
        except Exception as err:  # noqa: BLE001 - the other ranks wait in the agreement below
            error = _failed(0, err)
    _raise(first_error(error), folder)
    return mode


def _failed(rank: int, err: BaseException) -> str:
    return f"rank {rank}: {type(err).__name__}: {err}"


def _raise(error: str | None, folder: Path) -> None:
    if error:
        raise RuntimeError(f"could not write the vLLM weight snapshot under {folder}: {error}")
