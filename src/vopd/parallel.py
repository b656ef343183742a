"""Sharded training with FSDP2 (``parallel.strategy=fsdp2``): student and teacher sharded alike.

Plan: every module whose class is in the model's ``_no_split_modules`` (decoder layers, vision
blocks) becomes its own FSDP2 unit, gathered just before it runs and freed right after; the
rest (embeddings, LM head, final norm, vision merger) forms the root unit, a wrapper around the
model. The teacher copy gets the *same* plan, so each of its local shards lines up with the
student's and the EMA update is a local ``torch._foreach_lerp_`` with no communication.

Why the root is a wrapper and is gathered explicitly: vopd calls the model's parts directly
(the backbone for hidden states, the LM head chunk by chunk in the fused loss, ``generate`` for
rollouts), not only ``model.forward``. The student wrapper is `vopd.scoring.ResponseHidden`,
whose forward FSDP2 hooks; with ``reshard_after_forward=False`` its root parameters (LM head
included) stay gathered from the forward until the backward has reduce-scattered their
gradients, so the fused chunked loss runs unchanged on the plain gathered head (no extra
gather: the root's own all-gather is the communication; its memory is in
`benchmarks/results/memory_strategies.md`). Rollouts run inside
:func:`root_gathered`; the teacher's root is gathered at its first scoring of a step and freed
before its EMA update.

Loading: from a folder of safetensors weights the model is built on the meta device, sharded, and
each rank reads only its own rows (:class:`WeightFiles`); the teacher's shards are copied from the
student's (:func:`build_sharded`), so no rank holds a full copy.

Checkpoints: with ``checkpoint.format=dcp`` (the default under fsdp2) every rank writes its own
shards (`vopd.sharded_checkpoint`). With ``checkpoint.format=hf`` the student and teacher are
gathered to full tensors on rank 0 and written in the ordinary layout (a plain HF folder +
``trainer_state``), the optimiser state as a full, name-keyed state dict; on resume every rank
reads the full state and keeps its own shard. Both resume at another world size. Cost of ``hf``:
rank 0 holds one full copy of the optimiser state in host memory while saving (72 GB at 9B).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any, NoReturn

import torch
from torch import Tensor, nn


def ensure_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group; a plain 1-process run gets a private 1-rank one."""
    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_initialized():
        return
    if launched > 1:  # the launcher started several processes but accelerate set up none of them as such
        raise RuntimeError(
            f"{launched} processes were launched but this one runs alone (no process group): on a machine "
            "without GPUs set device=cpu so that accelerate joins the processes (gloo)"
        )
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="vopd-pg-"), "store"), 1)
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=store, rank=0, world_size=1)


def close_process_group() -> None:
    """Destroy the default process group, if any, before the interpreter exits.

    Left to interpreter teardown, gloo's C++ worker threads can outlive Python and abort the process
    ("terminate called without an active exception", SIGABRT) after a run that finished cleanly;
    torchrun then reports the rank as failed. Local to this process: no collective, so it cannot hang
    when another rank has already failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End this launcher rank now with ``code``, without interpreter teardown.

    Even with its process group destroyed (`close_process_group`), a torchrun rank could abort in
    teardown after a run that finished and saved ("terminate called without an active exception":
    a C++ thread of gloo or FSDP2's device mesh outlives Python), and torchrun then reports the run
    as failed. Everything a run writes is closed and fsynced before this; logging and the standard
    streams are flushed here, then ``os._exit``.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed (e.g. after a broken pipe): nothing left to write
            pass
    os._exit(code)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP2 units: instances of the classes in ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(
            f"{type(model).__name__} names no _no_split_modules: no per-layer FSDP2 plan; use parallel.strategy=ddp"
        )
    return units


def apply_fsdp2(root: nn.Module, model: nn.Module, *, device: torch.device, param_dtype: torch.dtype | None) -> None:
    """Shard ``model``'s layers / blocks, then ``root`` (a wrapper around ``model``), in place.

    ``param_dtype`` (e.g. bf16) is the gathered compute dtype; the sharded parameters, the
    optimiser and the gradient reduction stay in the parameters' own dtype (fp32 master weights).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def _lazy_init(root: nn.Module) -> None:
    # FSDP2 decides which unit is the root when the first forward runs; rollouts and the teacher
    # reach the model's parts without the root's forward, so settle it here. (torch private API:
    # FSDPModule has no public lazy-init hook in torch 2.13.)
    root._get_fsdp_state()._lazy_init()


def gather_root(root: nn.Module) -> None:
    """All-gather the root unit's own parameters (not the layers': those gather when they run)."""
    _lazy_init(root)
    root.unshard()


