"""Building a training run: model, teacher, optimiser, scheduler, data order, resume state.

`setup(cfg)` returns a :class:`Run`: the :class:`TrainState` that `vopd.trainer.train_step`
mutates, the data order and the dataset. It calls one builder per concern, in this order:
:func:`build_model` (policy, processor, LoRA adapters), :func:`build_teacher` (the one place that
picks the teacher's implementation), :func:`build_data`, :func:`build_optimizer`,
:func:`build_engine` (the rollout engine) and, with ``resume=True``, :func:`restore` (teacher,
optimiser, scheduler, RNG and step of the newest checkpoint of ``cfg.output_dir``; the weights come
through :func:`build_model`, the data position follows from the step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vopd.checkpoint import CheckpointError, load_resume_point, restore_rng
from vopd.config import LABELLED_OBJECTIVES, TrainConfig, config_to_dict
from vopd.data import StepSampler, ViewDataset, drop_over_long_texts, load_train_data, require_answers
from vopd.knobs import ConfigError
from vopd.objectives import LossKnobs
from vopd.proposals import crops_from_model
from vopd.rollout import HFGenerateEngine, RolloutEngine
from vopd.runfolder import check_resume_config, check_world_size, prepare_run_folder
from vopd.scoring import ResponseHidden
from vopd.specs import resolve_model_spec
from vopd.teacher import Teacher, make_teacher


@dataclass
class TrainState:
    """Everything a step mutates; ``policy`` is the unwrapped student model."""

    cfg: TrainConfig
    accelerator: Any
    policy: nn.Module
    student: nn.Module  # ResponseHidden(policy), prepared by accelerate
    processor: Any
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    scheduler: Any
    engine: RolloutEngine
    knobs: LossKnobs  # the loss settings (loss.*), built once here and passed unchanged to every loss
    step: int = 0
    bad_in_a_row: int = 0
    skipped_steps: int = 0
    last_checkpoint: Path | None = None  # newest checkpoint of this run (the resumed one at first)
    mid_update: bool = False  # between the optimiser update and the step count: not consistent to save
    param_norm: float | None = None  # global parameter norm after the last update (divergence guard)
    history: list[dict[str, float]] = field(default_factory=list)
    adapters: Any = None  # the peft model when lora.r > 0 (vopd.lora); checkpoints then hold the adapter


def _lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warm, kind = cfg.optim.warmup_steps, cfg.optim.schedule

    def factor(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def resolve_model(cfg: TrainConfig, path: str | None = None) -> tuple[nn.Module, Any]:
    """Load ``model.path`` (or ``path``): any model spec of :func:`vopd.specs.resolve_model_spec`."""
    return resolve_model_spec(
        path or cfg.model.path,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        seed=cfg.seed,
    )


def _num_steps(cfg: TrainConfig, num_samples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, int(cfg.epochs * num_samples) // cfg.prompts_per_step)


def _make_accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps a process-wide singleton; several train() calls in one process (ablations,
    # tests, notebooks) may use different precisions. The distributed set-up (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    trackers, notice = resolve_trackers(cfg.report_to)
    acc = Accelerator(
        cpu=cfg.device == "cpu",
        mixed_precision=cfg.mixed_precision,
        log_with=trackers or None,
        project_dir=cfg.output_dir,
    )
    if notice:
        acc.print(notice)
    return acc


#: Trackers ``report_to=auto`` turns on when installed (wandb needs an account: only when named).
AUTO_TRACKERS = ("tensorboard",)
_TRACKER_EXTRA = {"tensorboard": "pip install 'vision-opd[tensorboard]'", "wandb": "pip install wandb"}


def resolve_trackers(report_to: list[str]) -> tuple[list[str], str | None]:
    """The accelerate trackers to start for ``report_to``, and a notice for the console (or None).

    ``auto`` adds each of :data:`AUTO_TRACKERS` that is installed and names the missing ones in
    the notice; a tracker named explicitly must be installed.

    Raises:
        ConfigError: a tracker named in ``report_to`` is not installed.
    """
    trackers: list[str] = []
    missing_auto: list[str] = []
    for name in report_to:
        if name == "jsonl":
            continue
        if name == "auto":
            for auto in AUTO_TRACKERS:
                (trackers if _tracker_available(auto) else missing_auto).append(auto)
            continue
        if not _tracker_available(name):
            raise ConfigError(
                f"report_to={name} but the {name} package is not installed: {_TRACKER_EXTRA[name]}, "
                f"or remove {name} from report_to"
            )
        trackers.append(name)
    trackers = list(dict.fromkeys(trackers))
    missing_auto = [m for m in missing_auto if m not in trackers]
    notice = None
    if missing_auto:
        notice = (
            f"report_to=auto: {', '.join(missing_auto)} not installed, not logging to it "
            f"({'; '.join(_TRACKER_EXTRA[m] for m in missing_auto)} to enable)"
        )
    return trackers, notice


def _tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    return importlib.util.find_spec(module) is not None


def _proposed_crops(
    cfg: TrainConfig,
    acc: Any,
    policy: nn.Module,
    processor: Any,
    samples: list,
    origins: list[str],
    sharded_root: nn.Module | None = None,
) -> tuple[list, list[str]]:
    """`vopd.proposals.crops_from_model` on every rank, and the ``file:row`` of each sample kept.

    The main process proposes and writes the cache first; the others then read it, so all ranks
    train on the same crops. ``views.proposal_keep`` < 1 drops samples (order kept): their
    origins go with them. A sharded policy (``sharded_root``: its FSDP2 root) cannot run on one
    rank alone: every rank proposes the same samples in step (the collectives line up), with the
    root unit gathered, and only the main process writes the cache.
    """
    if sharded_root is not None:
        from vopd.parallel import root_gathered

        acc.wait_for_everyone()  # every rank reads the same cache before proposing what it lacks
        with root_gathered(sharded_root), torch.no_grad():
            proposed = crops_from_model(
                samples,
                cfg.views,
                policy,
                processor,
                cfg.output_dir,
                main=acc.is_main_process,
                thinking=cfg.model.thinking,
                model_name=cfg.model.path,
            )
        acc.wait_for_everyone()
        return proposed, _kept_origins(samples, origins, proposed)
    proposed = (
        crops_from_model(
            samples,
            cfg.views,
            policy,
            processor,
            cfg.output_dir,
            thinking=cfg.model.thinking,
            model_name=cfg.model.path,
        )
        if acc.is_main_process
        else None
    )
    acc.wait_for_everyone()
    if proposed is None:
        proposed = crops_from_model(
            samples,
            cfg.views,
            policy,
            processor,
            cfg.output_dir,
            main=False,
            thinking=cfg.model.thinking,
            model_name=cfg.model.path,
        )
    return proposed, _kept_origins(samples, origins, proposed)


def _kept_origins(samples: list, origins: list[str], proposed: list) -> list[str]:
    """The ``file:row`` of each sample that ``proposed`` kept (same order)."""
    kept, i = [], 0
    for sample, origin in zip(samples, origins):
        if i < len(proposed) and proposed[i].id == sample.id:
            kept.append(origin)
            i += 1
    return kept


class Run(NamedTuple):
    """What :func:`setup` builds: the state a step mutates, the data order and the data."""

    state: TrainState
    sampler: StepSampler  # the step's prompt indices = f(seed, step): exact resume
    dataset: ViewDataset
    total_steps: int


def setup(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> Run:
    """Build model, teacher, optimiser, data and rollout engine; restore a checkpoint when ``resume``.

    ``output_dir`` must not hold another run unless ``resume`` (continue it: the newest intact
    checkpoint, whose saved config must match this one) or ``overwrite`` (remove it); see
    `vopd.runfolder`. The builders run in a fixed order (it fixes which random numbers each one
    draws, so a run is reproducible from its seed).
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    acc = _make_accelerator(cfg)
    prepare_run_folder(
        cfg.output_dir, resume=resume, overwrite=overwrite, main_process=acc.is_main_process, say=acc.print
    )
    acc.wait_for_everyone()
    ckpt, saved = _resume_point(cfg, acc) if resume else (None, None)
    policy, processor, adapters, weights = build_model(cfg, acc, ckpt, saved)
    student = ResponseHidden(policy)
    teacher = build_teacher(cfg, acc, policy, student, adapters, weights)
    samples, origins = build_data(
        cfg, acc, policy, processor, sharded_root=student if cfg.parallel.strategy == "fsdp2" else None
    )
    total_steps = _num_steps(cfg, len(samples))
    optimizer, scheduler = build_optimizer(cfg, policy, total_steps)
    engine = build_engine(cfg, processor, student, adapters)
    if cfg.parallel.strategy != "fsdp2":  # sharded modules are already distributed (vopd.parallel)
        student = acc.prepare(student)
        optimizer = acc.prepare_optimizer(optimizer) if hasattr(acc, "prepare_optimizer") else acc.prepare(optimizer)
    state = TrainState(
        cfg,
        acc,
        policy,
        student,
        processor,
        teacher,
        optimizer,
        scheduler,
        engine,
        LossKnobs.from_config(cfg.loss),
        adapters=adapters,
    )
    if ckpt is not None:
        restore(state, ckpt, saved)
    sampler = StepSampler(
        len(samples),
        prompts_per_step=cfg.prompts_per_step,
        micro_batch_prompts=cfg.micro_batch_prompts,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        start_step=state.step,
        num_steps=total_steps,
        rank=acc.process_index,
        world_size=acc.num_processes,
    )
    # OPSD's teacher sees the student's image with the reference answer in its text, whatever teacher.view.
    dataset = ViewDataset(
        samples,
        cfg.views,
        teacher_sees="full" if cfg.objective == "opsd" else cfg.teacher.view,
        origins=origins,
        on_error=cfg.data.on_error,
        defer_errors=True,  # raised by the loop
        reference_in_teacher=cfg.objective == "opsd",
        carry_answers=cfg.objective == "sft_gold",
    )
    return Run(state, sampler, dataset, total_steps)


