"""Sharded checkpoints (``checkpoint.format=dcp``, the default under ``parallel.strategy=fsdp2``).

Every rank writes its own shards of the student, the teacher (EMA parameters at their fp32
master precision) and the AdamW moments with ``torch.distributed.checkpoint`` (DCP) into
``checkpoint-N/trainer_state/shards/``: safetensors files of about :data:`FILE_BYTES` of one
rank's shards each, each tensor's place in the full tensor recorded as JSON in the file's header
(DCP's Hugging Face storage layout, so nothing in a checkpoint is unpickled). Nothing is gathered:
each rank holds only its own shards (plus the serialised bytes of the file being written) while
saving. Loading reads, on every rank, only the
slices of its own shards, at any world size (DCP reshards).

The rest of the checkpoint protocol is `vopd.checkpoint`'s: the shards go into the temporary
folder, rank 0 adds the model config, processor, scheduler / RNG state and ``state.json`` (which
lists every file with its size, shards included), fsyncs and renames the folder into place. So
the atomic-commit, verification and fallback guarantees are unchanged. The HF weights
(``model*.safetensors``) are not part of a sharded checkpoint; :func:`export_hf` assembles them
from the shards one tensor at a time (``vopd export``; the final checkpoint of a run gets them
automatically), so a plain HF folder never needs a full copy of the model in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SHARD_DIR = "shards"  # under trainer_state/
_DCP_INFO = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint's header key for each tensor's offsets


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _untied(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the second name of a tied parameter or buffer (safetensors stores each
    storage once; loading the first name fills both). Found on the module, so it works on meta too."""
    first: dict[int, str] = {}
    drop = set()
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in tensors:
        if id(t) in first:
            drop.add(name)
        else:
            first[id(t)] = name
    return {k: v for k, v in state.items() if k not in drop}


def model_shards(policy: nn.Module) -> dict[str, Tensor]:
    """The student's state: sharded (DTensor) parameters and buffers by their module names, no copy."""
    return _untied(policy, {k: v.detach() for k, v in policy.state_dict().items()})