@contextlib.contextmanager
def root_gathered(root: nn.Module) -> Iterator[None]:
    """The root unit's parameters (embeddings, LM head, norms) gathered inside the block."""
    gather_root(root)
    try:
        yield
    finally:
        root.reshard()


class ShardedSampling:
    """A rollout engine whose ``sample`` runs with the student's root unit gathered."""

    def __init__(self, engine: Any, root: nn.Module):
        self.engine = engine
        self.root = root

    def sample(self, *args: Any, **kwargs: Any) -> Any:
        with root_gathered(self.root), torch.no_grad():
            return self.engine.sample(*args, **kwargs)

    def step_metrics(self) -> dict[str, float]:
        return self.engine.step_metrics()

    def close(self) -> None:
        self.engine.close()


class TeacherRoot(nn.Module):
    """The teacher copy's root unit (its forward never runs: see :func:`root_gathered`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: Tensor) -> Tensor:
    """The full tensor of a (possibly sharded) tensor, on CPU. Collective: every rank calls it."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()


class ShardedTeacher:
    """A frozen or EMA teacher sharded with the student's plan (the `vopd.teacher.Teacher` protocol).

    The EMA keeps `vopd.teacher.CopyTeacher`'s arithmetic: parameters are matched by name and
    shape; a low-precision (bf16) copy averages in fp32 master shards and is refreshed from them;
    an fp32 copy averages in place. Each rank does this on its own shards only.
    """

    def __init__(self, kind: str, root: TeacherRoot, student: nn.Module, *, rate: float):
        from vopd.teacher import CopyTeacher, matched_parameters

        if kind not in ("ema", "frozen", "external"):
            raise ValueError(
                f"teacher.kind={kind} is not supported with parallel.strategy=fsdp2 (use ema, frozen or external)"
            )
        self.kind, self.root, self.rate = kind, root, rate
        self.model = root.model
        self._scorer = CopyTeacher(self.model, kind="frozen")  # scoring only; the EMA is done here
        self._gathered = False
        # another checkpoint (external) pairs with nothing; a copy's parameters must match by name and shape
        self._pairs = [] if kind == "external" else matched_parameters(self.model, student)
        self._names = [n for n, _ in student.named_parameters()]
        self.master: dict[str, Tensor] = {}
        if kind == "ema":  # fp32 master shards of the low-precision parameters, from the exact student weights
            for name, (p_tgt, p_src) in zip(self._names, self._pairs):
                if p_tgt.dtype.is_floating_point and torch.finfo(p_tgt.dtype).bits < 32:
                    self.master[name] = _local(p_src).detach().to(torch.float32, copy=True)

    def gather(self) -> None:
        """Gather the teacher's root unit (kept until the update: the loss reads the head chunk by chunk)."""
        if not self._gathered:
            gather_root(self.root)
            self._gathered = True

    def score(self, batch: Any, mask_B_T: Tensor) -> Any:
        self.gather()
        return self._scorer.score(batch, mask_B_T)

    def _release(self) -> None:
        if self._gathered:
            self.root.reshard()
            self._gathered = False

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        self._release()
        if self.kind != "ema":
            return
        from vopd.teacher import matched_parameters

        pairs = matched_parameters(self.model, student)  # the sharded parameters (after _release)
        fp32_t, fp32_s, masters, low_t, low_s = [], [], [], [], []
        for name, (p_tgt, p_src) in zip(self._names, pairs):
            t, s = _local(p_tgt), _local(p_src).detach()
            if name in self.master:
                masters.append(self.master[name])
                low_t.append(t)
                low_s.append(s.to(torch.float32))
            else:
                fp32_t.append(t)
                fp32_s.append(s.to(t.dtype))
        if fp32_t:
            torch._foreach_lerp_(fp32_t, fp32_s, self.rate)
        if masters:
            torch._foreach_lerp_(masters, low_s, self.rate)
            torch._foreach_copy_(low_t, masters)

    def state_dict(self) -> dict[str, Tensor]:
        """Full tensors (collective: every rank calls it); EMA parameters at fp32 master precision."""
        self._release()
        out = {k: _full(v) for k, v in self.model.state_dict().items()}
        params = dict(self.model.named_parameters())
        for name, master in self.master.items():
            p = params[name]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor

                master_d = DTensor.from_local(master, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                out[name] = _full(master_d)
            else:
                out[name] = master.detach().cpu()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load full tensors (every rank passes the whole state and keeps its own shards)."""
        self._release()
        current = self.model.state_dict()
        missing, extra = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        if missing or extra:
            raise ValueError(f"teacher state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, target in current.items():
            _local(target).copy_(_shard_of(state[name], target))
        for name, master in self.master.items():
            master.copy_(_shard_of(state[name], current[name]).to(torch.float32))


class ShardedTrustRegion(ShardedTeacher):
    """``teacher.kind=trust_region`` under FSDP2: a frozen reference sharded like the student, its
    logits mixed with the current student's (`vopd.teacher.TrustRegionTeacher`'s arithmetic).

    Scoring the current student needs its root unit (LM head, embeddings) gathered; it is gathered
    here, before the student's own forward, which keeps it gathered (``reshard_after_forward=False``)
    until the backward frees it: the same gather the step already pays, held a little earlier.
    """

    def __init__(self, root: TeacherRoot, student_root: nn.Module, student: nn.Module, *, mix: float):
        from vopd.teacher import TrustRegionTeacher

        super().__init__("frozen", root, student, rate=0.0)
        self.kind = "trust_region"
        self.student_root = student_root
        self._mixer = TrustRegionTeacher(self.model, student, mix)

    def score(self, batch: Any, mask_B_T: Tensor) -> Any:
        self.gather()
        gather_root(self.student_root)
        return self._mixer.score(batch, mask_B_T)


def _shard_of(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``full`` laid out like the (possibly sharded) tensor ``like``."""
    if not hasattr(like, "device_mesh"):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements).to_local()


