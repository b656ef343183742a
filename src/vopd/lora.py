"""LoRA through peft (``lora.r > 0``): the student trains low-rank adapters on a frozen base.

The teacher costs no second model. A ``frozen`` teacher is the base with the adapters switched
off; an ``ema`` teacher is a second adapter (``ema``) on the same base, started equal to the
student's adapter, never trainable (``requires_grad`` stays False: peft's ``set_adapter`` would
make the active adapter trainable, so every switch restores the flags), and moved by EMA toward
the student's adapter after each optimiser step (fp32 adapters; a low-precision adapter averages
in an fp32 master copy, as `vopd.teacher.CopyTeacher` does).

Checkpoints hold the student adapter (``adapter_model.safetensors`` + ``adapter_config.json``,
loadable with ``peft.PeftModel.from_pretrained`` on the base) instead of the full model and, with
``lora.save_merged=true``, also ``merged/``: base + adapter merged into a plain HF folder that the
transformers Auto classes (and inference engines) load. A resume rebuilds the base from
``model.path`` and loads the adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

STUDENT, TEACHER = "default", "ema"


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("lora.r > 0 needs peft: pip install 'vision-opd[lora]' (or pip install peft)") from err
    return peft


def _peft_config(cfg: Any) -> Any:
    peft = _require_peft()
    return peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), bias="none"
    )


def apply_lora(policy: nn.Module, cfg: Any, *, ema_adapter: bool) -> Any:
    """Inject the student adapter (and a frozen copy named ``ema`` when asked) into ``policy`` in place.

    Returns the ``peft.PeftModel``; ``policy`` itself stays the HF model vopd drives (its LoRA
    layers follow the active adapter). Only the student adapter requires grad.
    """
    peft = _require_peft()
    try:
        model = peft.get_peft_model(policy, _peft_config(cfg), adapter_name=STUDENT)
    except ValueError as err:
        raise ValueError(
            f"lora.target_modules={list(cfg.target_modules)} matches no module of {type(policy).__name__}: {err}"
        ) from err
    if ema_adapter:
        model.add_adapter(TEACHER, _peft_config(cfg))
        student, teacher = adapter_parameters(policy, STUDENT), adapter_parameters(policy, TEACHER)
        with torch.no_grad():
            for name, p in student.items():
                teacher[name].copy_(p)
        model.base_model.set_adapter(STUDENT)
    _set_trainable(policy)
    return model


def adapter_parameters(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """The LoRA parameters of ``adapter``, keyed by their name with the adapter name removed."""
    tag = f".{adapter}."
    return {name.replace(tag, "."): p for name, p in model.named_parameters() if tag in name and "lora_" in name}


def _set_trainable(policy: nn.Module) -> None:
    for name, p in policy.named_parameters():
        p.requires_grad_("lora_" in name and f".{STUDENT}." in name)


@contextlib.contextmanager
def active_adapter(peft_model: Any, adapter: str | None) -> Iterator[None]:
    """Run the block with ``adapter`` active (None: adapters off), then the student adapter again."""
    if adapter is None:
        with peft_model.disable_adapter():
            yield
        return
    peft_model.base_model.set_adapter(adapter, inference_mode=True)
    try:
        yield
    finally:
        peft_model.base_model.set_adapter(STUDENT)
        _set_trainable(peft_model.base_model.model)


class AdapterTeacher:
    """The teacher on the student's own base (the `vopd.teacher.Teacher` protocol).

    ``frozen``: the base with adapters off. ``ema``: the ``ema`` adapter, averaged after each step.
    """

    def __init__(self, kind: str, peft_model: Any, *, rate: float):
        from vopd.teacher import CopyTeacher

        if kind not in ("ema", "frozen"):
            raise ValueError(f"AdapterTeacher: kind must be ema or frozen, got {kind!r}")
        self.kind, self.rate, self.peft_model = kind, rate, peft_model
        self.model = peft_model.base_model.model
        self._scorer = CopyTeacher(self.model, kind="frozen")  # scoring only
        self._adapter = TEACHER if kind == "ema" else None
        self.master: dict[str, Tensor] = {}
        if kind == "ema":
            for name, p in adapter_parameters(self.model, TEACHER).items():
                if p.dtype.is_floating_point and torch.finfo(p.dtype).bits < 32:
                    self.master[name] = p.detach().to(torch.float32, copy=True)

    @contextlib.contextmanager
    def answering(self) -> Iterator[nn.Module]:
        """The shared model with the teacher's weights active (frozen: adapters off; ema: the ``ema``
        adapter), to generate as the teacher; the student adapter is active again afterwards."""
        with active_adapter(self.peft_model, self._adapter):
            yield self.model

    def score(self, batch: Any, mask_B_T: Tensor) -> Any:
        was_training = self.model.training
        with active_adapter(self.peft_model, self._adapter):
            inner = self._scorer.score(batch, mask_B_T)
        self.model.train(was_training)
        head = inner.head

        def teacher_head(hidden: Tensor) -> Tensor:  # the head may carry an adapter too: score it with the teacher's
            with active_adapter(self.peft_model, self._adapter):
                return head(hidden)

        return dataclasses.replace(inner, head=teacher_head)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        if self.kind != "ema":
            return
        src, tgt = adapter_parameters(student, STUDENT), adapter_parameters(student, TEACHER)
        if src.keys() != tgt.keys():
            raise ValueError(f"student / ema adapters differ: {sorted(set(src) ^ set(tgt))[:5]}")
        plain_t = [tgt[n] for n in src if n not in self.master]
        plain_s = [src[n].detach().to(tgt[n].dtype) for n in src if n not in self.master]
        if plain_t:
            torch._foreach_lerp_(plain_t, plain_s, self.rate)
        for name, master in self.master.items():
            master.lerp_(src[name].detach().float(), self.rate)
            tgt[name].copy_(master)

    def state_dict(self) -> dict[str, Tensor]:
        """The ``ema`` adapter (fp32 master values where kept); empty for ``frozen`` (the base is the config's)."""
        if self.kind != "ema":
            return {}
        out = {k: v.detach().contiguous() for k, v in adapter_parameters(self.model, TEACHER).items()}
        out.update({k: v.detach().contiguous() for k, v in self.master.items()})
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.kind != "ema":
            return
        params = adapter_parameters(self.model, TEACHER)
        if params.keys() != state.keys():
            raise ValueError(f"ema adapter state does not match: {sorted(set(params) ^ set(state))[:5]}")
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))
            if name in self.master:
                self.master[name].copy_(state[name].to(torch.float32))