def build_model(
    cfg: TrainConfig, acc: Any, ckpt: Path | None, saved: dict[str, Any] | None
) -> tuple[nn.Module, Any, Any, Any]:
    """The student policy in training mode, its processor, its LoRA adapters (``lora.r > 0``,
    injected in place; else None) and, for a sharded load, the weight files its shards are read
    from (else None: the policy is on the device). From ``ckpt`` (trainer state ``saved``) when
    resuming: its weights; for LoRA the base of ``model.path`` and the checkpoint's adapter; for a
    sharded (dcp) checkpoint, which holds no HF weights, ``model.path`` (:func:`restore` loads the
    shards)."""
    try:
        weights_in_ckpt = ckpt is not None and cfg.lora.r == 0 and saved.get("format") != "dcp"
        policy, processor, weights = _sharded_skeleton(cfg, str(ckpt) if weights_in_ckpt else cfg.model.path)
        if policy is None:
            policy, processor = resolve_model(cfg, str(ckpt) if weights_in_ckpt else None)
    except (OSError, ValueError, RuntimeError) as err:
        if ckpt is None:
            raise
        raise CheckpointError(f"{ckpt}: the model cannot be loaded ({type(err).__name__}: {err})") from err
    if weights is None:  # a meta skeleton is allocated shard by shard in vopd.parallel.build_sharded
        policy.to(acc.device)
    if cfg.model.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    adapters = None
    if cfg.lora.r > 0:  # vopd.lora: adapters injected into policy in place; the teacher lives on the same base
        from vopd.lora import apply_lora, load_adapter

        adapters = apply_lora(policy, cfg.lora, ema_adapter=cfg.teacher.kind == "ema")
        if ckpt is not None:
            load_adapter(adapters, ckpt)
    return policy, processor, adapters, weights


