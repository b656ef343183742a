"""The teacher: the same model shown the evidence crop, with its own weights policy.

The teacher scores the student's sampled responses under the teacher prompt (crop image, same
text). It never receives gradients. Its weights are one of:

- ``ema`` (default): theta_T <- (1 - ema_rate) theta_T + ema_rate theta_S after every optimiser step;
- ``frozen``: the initial weights, forever;
- ``trust_region``: teacher logits = lerp(initial-model logits, current-student logits, mix)
  (`vopd.objectives.mix_logits`);
- ``live``: the current student itself (no copy). The paper reports collapse; we warn loudly;
- ``external``: another checkpoint, frozen.

``teacher.score(batch, mask_B_T)`` runs the teacher model(s) on a typed `vopd.scoring.ScoredBatch`
and returns a `vopd.fused_loss.TeacherLogits`: the final hidden states at the valid response
tokens plus the output head, so the loss makes the teacher's logits chunk by chunk and never
holds a [tokens, vocab] tensor for the whole batch.
"""

from __future__ import annotations

import copy
import warnings
from typing import Protocol

import torch
from torch import Tensor, nn

from vopd.fused_loss import TeacherLogits
from vopd.models import output_head
from vopd.scoring import ScoredBatch


class Teacher(Protocol):
    """What the trainer needs from a teacher."""

    kind: str

    def score(self, batch: ScoredBatch, mask_B_T: Tensor) -> TeacherLogits:
        """Score the responses of ``batch`` (no gradient); the logits over the valid response
        tokens (row-major order of ``mask_B_T``) come from the result chunk by chunk."""
        ...

    def update(self, student: nn.Module) -> None:
        """Called after every optimiser step."""
        ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...


@torch.no_grad()
def _hidden_N_H(model: nn.Module, batch: ScoredBatch, mask_B_T: Tensor) -> Tensor:
    was_training = model.training
    model.eval()  # no dropout in the target
    try:
        hidden_B_T_H = batch.response_hidden_states(model)
    finally:
        model.train(was_training)
    return hidden_B_T_H[mask_B_T]


def _scores(model: nn.Module, batch: ScoredBatch, mask_B_T: Tensor) -> TeacherLogits:
    return TeacherLogits(_hidden_N_H(model, batch, mask_B_T), output_head(model))