class AdapterSaver:
    """What `vopd.checkpoint.save_checkpoint` writes for a LoRA student: the adapter, optionally merged."""

    def __init__(self, peft_model: Any, *, save_merged: bool):
        self.peft_model, self.save_merged = peft_model, save_merged

    def state_dict(self) -> dict[str, Tensor]:
        return dict(adapter_parameters(self.peft_model.base_model.model, STUDENT))

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        self.peft_model.save_pretrained(str(folder), selected_adapters=[STUDENT], safe_serialization=True)
        if self.save_merged:
            save_merged(self.peft_model, Path(folder) / "merged")


def save_merged(peft_model: Any, folder: str | Path) -> None:
    """Base + student adapter merged into a plain HF folder (no peft needed to load it)."""
    import copy

    with active_adapter(peft_model, STUDENT):
        merged = copy.deepcopy(peft_model).merge_and_unload(adapter_names=[STUDENT])
    for name in [n for n, _ in merged.named_parameters() if "lora_" in n]:  # pragma: no cover - peft removes them
        raise RuntimeError(f"merged model still holds adapter parameter {name}")
    merged.save_pretrained(str(folder), safe_serialization=True)


def load_adapter(peft_model: Any, checkpoint: str | Path) -> None:
    """Load the student adapter of a vopd LoRA checkpoint into ``peft_model`` (from `apply_lora`)."""
    from safetensors.torch import load_file

    file = Path(checkpoint) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no adapter_model.safetensors: not a LoRA checkpoint (resume it with lora.r=0)"
        )
    peft = _require_peft()
    result = peft.set_peft_model_state_dict(peft_model, load_file(file), adapter_name=STUDENT)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{STUDENT}." in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ValueError(
            f"{file} does not fit this model's adapter (lora.r / lora.target_modules changed?): "
            f"missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}"
        )
