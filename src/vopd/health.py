"""Teacher health: make a degrading teacher visible while the loss keeps falling.

In the toy world the EMA(0.05) teacher drifts with the student (which is never trained on crops)
and both degrade slowly *while the divergence keeps falling* (recorded ablation, 200 steps: the
teacher's probe accuracy on crops 100 -> 78.1 %, the student's crop accuracy 99.4 -> 81.6 %, clean
full 76.6 % against 89.2 % with a frozen teacher): the loss is no health signal. This probe
watches the teacher directly, on a fixed batch of teacher-view prompts:

- ``teacher_drift`` (label-free): KL(p_initial || p_teacher) in nats per token, on the initial
  model's own greedy answers to the probe prompts, over the initial model's top-k ids + a tail
  bucket. 0 for a frozen teacher; it grows as the teacher forgets what the crop view knew.
- ``teacher_acc`` / ``student_acc`` / ``student_crop_acc`` (when the probe samples have answers
  and a grader is given): greedy accuracy of the teacher on crops and of the student on full images
  and on crops.

When the drift exceeds ``health.drift_warn`` or the teacher's probe accuracy falls more than
``health.acc_drop_warn`` below its start, it warns; with ``health.on_degrade=stop`` the run saves a
checkpoint and stops; with ``rollback`` the teacher's weights return to the last healthy probe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from vopd.config import HealthConfig, RolloutConfig
from vopd.data import PairCollator, ViewDataset
from vopd.grading import grade
from vopd.models import append_responses
from vopd.objectives import add_tail_bucket, generalized_jsd
from vopd.records import Sample
from vopd.rollout import HFGenerateEngine
from vopd.scoring import FullInputs

Grader = Callable[[str, Sample], bool]


def default_grader(text: str, sample: Sample) -> bool:
    """Rule-based grading (option letter, yes/no, normalised text) of a probe answer."""
    answer = (sample.answer or "").strip()
    if sample.options or (len(answer) == 1 and answer.isalpha()):
        kind = "choice"
    elif answer.lower() in ("yes", "no"):
        kind = "yesno"
    else:
        kind = "open"
    return grade(text, answer, kind, sample.options).correct


@contextlib.contextmanager
def _roots_gathered(state: Any) -> Iterator[None]:
    """Under ``parallel.strategy=fsdp2`` the probe runs the models' parts directly (generate, the
    backbone): the student's and the teacher's root units (embeddings, LM head) are gathered
    meanwhile. Every rank runs the same probe on the same prompts, so the collectives line up."""
    if state.cfg.parallel.strategy != "fsdp2":
        yield
        return
    from vopd.parallel import root_gathered

    state.teacher.gather()  # released by the teacher's next update
    with root_gathered(state.student):
        yield


@contextlib.contextmanager
def _generation_model(teacher: Any) -> Iterator[Any | None]:
    """The module that generates like the teacher (None for mixed-logit teachers). A teacher that
    shares the student's model (LoRA adapters) switches it to the teacher's weights meanwhile."""
    if getattr(teacher, "kind", "") == "trust_region":
        yield None
    elif hasattr(teacher, "answering"):
        with teacher.answering() as model:
            yield model
    else:
        yield getattr(teacher, "model", None) or getattr(teacher, "student", None)


class TeacherHealth:
    """A trainer callback (``train(cfg, callbacks=[health])``) returning ``health/*`` metrics."""

    def __init__(
        self,
        cfg: HealthConfig,
        samples: list[Sample],
        *,
        views: Any,
        grader: Grader | None = None,
        thinking: bool | None = False,
    ):
        self.cfg = cfg
        self.samples = samples[: cfg.probe_size]
        self.views = views
        self.grader = grader if grader is not None and all(s.answer is not None for s in self.samples) else None
        self.thinking = thinking
        self._ref: dict[str, Tensor] | None = None
        self.start_acc: float | None = None
        self._started = False  # set by the first (reference) probe
        self.history: list[dict[str, float]] = []
        self.stop_reason: str | None = None
        self._healthy: dict[str, Tensor] = {}  # teacher weights at the last healthy probe (for rollback)

    # -- probe set-up, done once with the initial weights --------------------------------------

    def _pairs(self, processor: Any):
        # The probe measures the student on its full-image view: no crop replay here.
        views = dataclasses.replace(self.views, student_crop_share=0.0)
        items = [ViewDataset(self.samples, views)[i] for i in range(len(self.samples))]
        return PairCollator(processor, thinking=self.thinking, max_prompt_tokens=None)(items)

    def prepare(self, state: Any) -> dict[str, float]:
        """Record the initial model's answers and distributions on the probe (call before step 1)."""
        self.pairs = self._pairs(state.processor)
        self.engine = HFGenerateEngine(state.processor)
        device = state.accelerator.device
        greedy = RolloutConfig(n=1, temperature=0.0, max_new_tokens=self.cfg.max_new_tokens)
        with _roots_gathered(state):
            ro = self.engine.sample(state.policy, self.pairs.teacher.to(device), greedy)
            self.ids_B_T, self.mask_B_T = ro.response_ids_B_T.to(device), ro.mask_B_T.to(device)
            logits_N_V = state.teacher.score(self._probe_batch(device), self.mask_B_T)(slice(None)).float()
        logp_N_V = torch.log_softmax(logits_N_V, dim=-1)
        top_logp_N_K, top_ids_N_K = logp_N_V.topk(min(self.cfg.top_k, logp_N_V.shape[-1]), dim=-1)
        self._ref = {"ids": top_ids_N_K, "logp": add_tail_bucket(top_logp_N_K)}
        return self(state, force=True)

    def _probe_batch(self, device: Any) -> FullInputs:
        """The teacher-view probe prompts with the initial model's greedy answers appended."""
        inputs = append_responses(self.pairs.teacher.to(device), self.ids_B_T, self.mask_B_T)
        return FullInputs(inputs, self.ids_B_T.shape[1])

    # -- the periodic probe ----------------------------------------------------------------------

    @torch.no_grad()
    def drift(self, state: Any) -> float:
        assert self._ref is not None, "call prepare() first"
        device = state.accelerator.device
        logits_N_V = state.teacher.score(self._probe_batch(device), self.mask_B_T)(slice(None)).float()
        logp_N_K = torch.log_softmax(logits_N_V, dim=-1).gather(-1, self._ref["ids"])
        now = add_tail_bucket(logp_N_K)
        # generalized_jsd(beta=0) is forward KL(teacher-arg || student-arg) = KL(initial || now).
        return float(generalized_jsd(now, self._ref["logp"], beta=0.0).mean())

    def _accuracy(self, model: Any, prompts: Any, processor: Any, device: Any) -> float:
        greedy = RolloutConfig(n=1, temperature=0.0, max_new_tokens=self.cfg.max_new_tokens)
        ro = self.engine.sample(model, prompts.to(device), greedy)
        # Decode each row's valid tokens only: filling the rest with id 0 would append real text
        # (id 0 is "!" in Qwen's vocabulary) to every short answer.
        texts = [
            processor.decode(ids_T[mask_T], skip_special_tokens=True)
            for ids_T, mask_T in zip(ro.response_ids_B_T, ro.mask_B_T)
        ]
        return sum(self.grader(t, s) for t, s in zip(texts, self.samples)) / len(self.samples)

    def _measure(self, state: Any) -> dict[str, float]:
        out = {"health/teacher_drift": self.drift(state)}
        device = state.accelerator.device
        if self.grader is not None:
            with _generation_model(state.teacher) as teacher_model:
                if teacher_model is not None:
                    out["health/teacher_acc"] = self._accuracy(
                        teacher_model, self.pairs.teacher, state.processor, device
                    )
            out["health/student_acc"] = self._accuracy(state.policy, self.pairs.student, state.processor, device)
            out["health/student_crop_acc"] = self._accuracy(state.policy, self.pairs.teacher, state.processor, device)
        return out

    def __call__(self, state: Any, *, force: bool = False) -> dict[str, float]:
        if not force and (self.cfg.every <= 0 or state.step % self.cfg.every):
            return {}
        with _roots_gathered(state):
            out = self._measure(state)
        if self._check(state.step, out):
            self._healthy = {k: v.detach().to("cpu", copy=True) for k, v in state.teacher.state_dict().items()}
        elif self.cfg.on_degrade == "rollback" and self._healthy:
            device = state.accelerator.device
            state.teacher.load_state_dict({k: v.to(device) for k, v in self._healthy.items()})
            out["health/rolled_back"] = 1.0
        self.history.append({"step": float(state.step), **out})
        return out

    def _check(self, step: int, out: dict[str, float]) -> bool:
        """Warn (and flag a stop) when the teacher degrades; True when it looks healthy."""
        acc = out.get("health/teacher_acc")
        if not self._started:
            # The first probe (prepare) is the reference. Judged by a flag, not by start_acc: without
            # a grader start_acc stays None, and the drift check must still run on later probes.
            self._started = True
            self.start_acc = acc
            return True
        problems = []
        if out["health/teacher_drift"] > self.cfg.drift_warn:
            problems.append(f"teacher drift {out['health/teacher_drift']:.3f} nats/token > {self.cfg.drift_warn}")
        if acc is not None and self.start_acc is not None and acc < self.start_acc - self.cfg.acc_drop_warn:
            problems.append(f"teacher probe accuracy {acc:.1%} fell from {self.start_acc:.1%}")
        if problems:
            message = (
                f"step {step}: teacher degrading: "
                + "; ".join(problems)
                + " (the divergence can keep falling meanwhile)."
                + " Consider teacher.kind=frozen or a smaller teacher.ema_rate."
            )
            warnings.warn(message, stacklevel=2)
            if self.cfg.on_degrade == "stop":
                self.stop_reason = message
            return False
        return True