def teacher_shards(teacher: Any) -> dict[str, Tensor]:
    """A `vopd.parallel.ShardedTeacher`'s state without a copy: the EMA's fp32 master shards stand in
    for the low-precision parameters they keep (as in its full `state_dict`)."""
    teacher._release()
    state = {k: v.detach() for k, v in teacher.model.state_dict().items()}
    params = dict(teacher.model.named_parameters())
    for name, master in teacher.master.items():
        p = params[name]
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import DTensor

            # from_local keeps ``master`` as the local tensor, so a load writes straight into it
            state[name] = DTensor.from_local(master, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        else:
            state[name] = master
    return _untied(teacher.model, state)


def optimizer_shards(root: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict]]:
    """``(tensor state keyed by parameter name, param_groups)`` of a sharded optimiser (no gather).

    The tensors (AdamW moments as DTensors, the step counters) go into the shards; the
    param_groups (learning rates, betas, parameter names) are plain values for the trainer state.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=False))
    return full["state"], full["param_groups"]


def first_non_finite(state: dict[str, Any]) -> str | None:
    """The name of the first floating tensor (this rank's shard) with a NaN or inf, else None."""

    def walk(tree: Any, prefix: str) -> Iterator[tuple[str, Tensor]]:
        if isinstance(tree, Tensor):
            yield prefix, tree
        elif isinstance(tree, dict):
            for k, v in tree.items():
                yield from walk(v, f"{prefix}.{k}" if prefix else str(k))

    for name, t in walk(state, ""):
        local = _local(t)
        if torch.is_floating_point(local) and local.numel() and not bool(torch.isfinite(local).all()):
            return name
    return None


def sharded_state(policy: nn.Module, teacher: Any, root: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """``({"model", "teacher", "optim"}, param_groups)``: what :func:`save_shards` writes."""
    optim, groups = optimizer_shards(root, optimizer)
    return {"model": model_shards(policy), "teacher": teacher_shards(teacher), "optim": optim}, groups


#: About how many bytes of its own shards a rank puts in one file. safetensors serialises a whole
#: file in memory (twice its size at the peak), so smaller files bound a rank's save memory.
FILE_BYTES = 256 << 20


def file_plan(state: dict[str, Any], world: int, file_bytes: int = FILE_BYTES) -> dict[str, int]:
    """Flattened tensor name -> file number (1, 2, ...), the same on every rank: consecutive tensors
    fill a file until about ``file_bytes`` of each rank's share (full size / ``world``) is in it."""
    plan: dict[str, int] = {}
    index, used = 1, 0

    def walk(tree: Any, prefix: str) -> None:
        nonlocal index, used
        for key, value in tree.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                walk(value, name)
            elif isinstance(value, Tensor):
                share = value.numel() * value.element_size() // max(world, 1)
                if used and used + share > file_bytes:
                    index, used = index + 1, 0
                plan[name] = index
                used += share

    walk(state, "")
    return plan


def save_shards(folder: Path, state: dict[str, Any], *, file_bytes: int | None = None) -> None:
    """Write this rank's shards of ``state`` under ``folder``, about ``file_bytes`` (default
    :data:`FILE_BYTES`) per file (collective: every rank calls it)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    plan = file_plan(state, dist.get_world_size(), file_bytes or FILE_BYTES)
    writer = HuggingFaceStorageWriter(str(folder), fqn_to_index_mapping=plan, save_distributed=True)
    dcp.save(state, storage_writer=writer)


def load_shards(folder: Path, state: dict[str, Any]) -> None:
    """Fill the (sharded) tensors of ``state`` in place from ``folder`` at any world size (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))


@torch.no_grad()
def load_sharded_checkpoint(
    checkpoint: Path, *, policy: nn.Module, teacher: Any, root: nn.Module, optimizer: torch.optim.Optimizer, saved: dict
) -> None:
    """Restore student, teacher and optimiser shards of a sharded checkpoint (collective).

    ``saved``: the checkpoint's trainer state (`vopd.checkpoint.load_trainer_state`), whose
    optimiser ``param_groups`` replace the optimiser's.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from vopd.checkpoint import STATE_DIR

    state, _ = sharded_state(policy, teacher, root, optimizer)
    load_shards(Path(checkpoint) / STATE_DIR / SHARD_DIR, state)
    # low-precision EMA parameters: refresh them from the fp32 masters just loaded
    params = dict(teacher.model.named_parameters())
    for name, master in teacher.master.items():
        _local(params[name]).copy_(master)
    groups = saved["optimizer"]["param_groups"]
    set_optimizer_state_dict(
        root,
        optimizer,
        optim_state_dict={"state": state["optim"], "param_groups": groups},
        options=StateDictOptions(full_state_dict=False),
    )


def _headers(folder: Path) -> Iterator[tuple[Path, dict[str, Any], dict[str, list[int]]]]:
    """``(file, tensor header, offsets)`` of every shard file in ``folder``."""
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", {}) or {}
        info = json.loads(meta.get(_DCP_INFO, "{}"))
        offsets = {k: v["saved_offsets"] for k, v in info.items()}
        yield path, header, offsets


def shard_index(folder: Path, prefix: str) -> dict[str, list[tuple[Path, list[int], dict[str, Any]]]]:
    """Tensor name (under ``prefix``, e.g. ``"model."``) -> ``(file, offsets, header entry)`` of each
    of its chunks, in the order the names were saved."""
    index: dict[str, list[tuple[Path, list[int], dict[str, Any]]]] = {}
    for path, header, offsets in _headers(folder):
        for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if key.startswith(prefix):
                index.setdefault(key, []).append((path, offsets.get(key, [0] * len(entry["shape"])), entry))
    return index


def assemble(name: str, chunks: list[tuple[Path, list[int], dict[str, Any]]]) -> Tensor:
    """The full tensor ``name`` from its chunks (reads only that tensor's bytes from each file)."""
    from safetensors import safe_open

    parts = []
    for path, offsets, _ in chunks:
        with safe_open(str(path), framework="pt") as f:
            parts.append((offsets, f.get_tensor(name)))
    shape = [max(o[d] + t.shape[d] for o, t in parts) for d in range(parts[0][1].dim())]
    if not shape:
        return parts[0][1].clone()
    full = torch.empty(shape, dtype=parts[0][1].dtype)
    for offsets, t in parts:
        full[tuple(slice(o, o + s) for o, s in zip(offsets, t.shape))] = t
    return full


HF_NAMES = "hf_names.json"  # under trainer_state/: student key -> the name transformers saves it under


def hf_names(model: nn.Module) -> dict[str, str]:
    """Each state-dict key of ``model`` -> the name ``save_pretrained`` writes it under.

    transformers renames some keys between the loaded module tree and the checkpoint format (e.g.
    ``model.language_model.*`` -> ``model.*`` for Qwen2-VL); the export must write the checkpoint's
    names. Computed on meta tensors (no memory). A conversion that changes tensors rather than names
    (fused experts) is refused: that model needs ``checkpoint.format=hf``.
    """
    from transformers.core_model_loading import revert_weight_conversion

    metas = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model_shards(model).items()}
    owner = {id(t): k for k, t in metas.items()}
    names = {}
    for new, t in revert_weight_conversion(model, dict(metas)).items():
        if id(t) not in owner:
            raise ValueError(
                f"{type(model).__name__} converts tensors when saved ({new}): checkpoint.format=dcp cannot export "
                "it one tensor at a time; use checkpoint.format=hf"
            )
        names[owner[id(t)]] = new
    return names


def export_hf(checkpoint: Path, out: Path, *, max_file_bytes: int = 2 << 30) -> list[Path]:
    """Write the student of a sharded checkpoint as HF weights (``model*.safetensors`` plus an index
    when there are several files) into ``out``; returns the files written.

    One tensor is assembled at a time and at most ``max_file_bytes`` of tensors are held before a
    file is written, so the host memory is bounded by one output file, not the model. Tied
    weights (written once in the shards) are written once too: transformers re-ties them on load.
    """
    from safetensors.torch import save_file

    from vopd.checkpoint import STATE_DIR, CheckpointError

    folder = Path(checkpoint) / STATE_DIR / SHARD_DIR
    index = shard_index(folder, "model.")
    names_file = Path(checkpoint) / STATE_DIR / HF_NAMES
    names = json.loads(names_file.read_text()) if names_file.is_file() else {}
    if not index:
        raise CheckpointError(f"{folder}: no student shards (not a sharded vopd checkpoint?)")
    out.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    sizes = [0]
    for name in index:  # plan the files from the headers (no tensor read yet)
        nbytes = _nbytes(index[name])
        if groups[-1] and sizes[-1] + nbytes > max_file_bytes:
            groups.append([])
            sizes.append(0)
        groups[-1].append(name)
        sizes[-1] += nbytes
    written, weight_map = [], {}
    for i, group in enumerate(groups, 1):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in group:
            key = name[len("model.") :]
            tensors[names.get(key, key)] = assemble(name, index[name])
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        written.append(out / fname)
        del tensors
    if len(groups) > 1:
        idx = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
        written.append(out / "model.safetensors.index.json")
    return written


_DTYPE_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _nbytes(chunks: list[tuple[Path, list[int], dict[str, Any]]]) -> int:
    """Bytes of the full tensor, from its chunks' headers."""
    total = 0
    for _, _, entry in chunks:
        n = _DTYPE_BYTES.get(entry["dtype"], 4)
        for d in entry["shape"]:
            n *= d
        total += n
    return total


class ConfigWithExport:
    """Stands in for the model in `vopd.checkpoint.save_checkpoint`: writes the model's config (and
    generation config); with ``export``, also the HF weights assembled from the shards already in
    the folder, so the checkpoint is a plain HF folder as well."""

    def __init__(self, policy: nn.Module, *, export: bool):
        self.policy, self.export = policy, export

    def state_dict(self) -> dict[str, Tensor]:
        return {}  # the tensors are in the shards (checked for NaN / inf on every rank before writing)

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        from vopd.checkpoint import STATE_DIR

        (Path(folder) / STATE_DIR).mkdir(exist_ok=True)
        (Path(folder) / STATE_DIR / HF_NAMES).write_text(json.dumps(hf_names(self.policy), indent=1))
        self.policy.config.save_pretrained(folder)
        if getattr(self.policy, "can_generate", lambda: False)():
            self.policy.generation_config.save_pretrained(folder)
        if self.export:
            export_hf(Path(folder), Path(folder))


def save_sharded_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    policy: nn.Module,
    teacher: Any,
    root: nn.Module,
    optimizer: torch.optim.Optimizer,
    processor: Any,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int = 0,
    export: bool = False,
    say: Any = print,
) -> Path:
    """Write ``checkpoint-<step>`` with every rank's shards (collective: every rank calls it).

    Each rank checks its own shards for NaN / inf and writes them into rank 0's temporary folder;
    rank 0 then completes the folder (`vopd.checkpoint.save_checkpoint`: config, processor,
    scheduler, RNG, ``state.json`` listing every file, fsync, rename, pruning). Any rank's failure
    fails the save on every rank, and the temporary folder is removed.

    Raises:
        CheckpointError: a shard holds NaN / inf, or a rank could not write (the message says which).
    """
    import os
    import shutil

    import torch.distributed as dist

    from vopd.checkpoint import STATE_DIR, CheckpointError, save_checkpoint, temporary_folder

    rank = dist.get_rank()
    state, groups = sharded_state(policy, teacher, root, optimizer)
    bad = first_non_finite(state)
    problem = first_error(f"rank {rank}: {bad} holds NaN or inf values" if bad else None)
    if problem:
        raise CheckpointError(f"refusing to write checkpoint-{step}: {problem}")
    pid = [os.getpid()]
    dist.broadcast_object_list(pid, src=0)  # one temporary folder for all ranks: rank 0's
    tmp = temporary_folder(output_dir, step, pid[0])
    if rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    dist.barrier()
    try:
        save_shards(tmp / STATE_DIR / SHARD_DIR, state)
        error = None
    except Exception as err:  # DCP re-raises every rank's failure on every rank
        error = f"rank {rank}: {type(err).__name__}: {err}"
    error = first_error(error)
    path, final_error = None, error
    if rank == 0:
        if error:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                path = save_checkpoint(
                    output_dir,
                    step,
                    model=ConfigWithExport(policy, export=export),
                    processor=processor,
                    teacher_state={},
                    optimizer=optimizer,
                    optimizer_state={"param_groups": groups},
                    scheduler=scheduler,
                    extra={**extra, "format": "dcp"},
                    keep=keep,
                    say=say,
                    tmp=tmp,
                )
            except Exception as err:
                final_error = f"rank 0: {err}"
    final_error = _broadcast(final_error)
    if final_error:
        raise CheckpointError(
            f"could not write checkpoint-{step} under {output_dir} ({final_error}); the earlier checkpoints "
            "are untouched and the temporary folder was removed. Fix the cause (free space?) and --resume"
        )
    return path if path is not None else Path(output_dir) / f"checkpoint-{step}"


