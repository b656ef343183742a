"""The Vision-OPD training loop (docs/method.md, "One training step").

One step: the student samples ``n`` responses per prompt on the full image; the teacher (same
model, crop view, its own weights policy) scores the same tokens without gradient; the loss is a
token-level divergence between their next-token distributions at every response position,
averaged over all valid response tokens of the step; one AdamW step; then the teacher update.
No labels, reward, advantage, KL-to-reference or entropy term: that is the whole method.

``objective`` swaps in the paper's baselines through the same step, data, views and checkpoints
(docs/method.md, "Baselines"): ``opsd`` keeps the step and changes only the teacher's prompt (the
full image and the reference answer, built by `vopd.data`); ``sft_self`` lets the teacher answer
on the crop and trains the student by cross-entropy on those tokens; ``sft_gold`` trains by
cross-entropy on the reference answers. The SFT objectives skip phase 2 (no teacher scoring).

Runs through ``accelerate``: one process by default, ``accelerate launch`` for several, no code
change. Checkpoints are atomic and resumable (model, teacher, optimiser, scheduler, RNG, step).
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vopd.checkpoint import CheckpointError, save_checkpoint
from vopd.config import SUPERVISED_OBJECTIVES, TrainConfig, checkpoint_format, config_to_dict
from vopd.data import PairCollator, PromptPair, load_train_samples
from vopd.fused_loss import TeacherLogits, distillation_loss, nll_loss
from vopd.jsonl import append_record
from vopd.models import linear_head, output_head
from vopd.objectives import token_weights
from vopd.records import RecordError
from vopd.rollout import Rollouts, reference_rollouts
from vopd.runfolder import release_run_folder, truncate_metrics
from vopd.scoring import NaiveInputs, ScoredBatch, SharedPrompts
from vopd.teacher import answering_model
from vopd.train_setup import TrainState, setup

__all__ = ["TrainResult", "TrainingError", "summary", "train", "train_step"]

Callback = Callable[["TrainState"], "dict[str, float] | None"]


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses in a row)."""