def build_teacher(
    cfg: TrainConfig, acc: Any, policy: nn.Module, student: nn.Module, adapters: Any, weights: Any = None
) -> Teacher:
    """The teacher of ``teacher.kind``; the one place that picks its implementation.

    Sharded training (``parallel.strategy=fsdp2``): student and teacher sharded with one plan,
    before the optimiser sees the parameters (`vopd.parallel`; ``weights``: the files each rank
    reads its shards from, see :func:`build_model`). LoRA with an ema or frozen
    teacher: an adapter on the same base (`vopd.lora`). Otherwise a teacher of `vopd.teacher`
    (an external one loads ``teacher.path``).
    """
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    if cfg.parallel.strategy == "fsdp2":
        from vopd.parallel import build_sharded

        return build_sharded(
            student,
            policy,
            teacher_kind=cfg.teacher.kind,
            rate=cfg.teacher.ema_rate,
            teacher_dtype=dtype,
            param_dtype=dtype,
            device=acc.device,
            weights=weights,
            # another checkpoint: loaded whole on each rank, then sharded
            external=resolve_model(cfg, cfg.teacher.path)[0] if cfg.teacher.kind == "external" else None,
            mix=cfg.teacher.mix,
        )
    if adapters is not None and cfg.teacher.kind in ("ema", "frozen"):
        from vopd.lora import AdapterTeacher

        return AdapterTeacher(cfg.teacher.kind, adapters, rate=cfg.teacher.ema_rate)
    external = resolve_model(cfg, cfg.teacher.path)[0].to(acc.device) if cfg.teacher.kind == "external" else None
    return make_teacher(
        cfg.teacher.kind, policy, ema_rate=cfg.teacher.ema_rate, mix=cfg.teacher.mix, dtype=dtype, external=external
    )