def first_error(message: str | None) -> str | None:
    """Every rank's message gathered (collective): the first one (with how many ranks had one), or None on all."""
    import torch.distributed as dist

    got: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(got, message)
    found = [m for m in got if m]
    if not found:
        return None
    return found[0] + (f" (and {len(found) - 1} other rank(s))" if len(found) > 1 else "")


def _broadcast(message: str | None) -> str | None:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """``vopd export``: write the student of a vopd checkpoint (sharded or not) as a plain HF folder.

    The checkpoint is verified first (`vopd.checkpoint.check_checkpoint`); the config, processor and
    generation files are copied, the weights assembled from the shards (`export_hf`) or copied.
    ``out`` is written under a temporary name and renamed when complete; an existing non-empty
    ``out`` is refused (nothing vopd did not write is overwritten).

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: ``checkpoint`` is not a vopd checkpoint (e.g. the run folder or a plain HF folder).
        CheckpointError: the checkpoint is broken.
        FileExistsError: ``out`` exists and is not empty.
        OutputError: ``out`` lies inside a checkpoint folder (pruning would delete it).
    """
    import os
    import shutil

    from vopd.checkpoint import STATE_DIR, check_checkpoint
    from vopd.outputs import OutputError, public_weight_modes

    ckpt, out = Path(checkpoint), Path(out)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint folder")
    if not (ckpt / STATE_DIR / "state.json").is_file():
        # Not CheckpointError: its advice (remove the broken folder) is wrong for a run folder or an HF folder.
        inside = sorted(p.name for p in ckpt.glob("checkpoint-*") if p.is_dir()) if ckpt.is_dir() else []
        hint = (
            f"it holds {', '.join(inside)}: name one of them"
            if inside
            else "a plain Hugging Face folder needs no export"
        )
        raise ValueError(
            f"{ckpt} is not a vopd checkpoint (no {STATE_DIR}/state.json); "
            f"give a checkpoint-N folder of a vopd run ({hint})"
        )
    check_checkpoint(ckpt)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: choose another --out (nothing is overwritten)")
    # Pruning deletes a vopd checkpoint folder whole: an export inside one would go with it.
    inside = next((p for p in out.resolve().parents if (p / STATE_DIR / "state.json").is_file()), None)
    if inside is not None:
        raise OutputError(
            f"{out} is inside the checkpoint {inside}: pruning would delete the export with it; "
            "choose an --out outside every checkpoint-N folder"
        )
    sharded = (ckpt / STATE_DIR / SHARD_DIR).is_dir()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for item in sorted(ckpt.iterdir()):
            if item.name == STATE_DIR or (sharded and item.name.startswith("model") and "safetensors" in item.name):
                continue  # trainer state stays behind; sharded: the weights are assembled below, not copied
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        if sharded:
            export_hf(ckpt, tmp)
        public_weight_modes(tmp)  # copies keep an older checkpoint's 0600; a server may run as another user
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