def matched_parameters(target: nn.Module, source: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Pairs (target_param, source_param) matched by name and shape; raises on any mismatch.

    Never a blind zip: a renamed or reshaped parameter must be an error, not a silent average of
    unrelated tensors.
    """
    tgt = dict(target.named_parameters())
    src = dict(source.named_parameters())
    missing = sorted(set(src) - set(tgt))
    extra = sorted(set(tgt) - set(src))
    if missing or extra:
        raise ValueError(
            f"teacher/student parameter names differ: only in student {missing[:5]}, only in teacher {extra[:5]}"
        )
    pairs = []
    for name, p_src in src.items():
        p_tgt = tgt[name]
        if p_tgt.shape != p_src.shape:
            raise ValueError(f"parameter {name}: teacher shape {tuple(p_tgt.shape)} != student {tuple(p_src.shape)}")
        pairs.append((p_tgt, p_src))
    return pairs


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, rate: float) -> None:
    """theta_target <- (1 - rate) theta_target + rate theta_source, in place, matched by name."""
    for p_tgt, p_src in matched_parameters(target, source):
        p_tgt.lerp_(p_src.detach().to(p_tgt.dtype), rate)


def _frozen_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    clone = copy.deepcopy(model)
    if dtype is not None:
        clone.to(dtype)
    clone.eval()
    clone.requires_grad_(False)
    return clone


def _is_low_precision(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


class CopyTeacher:
    """A separate weight copy: ``frozen``, ``ema`` (ema_rate > 0) or ``external``.

    An ``ema`` teacher whose copy lives in bf16 / fp16 keeps fp32 master weights for the average:
    one step moves theta_T by ema_rate * (theta_S - theta_T), about 0.05 * lr, which is far below half
    a bf16 ulp, so an in-place bf16 lerp rounds nearly every update away and the "EMA" teacher
    silently stays frozen. The low-precision copy used for scoring is refreshed from the master.
    """

    def __init__(self, model: nn.Module, *, kind: str, ema_rate: float = 0.0, source: nn.Module | None = None):
        """``source``: the full-precision model ``model`` was cast from, to start the master copy
        from its exact weights rather than from their low-precision rounding."""
        self.kind = kind
        self.model = model
        self.ema_rate = ema_rate
        self.master: dict[str, Tensor] = {}
        if kind == "ema":
            origin = dict((source if source is not None else model).named_parameters())
            self.master = {
                name: origin[name].detach().to(p.device, torch.float32, copy=True)
                for name, p in model.named_parameters()
                if _is_low_precision(p.dtype)
            }

    def score(self, batch: ScoredBatch, mask_B_T: Tensor) -> TeacherLogits:
        return _scores(self.model, batch, mask_B_T)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        if self.kind != "ema":
            return
        if not self.master:
            ema_update_(self.model, student, self.ema_rate)
            return
        matched_parameters(self.model, student)  # raises on any name / shape mismatch
        targets = dict(self.model.named_parameters())
        for name, p_src in student.named_parameters():
            p_tgt, master = targets[name], self.master.get(name)
            if master is None:  # an fp32 parameter: average in place
                p_tgt.lerp_(p_src.detach().to(p_tgt.dtype), self.ema_rate)
            else:
                master.lerp_(p_src.detach().to(master.device, torch.float32), self.ema_rate)
                p_tgt.copy_(master)

    def state_dict(self) -> dict[str, Tensor]:
        """The teacher's weights; an EMA teacher's parameters at their fp32 master precision."""
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        for name, master in self.master.items():
            if name in state:
                state[name] = master.detach().contiguous()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)  # casts to the copy's dtype
        for name, master in self.master.items():
            if name in state:
                master.copy_(state[name].to(master.device, torch.float32))


class LiveTeacher:
    """The current student under the crop view, without gradient. Collapses in the paper."""

    kind = "live"

    def __init__(self, student: nn.Module):
        self.student = student

    def score(self, batch: ScoredBatch, mask_B_T: Tensor) -> TeacherLogits:
        return _scores(self.student, batch, mask_B_T)

    def update(self, student: nn.Module) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class TrustRegionTeacher:
    """Teacher logits = lerp(reference logits, current-student logits, mix), both on the crop."""

    kind = "trust_region"

    def __init__(self, reference: nn.Module, student: nn.Module, mix: float):
        self.reference = reference
        self.student = student
        self.mix = mix

    def score(self, batch: ScoredBatch, mask_B_T: Tensor) -> TeacherLogits:
        reference = _hidden_N_H(self.reference, batch, mask_B_T), output_head(self.reference)
        current = _scores(self.student, batch, mask_B_T)
        return TeacherLogits(current.hidden_N_H, current.head, reference=reference, mix=self.mix)

    def update(self, student: nn.Module) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().contiguous() for k, v in self.reference.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.reference.load_state_dict(state, strict=True)


def answering_model(teacher: Teacher) -> nn.Module:
    """The model that answers as the teacher (``objective=sft_self`` samples its crop answers from it).

    A copy teacher's own weights (frozen, EMA or external) or, for ``live``, the student itself.

    Raises:
        ValueError: the teacher is no single model (trust_region mixes two models' logits; a LoRA
            or sharded teacher lives inside the student and has no model of its own to generate with).
    """
    if isinstance(teacher, CopyTeacher):
        return teacher.model
    if isinstance(teacher, LiveTeacher):
        return teacher.student
    raise ValueError(
        f"a {type(teacher).__name__} (teacher.kind={teacher.kind}) cannot generate answers of its own; "
        "objective=sft_self needs teacher.kind frozen, ema, live or external without LoRA or FSDP2"
    )


def check_same_vocabulary(external: nn.Module, student: nn.Module) -> None:
    """Refuse an external teacher whose output vocabulary differs from the student's: the divergence
    compares distributions over the same token ids."""
    v_teacher = external.get_output_embeddings().weight.shape[0]
    v_student = student.get_output_embeddings().weight.shape[0]
    if v_teacher != v_student:
        raise ValueError(
            f"external teacher vocabulary ({v_teacher}) differs from the student's ({v_student}): "
            "teacher and student must share one tokenizer"
        )


def make_teacher(
    kind: str,
    student: nn.Module,
    *,
    ema_rate: float = 0.05,
    mix: float = 0.05,
    dtype: torch.dtype | None = None,
    external: nn.Module | None = None,
) -> Teacher:
    """Build the teacher of ``kind`` from the (unwrapped) student at its initial weights.

    ``ema_rate`` is the EMA teacher's step towards the student, ``mix`` the trust-region teacher's
    weight of the current student's logits. ``dtype`` lets the teacher copy live in the training
    compute dtype (e.g. bf16) since it needs neither gradients nor optimiser state.
    """
    if kind == "ema":
        return CopyTeacher(_frozen_copy(student, dtype), kind="ema", ema_rate=ema_rate, source=student)
    if kind == "frozen":
        return CopyTeacher(_frozen_copy(student, dtype), kind="frozen")
    if kind == "trust_region":
        return TrustRegionTeacher(_frozen_copy(student, dtype), student, mix)
    if kind == "live":
        warnings.warn(
            "teacher.kind=live uses the current student as its own teacher: the paper reports collapse "
            "to ~0 accuracy and the toy world collapses within 50 steps. Use ema or frozen.",
            stacklevel=2,
        )
        return LiveTeacher(student)
    if kind == "external":
        if external is None:
            raise ValueError("teacher.kind=external needs the external model (teacher.path)")
        check_same_vocabulary(external, student)
        return CopyTeacher(_frozen_copy(external, dtype), kind="external")
    raise ValueError(f"unknown teacher kind {kind!r}")