def build_data(
    cfg: TrainConfig, acc: Any, policy: nn.Module, processor: Any, *, sharded_root: nn.Module | None = None
) -> tuple[list, list[str]]:
    """The training samples and their ``file:row`` origins, after the checks that are cheap to make
    before step 1 (over-long questions, missing answers for the labelled objectives) and, for a
    proposed ``views.crop_source``, with the model's own crops in place of the boxes (a sharded
    policy, ``sharded_root`` its FSDP2 root, proposes on every rank in step)."""
    samples, origins = load_train_data(cfg.data.train, out_of_bounds=cfg.data.out_of_bounds, on_error=cfg.data.on_error)
    samples, origins = drop_over_long_texts(  # cheap (text only): an over-long question is found before step 1
        processor,
        samples,
        origins,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        hint=cfg.views.hint,
        thinking=cfg.model.thinking,
        on_error=cfg.data.on_error,
    )
    if cfg.objective in LABELLED_OBJECTIVES:  # opsd / sft_gold read the answers: every row needs one
        samples, origins = require_answers(samples, origins, objective=cfg.objective, on_error=cfg.data.on_error)
    if cfg.views.crop_source != "box":  # the model proposes the crops; gold boxes are dropped unread
        samples, origins = _proposed_crops(cfg, acc, policy, processor, samples, origins, sharded_root=sharded_root)
    return samples, origins