def build_sharded(
    student_root: nn.Module,
    policy: nn.Module,
    *,
    teacher_kind: str,
    rate: float,
    teacher_dtype: torch.dtype | None,
    param_dtype: torch.dtype | None,
    device: torch.device,
    weights: WeightFiles | None = None,
    external: nn.Module | None = None,
    mix: float = 0.0,
) -> ShardedTeacher:
    """Shard student and teacher with one plan.

    ``weights`` None: ``policy`` holds its full weights; the teacher is copied from it, then both
    are sharded. ``weights`` given: ``policy``'s parameters are on the meta device
    (`vopd.models.build_empty_model`); both skeletons are sharded, each rank allocates only its own
    shards and reads its own slices from the files, and the teacher's shards are copied from the
    student's (no rank ever holds a full copy). ``external`` (``teacher.kind=external``): that model,
    with its weights, is the teacher, sharded with the same kind of plan.
    """
    import copy

    if external is not None:
        from vopd.teacher import check_same_vocabulary

        check_same_vocabulary(external, policy)
    teacher_model = external if external is not None else copy.deepcopy(policy)  # ``weights``: meta, no memory
    if teacher_dtype is not None:
        teacher_model.to(teacher_dtype)
    teacher_model.eval()
    teacher_model.requires_grad_(False)
    teacher_root = TeacherRoot(teacher_model)
    meta = [policy] + ([teacher_model] if external is None else [])
    if weights is not None:
        kept = {m: _real_buffers(m) for m in meta}
    apply_fsdp2(student_root, policy, device=device, param_dtype=param_dtype)
    apply_fsdp2(teacher_root, teacher_model, device=device, param_dtype=None)
    if weights is not None:
        for module, buffers in kept.items():
            module.to_empty(device=device)  # this rank's shards only, uninitialised
            _restore_buffers(module, buffers)
        weights.fill(policy)
        if external is None:
            _copy_shards(teacher_model, policy)
    if teacher_kind == "trust_region":  # ``mix``: the current student's share of the teacher's logits
        return ShardedTrustRegion(teacher_root, student_root, policy, mix=mix)
    return ShardedTeacher(teacher_kind, teacher_root, policy, rate=rate)


