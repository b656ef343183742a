"""Typed training configuration: YAML files plus ``key=value`` overrides.

Every knob is declared once, below, with :func:`vopd.knobs.knob`: its default, its help text and
the values it accepts. ``vopd config`` prints them and ``docs/config.md`` is generated from them
(``vopd config --markdown``). Unknown keys, wrong types and out-of-range values are a
:class:`ConfigError` naming the dotted key, so a typo never silently falls back to a default.

Adding a knob: add a ``knob(...)`` field to its section (or a new section dataclass whose
``__post_init__`` calls ``check_knobs(self, "<section>")`` and a field of that type on
:class:`TrainConfig`), then regenerate docs/config.md. A renamed or removed key is refused
(with a suggestion of the nearest key), not mapped: see the README's notes on 0.x.

This module imports no model code (no torch, no transformers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vopd.knobs import ConfigError, KnobInfo, build, check_knobs, describe, knob, load_yaml

__all__ = [
    "VIEW_NAMES",
    "CROP_SOURCES",
    "CheckpointConfig",
    "LABELLED_OBJECTIVES",
    "OBJECTIVES",
    "SUPERVISED_OBJECTIVES",
    "DataConfig",
    "HealthConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RolloutConfig",
    "TeacherConfig",
    "TrainConfig",
    "ViewConfig",
    "check_view",
    "checkpoint_format",
    "config_markdown",
    "config_to_dict",
    "describe_config",
    "load_config",
    "parse_overrides",
    "recipe_path",
    "recipes",
]

#: The shipped recipes (package data; ``configs/*.yaml`` in the repository link to these files).
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def recipes() -> list[str]:
    """Names of the shipped recipes (``vopd train --config NAME`` loads one)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The file of a shipped recipe, e.g. ``recipe_path("toy_demo")``; works from any install."""
    path = RECIPES_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        raise ConfigError(f"no shipped recipe {name!r}; shipped: {', '.join(recipes()) or 'none'}")
    return path


#: What the student learns from (`objective`): Vision-OPD and the paper's baselines, one trainer.
OBJECTIVES: tuple[str, ...] = ("opd", "sft_self", "opsd", "sft_gold")
#: The objectives that read the records' reference answers.
LABELLED_OBJECTIVES: tuple[str, ...] = ("opsd", "sft_gold")
#: The objectives trained by cross-entropy on given target tokens (no teacher scoring, no divergence).
SUPERVISED_OBJECTIVES: tuple[str, ...] = ("sft_self", "sft_gold")

#: Values of ``views.crop_source`` (and ``vopd gap --crop-source``): the gold boxes, or a region the
#: model proposes itself (`vopd.proposals`).
CROP_SOURCES: tuple[str, ...] = ("box", "search", "attention", "grounding")

#: The one view vocabulary (training, ``vopd gap``, the toy world): the clean full image, the
#: zoomed evidence crop (the teacher's view) and the full image with the red box + hint.
VIEW_NAMES: tuple[str, ...] = ("full", "crop", "boxed_full")


def check_view(name: str, *, key: str = "view") -> str:
    """``name`` if it is one of :data:`VIEW_NAMES`, else a `ConfigError` naming ``key``."""
    if name not in VIEW_NAMES:
        raise ConfigError(f"{key}={name!r} is not one of {' | '.join(VIEW_NAMES)}")
    return name


@dataclass
class ModelConfig:
    path: str = knob(
        "", 'hub id, local dir, "toy-base" (the shipped toy checkpoint) or "tiny:<family>" (random tiny model)'
    )
    dtype: str = knob("float32", "weight dtype", choices=("float32", "bfloat16", "float16"))
    trust_remote_code: bool = knob(False, "run model code from the checkpoint; only for sources you trust")
    gradient_checkpointing: bool = knob(False, "recompute activations in backward to save memory")
    attn_implementation: str | None = knob(None, 'e.g. "sdpa", "flash_attention_2"; None = transformers default')
    thinking: bool | None = knob(False, "chat-template thinking mode (Qwen3.5); False = the paper's non-thinking mode")

    def __post_init__(self) -> None:
        check_knobs(self, "model")


@dataclass
class DataConfig:
    train: str = knob(
        "",
        'JSONL (our format or Vision-OPD-6K), or "toyworld:N[:SEED[:WORLD]]" for N generated toy scenes '
        "(WORLD: M, the default, or R)",
    )
    out_of_bounds: str = knob(
        "clip", "evidence box partly outside the image: clip (and count) or reject", choices=("clip", "reject")
    )
    on_error: str = knob(
        "raise", "a bad record: raise (naming file:row) or skip (counted and reported)", choices=("raise", "skip")
    )
    max_prompt_tokens: int = knob(8192, "longer prompts are an error naming the row", ge=1)
    num_workers: int = knob(0, "data-loader worker processes building views and processor inputs", ge=0)
    shuffle: bool = knob(True, "reshuffle every epoch (seeded)")

    def __post_init__(self) -> None:
        check_knobs(self, "data")


@dataclass
class ViewConfig:
    """How the student and teacher views are built from a sample (see :mod:`vopd.views`)."""

    context: float = knob(
        0.5,
        "padding added on each side of the evidence region, as a fraction of its width "
        "(left/right) and height (top/bottom); 0.5 doubles each side",
        ge=0,
    )
    min_side: int = knob(56, "minimum crop side in source pixels (small boxes get surrounding context)", ge=1)
    zoom: float = knob(2.0, "resize factor of the teacher crop (bicubic)", gt=0)
    max_pixels: int = knob(1_003_520, "pixel budget of the zoomed crop; the zoom shrinks to fit (may go below 1)", ge=1)
    draw_box: bool = knob(False, "the student view gets the evidence boxes drawn in red on the full image")
    box_color: tuple[int, int, int] = knob((255, 0, 0), "RGB colour of the drawn box (three ints)", ge=0, le=255)
    box_width: int = knob(3, "line width in pixels; 0 picks max(2, round(min(W, H) / 250))", ge=0)
    box_margin: int = knob(
        0,
        "gap in pixels between the evidence box and the inner edge of the line; the line "
        "is always drawn outside the box so it never hides evidence pixels",
        ge=0,
    )
    hint: bool = knob(False, "add the paper's hint sentence to the prompt text (both views share the text)")
    use_provided_crop: bool = knob(True, "use the sample's provided teacher image when present instead of cropping")
    crop_source: str = knob(
        "box",
        "where the teacher's crop comes from in training: box (the sample's evidence "
        "boxes or provided crop), or a region the model proposes itself: search, "
        "attention or grounding (vopd.proposals; every gold box and provided crop is "
        "then dropped unread; grounding needs a Qwen2-VL, Qwen2.5-VL or Qwen3-VL "
        "model)",
        choices=CROP_SOURCES,
    )
    student_crop_share: float = knob(
        0.0,
        "crop replay: this share of the training samples (chosen by a hash of the sample id, "
        "vopd.views.replay_draw) shows the student the teacher's own crop instead of the full "
        "image; anchors the student's reading of the privileged view, which full-image training "
        "alone lets drift (docs/toyworld.md); 0 = off, as in the paper",
        ge=0,
        lt=1,
    )
    proposal_keep: float = knob(
        1.0,
        "with a proposed crop_source: train only on this fraction of the samples, "
        "those whose proposals are surest (highest proposal score); the rest are "
        "dropped before training (< 1 with crop_source=box is an error)",
        gt=0,
        le=1,
    )

    def __post_init__(self) -> None:
        color = tuple(self.box_color) if isinstance(self.box_color, (list, tuple)) else ()
        if len(color) != 3 or not all(isinstance(c, int) and not isinstance(c, bool) for c in color):
            raise ConfigError(f"views.box_color must be 3 ints in 0-255, got {self.box_color!r}")
        self.box_color = color  # YAML gives lists
        check_knobs(self, "views")
        if self.proposal_keep < 1 and self.crop_source == "box":  # nothing to rank: it would be ignored
            raise ConfigError(
                f"views.proposal_keep={self.proposal_keep:g} ranks the model's own proposals; set "
                "views.crop_source to search, attention or grounding, or leave proposal_keep at 1"
            )


@dataclass
class RolloutConfig:
    """How the student samples (see :mod:`vopd.rollout`)."""

    n: int = knob(8, "responses per prompt (paper: 8)", ge=1)
    temperature: float = knob(1.0, "softmax temperature; 0 means greedy decoding (eval), which ignores top_p", ge=0)
    top_p: float = knob(1.0, "nucleus sampling mass (1.0 = the full distribution, as in the paper)", gt=0, le=1)
    max_new_tokens: int = knob(1024, "longest response, EOS included (paper: 1024)", ge=1)
    engine: str = knob(
        "hf",
        "who samples: hf (transformers, in the training process) or vllm (a vLLM server "
        "in its own environment, docs/vllm.md)",
        choices=("hf", "vllm"),
    )
    vllm_url: str = knob(
        "",
        "engine=vllm: URL of a server you started (VLLM_SERVER_DEV_MODE=1, vopd's pass-through "
        "chat template, this machine's file system: docs/vllm.md); empty = vopd starts one",
    )
    vllm_python: str = knob(
        ".venv-vllm/bin/python",
        "engine=vllm: interpreter of the vLLM environment "
        "(scripts/setup_vllm.sh) vopd starts the server with; "
        "relative to the current directory",
    )
    vllm_args: list[str] = knob(
        help="engine=vllm: extra arguments for the server vopd starts; on CPU "
        "[--max-model-len, '512', --enforce-eager]",
        factory=list,
    )
    vllm_request_timeout: float = knob(
        0.0,
        "engine=vllm: seconds one sampling request may take before the run stops naming the "
        "server; 0 = 60 + 0.1 per max_new_tokens (a server that accepts and never answers is "
        "found in about a minute, not ten)",
        ge=0,
    )
    vllm_start_timeout: float = knob(
        300.0,
        "engine=vllm: seconds to wait for the server vopd starts to answer /health before "
        "stopping it and the run (raise it for large models or slow disks)",
        gt=0,
    )

    def __post_init__(self) -> None:
        check_knobs(self, "rollout")

    def request_timeout(self) -> float:
        """``vllm_request_timeout``, or its default scaled with ``max_new_tokens`` when 0."""
        return self.vllm_request_timeout or 60.0 + 0.1 * self.max_new_tokens


@dataclass
class LossConfig:
    beta: float = knob(0.5, "generalized JSD mixture weight; 0 = forward KL(T||S), 1 = reverse KL(S||T)", ge=0, le=1)
    estimator: str = knob(
        "topk",
        "topk (student top-k + tail), full (whole vocabulary) or sampled (sampled-token reverse KL)",
        choices=("topk", "full", "sampled"),
    )
    top_k: int = knob(100, "support size for estimator=topk", ge=1)
    add_tail: bool = knob(True, "add the tail bucket (else renormalise the top-k)")
    support: str = knob("student", "whose top-k ids form the support", choices=("student", "teacher", "union"))
    temperature: float = knob(1.0, "applied to both models' logits inside the divergence", gt=0)
    aggregation: str = knob(
        "token_mean",
        "token_mean (released code) or seq_mean (the paper's 1/|y| formula)",
        choices=("token_mean", "seq_mean"),
    )
    rollout_correction: bool = knob(False, "weight tokens by min(pi_trainer/pi_sampler, clip); for external samplers")
    ratio_clip: float = knob(2.0, "clip of the rollout-correction weight", gt=0)
    chunk_size: int = knob(
        128,
        "response tokens per chunk of the vocabulary projection (128 x 152k vocab ~ 80 MB "
        "per tensor); results do not depend on it",
        ge=1,
    )

    def __post_init__(self) -> None:
        check_knobs(self, "loss")
        if self.estimator == "sampled" and self.beta != 1.0:
            raise ConfigError(f"loss.estimator=sampled estimates reverse KL only: set loss.beta=1 (got {self.beta})")


@dataclass
class TeacherConfig:
    kind: str = knob(
        "ema",
        "ema | frozen | trust_region | live | external",
        choices=("ema", "frozen", "trust_region", "live", "external"),
    )
    ema_rate: float = knob(
        0.05, "kind=ema: theta_T <- (1 - ema_rate) theta_T + ema_rate theta_S after every optimiser step", ge=0, le=1
    )
    mix: float = knob(
        0.05, "kind=trust_region: teacher logits = lerp(initial-model logits, current-student logits, mix)", ge=0, le=1
    )
    path: str | None = knob(None, "checkpoint for kind=external")
    view: str = knob(
        "crop",
        "what the teacher sees: crop (Vision-OPD) or full (control: no privileged view)",
        choices=("crop", "full"),
    )

    def __post_init__(self) -> None:
        check_knobs(self, "teacher")
        if self.kind == "external" and not self.path:
            raise ConfigError("teacher.kind=external needs teacher.path=<checkpoint>")


@dataclass
class OptimConfig:
    lr: float = knob(2e-6, "AdamW learning rate (paper: 2e-6)", ge=0)
    weight_decay: float = knob(0.01, "AdamW decoupled weight decay (paper: 0.01)", ge=0)
    betas: list[float] = knob(factory=lambda: [0.9, 0.999], help="AdamW (beta1, beta2), each in [0, 1)", ge=0, lt=1)
    warmup_steps: int = knob(10, "linear warmup from 0", ge=0)
    schedule: str = knob("constant", "after warmup", choices=("constant", "cosine", "linear"))
    grad_clip: float = knob(1.0, "max global grad norm; 0 disables", ge=0)

    def __post_init__(self) -> None:
        check_knobs(self, "optim")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas needs two values [beta1, beta2], got {self.betas}")


@dataclass
class HealthConfig:
    """Teacher-health probe (see :mod:`vopd.health`)."""

    every: int = knob(0, "probe the teacher every N steps (0 = off)", ge=0)
    probe_data: str = knob(
        "", "held-out probe samples (JSONL or toyworld:N:SEED); empty = first probe_size training samples"
    )
    probe_size: int = knob(32, "prompts in the fixed probe batch", ge=1)
    top_k: int = knob(20, "support (initial model's top-k + tail) of the drift KL", ge=1)
    max_new_tokens: int = knob(32, "length of the greedy probe answers", ge=1)
    drift_warn: float = knob(0.5, "warn when teacher_drift (nats/token) exceeds this", ge=0)
    acc_drop_warn: float = knob(0.1, "warn when teacher probe accuracy falls this far below its start", ge=0, le=1)
    on_degrade: str = knob(
        "warn",
        "warn, stop (save a checkpoint and end the run) or rollback (teacher back to its last healthy probe)",
        choices=("warn", "stop", "rollback"),
    )

    def __post_init__(self) -> None:
        check_knobs(self, "health")


@dataclass
class ParallelConfig:
    """How several processes share the model (see :mod:`vopd.parallel`, docs/scaling.md)."""

    strategy: str = knob(
        "ddp",
        "ddp (each process holds the whole student, teacher and optimiser state; also plain "
        "1-process runs) or fsdp2 (all three sharded per decoder layer / vision block; "
        "any teacher.kind but live)",
        choices=("ddp", "fsdp2"),
    )

    def __post_init__(self) -> None:
        check_knobs(self, "parallel")


@dataclass
class CheckpointConfig:
    """How checkpoints are written (see :mod:`vopd.checkpoint`, :mod:`vopd.sharded_checkpoint`, docs/scaling.md)."""

    format: str = knob(
        "auto",
        "auto (dcp under parallel.strategy=fsdp2, else hf), dcp (every rank writes its own shards of student, "
        "teacher and optimiser state; no gather; resumes at any world size; the run's final checkpoint also "
        "gets the plain HF weights, vopd export writes them for any other) or hf (the student gathered into a "
        "plain HF folder on rank 0 at every save). dcp needs parallel.strategy=fsdp2",
        choices=("auto", "dcp", "hf"),
    )

    def __post_init__(self) -> None:
        check_knobs(self, "checkpoint")


def checkpoint_format(cfg: TrainConfig) -> str:
    """``dcp`` or ``hf``: ``checkpoint.format`` with ``auto`` resolved by ``parallel.strategy``."""
    if cfg.checkpoint.format == "auto":
        return "dcp" if cfg.parallel.strategy == "fsdp2" else "hf"
    return cfg.checkpoint.format


@dataclass
class LoraConfig:
    """LoRA adapters through peft (see :mod:`vopd.lora`, docs/scaling.md)."""

    r: int = knob(
        0,
        "LoRA rank; 0 = off (full fine-tuning). Needs peft (the lora extra). The teacher is the base "
        "with adapters off (frozen) or a second adapter (ema): no second model copy",
        ge=0,
    )
    alpha: float = knob(16.0, "LoRA scaling numerator (the adapter update is scaled by alpha / r)", gt=0)
    dropout: float = knob(0.0, "dropout on the adapter input (student only; the teacher scores without it)", ge=0, lt=1)
    target_modules: list[str] = knob(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="module names that get adapters (peft suffix matching); the default adapts the language model's "
        "attention and MLP, not the vision tower",
    )
    save_merged: bool = knob(
        False,
        "also write base + adapter merged as a plain HF folder (merged/) in each "
        "checkpoint (a full model copy on disk per checkpoint)",
    )

    def __post_init__(self) -> None:
        check_knobs(self, "lora")
        if self.r > 0 and not self.target_modules:
            raise ConfigError(
                "lora.target_modules is empty: name the modules that get adapters (e.g. [q_proj, v_proj])"
            )


@dataclass
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    views: ViewConfig = dataclasses.field(default_factory=ViewConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    health: HealthConfig = dataclasses.field(default_factory=HealthConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    output_dir: str = knob("runs/vopd", "checkpoints, metrics.jsonl, TensorBoard logs")
    seed: int = knob(0, "seeds the model init (tiny:*), data order and sampling", ge=0)
    prompts_per_step: int = knob(
        96, "prompts per optimiser step (global, over all processes); x rollout.n sequences", ge=1
    )
    micro_batch_prompts: int = knob(8, "prompts per forward/backward (gradient accumulation splits a step)", ge=1)
    max_steps: int = knob(0, "0 = one pass over the data (epochs x len(data) / prompts_per_step)", ge=0)
    epochs: float = knob(1.0, "passes over the data, used when max_steps = 0", gt=0)
    save_every: int = knob(0, "also checkpoint every N steps (0 = by wall time only); the last step always saves", ge=0)
    save_minutes: float = knob(
        30.0,
        "checkpoint when this many minutes of wall time have passed since the last checkpoint (or the "
        "start), so a kill -9, the OOM killer or a preempted node loses at most that much; 0 = off",
        ge=0,
    )
    keep_checkpoints: int = knob(2, "newest checkpoints kept (0 = keep all)", ge=0)
    log_every: int = knob(1, "write metrics every N steps (the last step is always written)", ge=1)
    mixed_precision: str = knob(
        "no", "no or bf16 (autocast; master weights stay in model.dtype)", choices=("no", "bf16")
    )
    report_to: list[str] = knob(
        factory=lambda: ["jsonl", "auto"],
        help="metric sinks; auto = tensorboard if installed, else a one-line notice; a tracker "
        "named explicitly must be installed",
        choices=("jsonl", "tensorboard", "wandb", "auto"),
    )
    max_bad_steps: int = knob(
        3, "consecutive non-finite losses before the run stops (1 = stop at the first; there is no 'never')", ge=1
    )
    device: str = knob("auto", "auto (accelerate's choice), cpu, or cuda", choices=("auto", "cpu", "cuda"))
    threads: int = knob(0, "torch CPU threads (0 = torch default)", ge=0)
    naive: bool = knob(False, "turn every optimisation off (for measuring their gain)")
    objective: str = knob(
        "opd",
        "what the student learns from, all through the same trainer (docs/method.md, "
        "Baselines): opd (Vision-OPD: the teacher scores the student's samples on the crop), "
        "sft_self (cross-entropy on the teacher's own answers on the crop; no labels), opsd "
        "(the teacher sees the full image and the reference answer in its text; needs "
        "answers) or sft_gold (cross-entropy on the reference answers; needs answers)",
        choices=OBJECTIVES,
    )

    def __post_init__(self) -> None:
        check_knobs(self, "")
        _check_objective(self)
        if self.checkpoint.format == "dcp" and self.parallel.strategy != "fsdp2":
            raise ConfigError(
                "checkpoint.format=dcp writes the shards of a sharded model: it needs parallel.strategy=fsdp2 "
                "(with ddp every process holds the whole model; use checkpoint.format=hf or auto)"
            )
        if self.rollout.engine == "vllm" and self.lora.r > 512:  # vLLM 0.32's largest --max-lora-rank
            raise ConfigError(
                f"rollout.engine=vllm with lora.r={self.lora.r}: vLLM serves LoRA ranks up to 512 "
                "(docs/vllm.md); use a smaller lora.r or rollout.engine=hf"
            )
        if self.parallel.strategy == "fsdp2":
            if self.teacher.kind == "live":
                raise ConfigError(
                    "parallel.strategy=fsdp2 supports teacher.kind ema, frozen, trust_region or external, got live "
                    "(docs/scaling.md says why)"
                )
            if self.lora.r > 0:
                raise ConfigError("lora.r > 0 with parallel.strategy=fsdp2 is not supported: LoRA runs with ddp")


def _check_objective(cfg: TrainConfig) -> None:
    """Refuse the objective combinations that cannot run (one line naming the keys)."""
    if cfg.objective == "sft_gold" and cfg.rollout.engine == "vllm":  # nothing is sampled: a server would idle
        raise ConfigError(
            "objective=sft_gold trains on the reference answers and samples nothing, so "
            "rollout.engine=vllm would only start an idle server: use rollout.engine=hf"
        )
    if cfg.objective != "sft_self":
        return
    # sft_self samples from the teacher model: it needs a model to generate from in this process.
    if cfg.teacher.kind == "trust_region":
        raise ConfigError(
            "objective=sft_self samples the teacher's answers, but teacher.kind=trust_region mixes "
            "two models' logits and cannot generate: use teacher.kind frozen, ema, live or external"
        )
    for bad, why in (
        (cfg.rollout.engine == "vllm", "rollout.engine=vllm (the server holds the student's weights)"),
        (cfg.lora.r > 0, "lora.r > 0"),
        (cfg.parallel.strategy == "fsdp2", "parallel.strategy=fsdp2"),
    ):
        if bad:
            raise ConfigError(
                f"objective=sft_self with {why} is not supported: the teacher's answers are sampled "
                "from its own copy in this process; use rollout.engine=hf, lora.r=0, parallel.strategy=ddp"
            )


# ---------------------------------------------------------------- loading and overrides


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars/lists.

    Values keep their text until they meet their key's type: ``optim.lr=1e-5`` is a number,
    ``output_dir=1e5`` stays the string ``"1e5"``.
    """
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-5)")
        key, raw = item.split("=", 1)
        value = load_yaml(raw, f"override {key}") if raw != "" else ""
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a :class:`TrainConfig` from an optional YAML file plus ``key=value`` overrides.

    ``path`` may also name a shipped recipe (``tiny_cpu``, ``toy_demo``, ...: see :func:`recipes`).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and path.parent == Path(".") and path.stem in recipes():
            path = recipe_path(path.stem)
        if not path.is_file():
            shipped = ", ".join(recipes())
            what = "is not a file" if path.exists() else "not found"
            raise ConfigError(f"config file {path} {what} (shipped recipes, usable by name: {shipped})")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from None
        loaded = load_yaml(text, str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys (key: value lines)")
        tree = loaded
    tree = _merge(tree, parse_overrides(overrides or []))
    return build(TrainConfig, tree)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON serialisable) of a config dataclass."""
    return dataclasses.asdict(cfg)


def describe_config(cls: type = TrainConfig, prefix: str = "") -> list[KnobInfo]:
    """(key, default, allowed, help) rows for every knob, read from the declarations above."""
    return describe(cls, prefix)


def config_markdown() -> str:
    """The Markdown reference of every knob (docs/config.md is this, kept in sync by a test)."""
    lines = [
        "# Training configuration reference",
        "",
        "Generated by `vopd config --markdown` from the knob declarations in `src/vopd/config.py`.",
        "Set any key in a YAML file or as `key=value` on the command line; a value outside",
        '"allowed" is refused at load time with an error naming the key.',
        "",
        "| key | default | allowed | meaning |",
        "|---|---|---|---|",
    ]
    for row in describe_config():
        cells = [f"`{row.key}`", f"`{row.default}`", row.allowed, row.help]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