def build_optimizer(cfg: TrainConfig, policy: nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters and its learning-rate schedule (``optim.*``)."""
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))


def build_engine(cfg: TrainConfig, processor: Any, student: nn.Module, adapters: Any = None) -> RolloutEngine:
    """The rollout engine of ``rollout.engine``: HF generate in this process, or a vLLM server (with a
    LoRA student, ``adapters``, it serves the base and receives the adapter alone); under sharded
    training it samples with the student's root unit gathered."""
    if cfg.rollout.engine == "vllm":
        from vopd.rollout_vllm import VLLMServerEngine, default_work_dir

        engine: RolloutEngine = VLLMServerEngine(
            processor,
            work_dir=default_work_dir(cfg.output_dir),
            url=cfg.rollout.vllm_url or None,
            python=cfg.rollout.vllm_python,
            server_args=cfg.rollout.vllm_args,
            startup_timeout=cfg.rollout.vllm_start_timeout,
            request_timeout=cfg.rollout.request_timeout(),
            adapters=adapters,
        )
    else:  # naive: generate() repeats each prompt n times
        engine = HFGenerateEngine(processor, share_prefill=not cfg.naive)
    if cfg.parallel.strategy == "fsdp2" and cfg.rollout.engine != "vllm":  # vLLM: the server holds the weights
        from vopd.parallel import ShardedSampling

        engine = ShardedSampling(engine, student)
    return engine


def restore(state: TrainState, ckpt: Path, saved: dict[str, Any]) -> None:
    """Put the checkpoint's trainer state into ``state``: teacher, optimiser, scheduler (this run's
    ``optim.lr`` wins), RNG and step. The weights were loaded by :func:`build_model`, except a
    sharded (dcp) checkpoint's: every rank reads its slices of the student's shards here."""
    cfg, acc = state.cfg, state.accelerator
    state.last_checkpoint = ckpt
    from vopd.parallel import check_resume

    note = check_resume(saved, cfg.parallel.strategy, acc.num_processes)  # refuses a change of strategy
    if note:
        acc.print(note)
    if saved.get("format") == "dcp":  # every rank reads its own slices of the shards (at any world size)
        from vopd.sharded_checkpoint import load_sharded_checkpoint

        load_sharded_checkpoint(
            ckpt, policy=state.policy, teacher=state.teacher, root=state.student, optimizer=state.optimizer, saved=saved
        )
    elif cfg.parallel.strategy == "fsdp2":
        state.teacher.load_state_dict({k: v.to(acc.device) for k, v in saved["teacher"].items()})
        from vopd.parallel import load_optimizer_state

        load_optimizer_state(state.student, state.optimizer, saved["optimizer"])
    else:
        state.teacher.load_state_dict({k: v.to(acc.device) for k, v in saved["teacher"].items()})
        state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    _apply_lr(state.scheduler, cfg, acc)
    restore_rng(saved["rng"])
    state.step = saved["step"]
    state.skipped_steps = saved.get("skipped_steps", 0)
    acc.print(f"resumed from {ckpt} at step {state.step}")


def _sharded_skeleton(cfg: TrainConfig, source: str) -> tuple[Any, Any, Any]:
    """Under ``parallel.strategy=fsdp2`` (full fine-tuning) from a local folder of safetensors
    weights: ``(model on the meta device, processor, vopd.parallel.WeightFiles)``, so that each rank
    later reads only its own shards. ``(None, None, None)`` otherwise (hub ids, ``tiny:`` models,
    LoRA, ddp, tensor names the files do not hold): every rank then loads the full model."""
    from vopd.parallel import WeightFiles

    if cfg.parallel.strategy != "fsdp2" or cfg.lora.r > 0 or not WeightFiles.usable(source):
        return None, None, None
    from vopd.models import build_empty_model, load_processor

    policy = build_empty_model(
        source,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
    )
    weights = WeightFiles(source)
    if weights.names_for(policy) is None:
        return None, None, None
    return policy, load_processor(source, trust_remote_code=cfg.model.trust_remote_code), weights


def _resume_point(cfg: TrainConfig, acc: Any) -> tuple[Path, dict[str, Any]]:
    """The newest intact checkpoint of ``cfg.output_dir`` and its trainer state, checked against
    this run (config keys and world size)."""
    found = load_resume_point(cfg.output_dir, say=acc.print)
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {cfg.output_dir}; start without --resume")
    ckpt, saved = found
    if cfg.parallel.strategy != "fsdp2":  # fsdp2 reshards its full saved state to any world size (vopd.parallel)
        check_world_size(saved.get("world_size"), acc.num_processes, checkpoint=ckpt)
    check_resume_config(saved.get("config"), config_to_dict(cfg), checkpoint=ckpt, say=acc.print)
    return ckpt, saved


def _apply_lr(scheduler: Any, cfg: TrainConfig, acc: Any) -> None:
    """Make ``optim.lr`` of this run win over the checkpoint's (the schedule shape already does)."""
    old = scheduler.base_lrs[0]
    if math.isclose(old, cfg.optim.lr, rel_tol=1e-12):
        return
    acc.print(f"resume: optim.lr {old:g} -> {cfg.optim.lr:g} (from this run's config)")
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [cfg.optim.lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = cfg.optim.lr
        group["lr"] = cfg.optim.lr * factor
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