def _real_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Buffers that hold values (not meta): ``to_empty`` would drop them (rotary frequencies ...)."""
    return {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}


@torch.no_grad()
def _restore_buffers(model: nn.Module, saved: dict[str, Tensor]) -> None:
    for name, buf in model.named_buffers():
        if name in saved:
            _local(buf).copy_(saved[name])


@torch.no_grad()
def _copy_shards(target: nn.Module, source: nn.Module) -> None:
    """Each rank copies its local shards of ``source`` into ``target`` (same plan; dtype cast)."""
    from vopd.teacher import matched_parameters

    for t, s in matched_parameters(target, source):
        _local(t).copy_(_local(s))
    src = dict(source.named_buffers())
    for name, buf in target.named_buffers():
        if name in src:
            _local(buf).copy_(_local(src[name]))


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightFiles:
    """The safetensors files of a checkpoint folder, read one slice at a time.

    Each tensor's header entry gives its byte range; a rank reads only the rows of its own shard
    (a contiguous byte range for FSDP2's dim-0 sharding) with plain file reads, so neither the
    full tensor nor a memory map of the file is ever held.
    """

    def __init__(self, folder: str | os.PathLike):
        import json
        from pathlib import Path

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["model.safetensors"]
        )
        self.entries: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data start, header entry)
        for name in files:
            path = self.folder / name
            with path.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for key, entry in header.items():
                self.entries[key] = (path, 8 + n, entry)

    @staticmethod
    def usable(folder: str | os.PathLike) -> bool:
        """A local folder with safetensors weights (hub ids, ``tiny:`` models, .bin files: no)."""
        from pathlib import Path

        f = Path(folder)
        return (f / "config.json").is_file() and (
            (f / "model.safetensors").is_file() or (f / "model.safetensors.index.json").is_file()
        )

    def names_for(self, model: nn.Module) -> dict[str, str] | None:
        """Each state-dict key of ``model`` -> its name in the files (the name transformers saves
        it under, or the key itself); None when a parameter is in neither form."""
        from vopd.sharded_checkpoint import hf_names, model_shards

        try:
            saved = hf_names(model)
        except ValueError:
            return None
        buffers = {n for n, _ in model.named_buffers()}
        out = {}
        for key in model_shards(model):
            found = next((c for c in (saved.get(key), key) if c in self.entries), None)
            if found is None:
                if key in buffers:
                    continue  # a buffer the files do not hold keeps the value the model computed
                return None
            out[key] = found
        return out

    @torch.no_grad()
    def fill(self, model: nn.Module) -> None:
        """Read this rank's slice of every tensor of ``model`` (sharded, allocated) from the files."""
        names = self.names_for(model)
        if names is None:
            raise ValueError(f"{self.folder}: its tensor names do not match {type(model).__name__}")
        state = model.state_dict()
        for key, file_key in names.items():
            target = state[key]
            local = _local(target)
            start = _row_offset(target)
            self._read_rows(file_key, start, local)

    def _read_rows(self, name: str, start: int, out: Tensor) -> None:
        path, base, entry = self.entries[name]
        shape = entry["shape"]
        rows = out.shape[0] if out.dim() else 1
        fits = out.dim() == 0 and not shape or (shape and list(out.shape[1:]) == shape[1:] and start + rows <= shape[0])
        if not fits:
            raise ValueError(
                f"{path}: {name} has shape {shape}, the model's shard is {tuple(out.shape)} at row {start}"
            )
        dtype = _ST_DTYPES[entry["dtype"]]
        row = dtype.itemsize
        for d in shape[1:]:
            row *= d
        if rows == 0:
            return
        with path.open("rb") as fh:
            fh.seek(base + entry["data_offsets"][0] + start * row)
            buf = bytearray(rows * row)
            fh.readinto(buf)
        out.copy_(torch.frombuffer(buf, dtype=dtype).view(out.shape))


def _row_offset(t: Tensor) -> int:
    """First row of this rank's dim-0 shard of ``t`` (0 for a replicated tensor)."""
    if not hasattr(t, "device_mesh"):
        return 0
    from torch.distributed.tensor import Shard

    (placement,) = t.placements
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise ValueError(f"unexpected placement {placement} (FSDP2 shards dim 0)")
    world, rank = t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-t.shape[0] // world)  # torch.chunk: ceil-sized chunks, the last ones shorter or empty
    return min(rank * chunk, t.shape[0])


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Global gradient norm over sharded gradients; clips in place when ``max_norm > 0``."""
    grads = [p.grad for p in params if p.grad is not None]
    local_sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for g in grads:
        local_sq += _local(g).detach().float().pow(2).sum()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(local_sq)
    norm = float(local_sq.sqrt())
    if max_norm > 0 and grads:
        scale = max_norm / (norm + 1e-6)
        if scale < 1.0:
            torch._foreach_mul_([_local(g) for g in grads], scale)
    return norm


def full_model_state(policy: nn.Module) -> dict[str, Tensor]:
    """The student's full state dict on CPU (collective)."""
    return {k: _full(v) for k, v in policy.state_dict().items()}


def full_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's full, parameter-name-keyed state (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimiser state saved by :func:`full_optimizer_state` at any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def check_resume(saved: dict[str, Any], strategy: str, world_size: int) -> str | None:
    """Refuse a resume across strategies (the optimiser state layouts differ); say what changes."""
    old = ((saved.get("config") or {}).get("parallel") or {}).get("strategy", "ddp")
    if old != strategy:
        raise ValueError(
            f"the checkpoint was written with parallel.strategy={old}; resume it with parallel.strategy={old} "
            f"(this run has {strategy}): the optimiser state layouts differ"
        )
    old_world = saved.get("world_size")
    if strategy == "fsdp2" and old_world and old_world != world_size:
        return f"resume: world size {old_world} -> {world_size} (fsdp2 reshards the full state on load)"
    return None