class PhaseTimer:
    """Wall seconds per named phase of a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _global_sum(accelerator: Any, value: float) -> float:
    t = torch.tensor(float(value), device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else float(value)


def train_step(
    state: TrainState, micro_batches: list[PromptPair], *, sharing: str | None = None, update: bool = True
) -> dict[str, float]:
    """One Vision-OPD step (or a baseline's, per ``cfg.objective``) over the micro-batches of this
    process's share of the step's prompts.

    ``update=False`` stops before the optimiser: the step's gradients are left in the parameters'
    ``.grad`` (added to any already there) and no weight, teacher, optimiser or scheduler state
    changes; the metrics then have no ``grad_norm``, ``lr`` or ``skipped``. For inspecting a step.

    ``sharing`` ("prefix" | "image" | "none", see `vopd.scoring`) defaults to "prefix", or to the
    straightforward path everywhere when ``cfg.naive`` (which also computes full-vocabulary logits
    at every position and the loss in one piece, to measure what the optimisations buy).
    """
    cfg, acc, timer = state.cfg, state.accelerator, PhaseTimer()
    sharing = sharing or ("none" if cfg.naive else "prefix")
    supervised = cfg.objective in SUPERVISED_OBJECTIVES
    # 1. On-policy rollouts from the student's full-image prompts (no gradient); the SFT baselines'
    #    targets instead (the teacher's crop answers, or the reference answers).
    with timer("sample"):
        rollouts = [_responses(state, mb) for mb in micro_batches]
    # Global counts first, so every micro-batch loss is normalised by the whole step's tokens.
    world = acc.num_processes
    num_tokens = _global_sum(acc, sum(int(r.mask_B_T.sum()) for r in rollouts))
    num_seqs = _global_sum(acc, sum(r.mask_B_T.shape[0] for r in rollouts))
    sums = {"loss": 0.0, "logp_gap": 0.0, "tail_mass": 0.0, "weight": 0.0}
    for i, (mb, ro) in enumerate(zip(micro_batches, rollouts)):
        if supervised:  # cross-entropy on the targets, student on its own (full-image) prompt
            with timer("student"), _maybe_no_sync(acc, state.student, last=i == len(micro_batches) - 1):
                loss, stats = _supervised_loss(state, _scored(state, mb.student, ro, sharing), ro, num_tokens, num_seqs)
                acc.backward(loss)
            sums["loss"] += float(loss.detach())
            continue
        mask_B_T = ro.mask_B_T.to(acc.device)
        # 2. The teacher scores the same tokens under its own (crop) prompt, prompt computed once.
        with timer("teacher"):
            teacher_logits = state.teacher.score(_scored(state, mb.teacher, ro, sharing), mask_B_T)
        # 3. Student forward at response positions only; loss and its gradient in vocabulary chunks.
        with timer("student"), _maybe_no_sync(acc, state.student, last=i == len(micro_batches) - 1):
            loss, stats = _student_loss(
                state, _scored(state, mb.student, ro, sharing), ro, teacher_logits, num_tokens, num_seqs
            )
            acc.backward(loss)
        if cfg.loss.rollout_correction:  # trainer log-probs vs the sampler's (an external engine)
            sums["weight"] += float(stats["rollout_weight_N"].sum())
        sums["loss"] += float(loss.detach())
        sums["logp_gap"] += float((stats["teacher_logp_N"] - stats["student_logp_N"]).sum())
        sums["tail_mass"] += float(stats["tail_mass_N"].sum())
    # 4. Optimiser step unless the loss or gradient is non-finite (decided identically on all ranks).
    metrics: dict[str, float] = {}
    if update:
        with timer("optim"):
            metrics = _optimizer_step(state, loss_value=sums["loss"])
    lengths = torch.cat([r.mask_B_T.sum(1).float() for r in rollouts])
    step_seconds = sum(timer.seconds.values())
    metrics.update(
        divergence=_global_sum(acc, sums["loss"]) / world,  # the objective's loss (the NLL for the SFT objectives)
        **(
            {}
            if supervised
            else {  # teacher-vs-student statistics: only where a teacher scores
                "logp_gap": _global_sum(acc, sums["logp_gap"]) / max(num_tokens, 1.0),
                "tail_mass": _global_sum(acc, sums["tail_mass"]) / max(num_tokens, 1.0),
            }
        ),
        response_length=float(lengths.mean()),
        response_tokens=num_tokens,
        response_tokens_per_sec=num_tokens / max(step_seconds, 1e-9),
        **{f"time_{k}": v for k, v in timer.seconds.items()},
        time_step=step_seconds,
    )
    metrics.update(state.engine.step_metrics())  # e.g. the vLLM engine's weight-sync seconds
    if cfg.loss.rollout_correction:
        metrics["rollout_weight"] = _global_sum(acc, sums["weight"]) / max(num_tokens, 1.0)
    return metrics


def _responses(state: TrainState, mb: PromptPair) -> Rollouts:
    """The step's responses for one micro-batch, per ``objective`` (phase 1)."""
    cfg = state.cfg
    if cfg.objective == "sft_self":  # the teacher answers on its crop (greedy at rollout.temperature=0)
        return state.engine.sample(answering_model(state.teacher), mb.teacher, cfg.rollout)
    if cfg.objective == "sft_gold":
        if mb.answers is None:
            raise ValueError("objective=sft_gold: the data carried no reference answers (ViewDataset carry_answers)")
        return reference_rollouts(state.processor, mb.answers, n=1)
    return state.engine.sample(state.policy, mb.student, cfg.rollout)  # opd, opsd: the student samples


def _scored(state: TrainState, prompts: Any, ro: Rollouts, sharing: str) -> ScoredBatch:
    """What a model scores: the prompts (on the device) and the step's responses; never re-sampled."""
    device = state.accelerator.device
    n = ro.response_ids_B_T.shape[0] // prompts["input_ids"].shape[0]  # rollout.n; 1 for the reference answers
    shared = SharedPrompts(prompts.to(device), ro.response_ids_B_T.to(device), ro.mask_B_T.to(device), n, sharing)
    return NaiveInputs(shared.full_inputs(), shared.num_response_tokens) if state.cfg.naive else shared


def _student_tokens(
    state: TrainState, batch: ScoredBatch, ro: Rollouts, num_tokens: float, num_seqs: float
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The student's forward on one micro-batch: its hidden states at the valid response tokens
    (its logits in naive mode), the response mask, the tokens' weights (`token_weights`,
    ``loss.aggregation``, normalised by the step's global counts) and whether it is naive."""
    device, world = state.accelerator.device, state.accelerator.num_processes
    mask_B_T = ro.mask_B_T.to(device)
    naive = isinstance(batch, NaiveInputs)
    student_N = state.student(batch, all_logits=naive)[mask_B_T]
    weights_N = token_weights(
        mask_B_T, state.cfg.loss.aggregation, num_tokens=num_tokens / world, num_seqs=num_seqs / world
    )
    return student_N, mask_B_T, weights_N, naive


def _student_loss(
    state: TrainState,
    batch: ScoredBatch,
    ro: Rollouts,
    teacher: TeacherLogits,
    num_tokens: float,
    num_seqs: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the step loss (normalised by the step's global counts) and stats.

    The student's hidden states at the valid response tokens (its logits in naive mode) go, with
    its head, to `vopd.fused_loss.distillation_loss`: fused loss and gradient for a plain linear
    head, checkpointed chunks for other heads, one piece for naive mode's logits.
    """
    student_N, mask_B_T, weights_N, naive = _student_tokens(state, batch, ro, num_tokens, num_seqs)
    # The head is read after the forward: under FSDP2 (vopd.parallel) that is when it is gathered.
    head = None if naive else linear_head(state.policy) or output_head(state.policy)
    device = mask_B_T.device
    rollout_logp_N = ro.sampler_logp_B_T.to(device)[mask_B_T] if state.cfg.loss.rollout_correction else None
    return distillation_loss(
        student_N,
        head,
        teacher,
        weights_N,
        state.knobs,
        token_ids_N=ro.response_ids_B_T.to(device)[mask_B_T],
        rollout_logp_N=rollout_logp_N,
    )


def _supervised_loss(
    state: TrainState,
    batch: ScoredBatch,
    ro: Rollouts,
    num_tokens: float,
    num_seqs: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The SFT baselines' share of the step loss: the student's NLL of the target tokens, with the
    same normaliser (`token_weights`, ``loss.aggregation``) as the divergence."""
    student_N, mask_B_T, weights_N, naive = _student_tokens(state, batch, ro, num_tokens, num_seqs)
    head = None if naive else output_head(state.policy)  # read after the forward (FSDP2 gathers it then)
    token_ids_N = ro.response_ids_B_T.to(mask_B_T.device)[mask_B_T]
    return nll_loss(student_N, head, token_ids_N, weights_N, state.knobs)


def _maybe_no_sync(acc: Any, module: nn.Module, *, last: bool):
    # Gradient accumulation under DDP: all-reduce only on the last micro-batch of the step.
    return nullcontext() if last or acc.num_processes == 1 else acc.no_sync(module)


#: An update that grows the global parameter norm more than this factor in one step has diverged
#: (healthy steps change it by a fraction of a percent); the run stops before such weights are saved.
MAX_NORM_GROWTH = 10.0


def _optimizer_step(state: TrainState, *, loss_value: float) -> dict[str, float]:
    """Clip, step and update the teacher, unless the loss or gradient is non-finite (then skip).

    After the update the parameters are checked (one fused norm, no copy of the weights): a
    non-finite or exploding parameter norm cannot be undone cheaply, so the run stops with
    `TrainingError` naming the last good checkpoint, and nothing of this update is saved.
    """
    cfg, acc = state.cfg, state.accelerator
    params = [p for p in state.policy.parameters() if p.requires_grad]
    if cfg.parallel.strategy == "fsdp2":  # sharded gradients: the norm needs one all-reduce
        from vopd.parallel import clip_grad_norm

        grad_norm = clip_grad_norm(params, cfg.optim.grad_clip)
    elif cfg.optim.grad_clip > 0:
        grad_norm = float(acc.clip_grad_norm_(params, cfg.optim.grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    finite = math.isfinite(grad_norm) and math.isfinite(_global_sum(acc, loss_value))
    lr = state.scheduler.get_last_lr()[0]
    if finite:
        before = state.param_norm if state.param_norm is not None else _param_norm(acc, params)
        state.mid_update = True  # until the loop counts the step: a save now would be inconsistent
        state.optimizer.step()
        after = _param_norm(acc, params)
        if not math.isfinite(after) or (before > 0 and after > MAX_NORM_GROWTH * before):
            what = (
                "the parameters became non-finite"
                if not math.isfinite(after)
                else f"the parameter norm exploded ({before:.3g} -> {after:.3g})"
            )
            raise TrainingError(
                f"step {state.step + 1}: {what} in the optimiser update "
                f"(lr {lr:.3g}, grad norm {grad_norm:.3g}); the update is not saved. "
                + (
                    f"Last good checkpoint: {state.last_checkpoint}. Lower optim.lr and --resume from it."
                    if state.last_checkpoint
                    else "No checkpoint yet (last good checkpoint: none): "
                    "start again with a lower optim.lr (--overwrite)."
                )
            )
        state.param_norm = after
        state.scheduler.step()
        state.teacher.update(state.policy)
        state.bad_in_a_row = 0
    else:
        state.bad_in_a_row += 1
        state.skipped_steps += 1
    state.optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "lr": lr, "skipped": float(not finite)}


def _param_norm(acc: Any, params: list[Tensor]) -> float:
    """Global L2 norm of the parameters (NaN/inf if any element is); one fused reduction."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # DTensor shards (FSDP2)
    sq = float(torch.stack([n.double() for n in torch._foreach_norm([t.detach() for t in local])]).square().sum())
    if any(hasattr(p, "to_local") for p in params):  # sharded: each process holds a part
        sq = _global_sum(acc, sq)
    return math.sqrt(sq) if math.isfinite(sq) else float("nan")


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint: Path | None
    steps: int
    history: list[dict[str, float]]
    interrupted: bool = False
    wall_seconds: float = 0.0
    health: list[dict[str, float]] = field(default_factory=list)  # teacher-health probes, step 0 included


class _StopNow(Exception):
    """A signal arrived while the step only waited (on a rollout server): abandon the step."""


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and returns at the step boundary.

    While ``waiting()`` is true (the step only waits on a server: nothing of it is computed yet)
    the first signal abandons the step at once (`_StopNow`) instead of waiting for replies that
    may take minutes or never come; the finished steps are saved all the same.
    """

    def __init__(self, waiting: Callable[[], bool] = lambda: False) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._waiting = waiting

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if self._waiting():
            print(f"\nsignal {signum}: abandoning the step in flight, saving a checkpoint, then exiting", flush=True)
            raise _StopNow(f"signal {signum}")
        print(f"\nsignal {signum}: finishing this step, saving a checkpoint, then exiting", flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: list[Callback] | None = None,
    grader: Callable[[str, Any], bool] | None = None,
) -> TrainResult:
    """Run Vision-OPD training as configured; returns where the final checkpoint is.

    ``output_dir`` must be new, or ``resume`` continues it, or ``overwrite`` replaces the run in
    it (see `vopd.runfolder`). ``callbacks`` run after every step and may return extra metrics;
    ``grader(text, sample)`` scores the teacher-health probe answers (default: rule-based grading).
    An exception mid-run saves a checkpoint first when the state is consistent (one process).
    """
    start = time.perf_counter()
    run = setup(cfg, resume=resume, overwrite=overwrite)
    state, sampler, dataset, total_steps = run.state, run.sampler, run.dataset, run.total_steps
    acc = state.accelerator
    if resume and acc.is_main_process:
        truncate_metrics(cfg.output_dir, state.step)  # the steps after the checkpoint are run again
    if state.step >= total_steps:
        ckpt = state.last_checkpoint
        acc.print(
            f"{cfg.output_dir} is already at step {state.step} of {total_steps}: nothing to do "
            f"(raise max_steps to continue). Checkpoint: {ckpt}"
        )
        release_run_folder(cfg.output_dir)
        return TrainResult(Path(cfg.output_dir), ckpt, state.step, [], False, time.perf_counter() - start)
    acc.init_trackers("vopd", config=_flat(config_to_dict(cfg)))
    collate = PairCollator(
        state.processor, thinking=cfg.model.thinking, max_prompt_tokens=cfg.data.max_prompt_tokens, defer_errors=True
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),  # keep the global RNG untouched (exact resume)
    )
    per_step = sampler.micro_batches_per_step()
    callbacks = list(callbacks or [])
    health = _make_health(cfg, dataset.samples, grader)
    if health is not None:
        # The drift reference is the teacher at the start of this run (or of this resumed segment).
        acc.log(health.prepare(state), step=state.step)
        callbacks.append(health)
    out = Path(cfg.output_dir)
    metrics_file = out / "metrics.jsonl" if "jsonl" in cfg.report_to and acc.is_main_process else None
    out.mkdir(parents=True, exist_ok=True)
    interrupted = False
    bar = tqdm(
        total=total_steps, initial=state.step, desc="vopd train", disable=not acc.is_main_process, dynamic_ncols=True
    )
    waiting = lambda: bool(getattr(state.engine, "interruptible", False))  # noqa: E731
    try:
        with bar, _StopFlag(waiting) as stop, _save_on_error(state):  # the bar closes before an error is printed
            interrupted = _loop(state, loader, stop, bar, callbacks, health, metrics_file, per_step, total_steps)
    except _StopNow as why:  # _save_on_error saved the finished steps first
        acc.print(f"stopping at step {state.step}: {why}")
        interrupted = True
    finally:
        state.engine.close()  # e.g. stop the vLLM server this run started, whatever happened
    bar.close()
    acc.end_training()
    release_run_folder(cfg.output_dir)
    result = TrainResult(
        out,
        state.last_checkpoint,
        state.step,
        state.history,
        interrupted,
        time.perf_counter() - start,
        health=list(health.history) if health is not None else [],
    )
    if acc.is_main_process:
        print(summary(result))
    return result


def _loop(
    state: TrainState,
    loader: Any,
    stop: _StopFlag,
    bar: Any,
    callbacks: list[Callback],
    health: Any,
    metrics_file: Path | None,
    per_step: int,
    total_steps: int,
) -> bool:
    """The steps of `train`; returns whether a signal or the health probe stopped the run early."""
    cfg, acc = state.cfg, state.accelerator
    batches: list[PromptPair] = []
    last_save = _clock()  # the start counts as a save: save_minutes runs from here
    for pair in loader:
        if pair.error:  # a row that cannot be used (data.on_error=raise), named file:row
            raise RecordError(pair.error)
        batches.append(pair)
        if len(batches) < per_step:
            continue
        skipped = [line for b in batches for line in b.skipped]  # rows that failed to load (on_error=skip)
        metrics = train_step(state, batches)
        batches = []
        state.step += 1
        state.mid_update = False
        for callback in callbacks:
            metrics.update(callback(state) or {})
        _record(state, metrics, skipped, metrics_file, final=state.step == total_steps)
        bar.update(1)
        bar.set_postfix(
            loss=f"{metrics['divergence']:.3g}",
            len=f"{metrics['response_length']:.1f}",
            s=f"{metrics['time_step']:.2f}",
        )
        if state.bad_in_a_row >= cfg.max_bad_steps:
            bar.close()
            raise TrainingError(
                f"{state.bad_in_a_row} non-finite losses/gradients in a row at step {state.step}; "
                f"last good checkpoint: {state.last_checkpoint or 'none'}. Lower optim.lr or check the data."
            )
        stop_reason = getattr(health, "stop_reason", None) or (f"signal {stop.signum}" if stop.signum else None)
        final = state.step == total_steps
        if (
            _save_due(state, _clock() - last_save)  # first: every process must take part in it
            or final
            or stop_reason
            or (cfg.save_every and state.step % cfg.save_every == 0)
        ):
            _save(state, final=final)
            last_save = _clock()
        if stop_reason:
            acc.print(f"stopping at step {state.step}: {stop_reason}")
            return True
    return False


def _record(
    state: TrainState, metrics: dict[str, float], skipped: list[str], metrics_file: Path | None, *, final: bool
) -> None:
    """Keep the step's metrics, log them every ``log_every`` steps, and report rows that were skipped."""
    if skipped:
        metrics["data_skipped"] = float(len(skipped))
        warnings.warn(
            f"step {state.step}: skipped {len(skipped)} row(s) that failed to load, "
            "replaced by the next samples:\n  " + "\n  ".join(skipped),
            stacklevel=2,
        )
    metrics["step"] = state.step
    state.history.append(metrics)
    if state.step % state.cfg.log_every == 0 or final:
        state.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=state.step)
        if metrics_file:
            append_record(metrics_file, metrics, fsync=False)


def _make_health(cfg: TrainConfig, train_samples: list, grader: Callable[[str, Any], bool] | None) -> Any:
    """The teacher-health probe of ``cfg.health`` (None when off)."""
    if cfg.health.every <= 0:
        return None
    from vopd.health import TeacherHealth, default_grader

    probe = train_samples
    if cfg.health.probe_data:
        probe = load_train_samples(cfg.health.probe_data, out_of_bounds=cfg.data.out_of_bounds, on_error="skip")
    return TeacherHealth(
        cfg.health, probe, views=cfg.views, grader=grader or default_grader, thinking=cfg.model.thinking
    )


#: The wall clock of ``save_minutes`` (a module attribute so a test can drive it step by step).
_clock = time.monotonic


def _save_due(state: TrainState, seconds_since_save: float) -> bool:
    """Whether ``save_minutes`` have passed since the last checkpoint, by the main process's clock:
    saving is collective, so with several processes every one follows rank 0's decision."""
    minutes = state.cfg.save_minutes
    if not minutes:
        return False
    due = seconds_since_save >= 60.0 * minutes
    if state.accelerator.num_processes > 1:
        import torch.distributed as dist

        flag = torch.tensor([float(due)], device=state.accelerator.device)
        dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


@contextmanager
def _save_on_error(state: TrainState):
    """On an exception (a bad image, a full disk, a bug) save what the run has before re-raising,
    when the weights are at a step boundary and unsaved. One process only: a collective save
    would wait forever for the processes that did not fail."""
    try:
        yield
    except (TrainingError, CheckpointError):
        raise  # diverging (the last good checkpoint is the one to go back to), or saving itself failed
    except Exception as err:
        saved_step = int(state.last_checkpoint.name.split("-")[-1]) if state.last_checkpoint else 0
        if state.mid_update or state.step <= saved_step or state.accelerator.num_processes > 1:
            raise
        try:
            path = _save(state)
        except Exception as err:  # the original error matters more; say why nothing was saved
            print(f"vopd train: could not save a checkpoint after the error ({err})", flush=True)
        else:
            why = "a signal;" if isinstance(err, _StopNow) else "the error below; fix the cause and"
            print(
                f"vopd train: saved {path} (step {state.step}) before stopping on {why} continue with --resume",
                flush=True,
            )
        raise


def _save(state: TrainState, *, final: bool = False) -> Path | None:
    acc = state.accelerator
    acc.wait_for_everyone()
    extra = {"skipped_steps": state.skipped_steps, "world_size": acc.num_processes, "config": config_to_dict(state.cfg)}
    if checkpoint_format(state.cfg) == "dcp":  # every rank writes its own shards (vopd.sharded_checkpoint)
        from vopd.sharded_checkpoint import save_sharded_checkpoint

        path = save_sharded_checkpoint(
            state.cfg.output_dir,
            state.step,
            policy=state.policy,
            teacher=state.teacher,
            root=state.student,
            optimizer=state.optimizer,
            processor=state.processor,
            scheduler=state.scheduler,
            extra=extra,
            keep=state.cfg.keep_checkpoints,
            export=final,  # the run's last checkpoint is also a plain HF folder
            say=acc.print,
        )
        state.last_checkpoint = path
        return path if acc.is_main_process else None
    path, gathered = None, {}
    if state.cfg.parallel.strategy == "fsdp2":  # gather full tensors on every rank (collectives), rank 0 writes
        from vopd.parallel import full_model_state, full_optimizer_state

        gathered = dict(
            model_state=full_model_state(state.policy),
            teacher_state=state.teacher.state_dict(),
            optimizer_state=full_optimizer_state(state.student, state.optimizer),
        )
    model: Any = state.policy
    if state.adapters is not None:  # LoRA: the adapter (and on request the merged model), not the base
        from vopd.lora import AdapterSaver

        model = AdapterSaver(state.adapters, save_merged=state.cfg.lora.save_merged)
    if acc.is_main_process:
        path = save_checkpoint(
            state.cfg.output_dir,
            state.step,
            model=model,
            processor=state.processor,
            teacher_state=gathered.pop("teacher_state", None) or state.teacher.state_dict(),
            optimizer=state.optimizer,
            scheduler=state.scheduler,
            **gathered,
            extra=extra,
            keep=state.cfg.keep_checkpoints,
            say=acc.print,
        )
    acc.wait_for_everyone()
    state.last_checkpoint = Path(state.cfg.output_dir) / f"checkpoint-{state.step}"
    return path


def summary(result: TrainResult) -> str:
    """A short human summary of a finished run."""
    hist = result.history
    first = int(hist[0]["step"]) - 1 if hist else result.steps
    resumed = f" (resumed at step {first})" if first > 0 else ""
    lines = [
        f"vopd train: {result.steps} steps in {result.wall_seconds:.1f} s{resumed}"
        + (" (interrupted)" if result.interrupted else "")
    ]
    if hist:
        times = sorted(h["time_step"] for h in hist)
        lines.append(
            f"  divergence {hist[0]['divergence']:.3g} -> {hist[-1]['divergence']:.3g}; "
            f"median {times[len(times) // 2]:.2f} s/step; skipped steps {int(sum(h['skipped'] for h in hist))}"
        )
        rows = int(sum(h.get("data_skipped", 0) for h in hist))
        if rows:
            lines.append(f"  {rows} data row(s) failed to load mid-run and were replaced (see the warnings)")
    lines.append(f"  checkpoint: {result.checkpoint}")
    return "\n".join(lines)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
