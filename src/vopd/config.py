"""Typed training configuration: YAML files plus ``key=value`` overrides.

Every knob lives in one dataclass field with its default; the field comment is the help text
(``vopd train --help-config`` prints them). Unknown keys and wrong types are rejected with the
key named, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vopd.health import HealthConfig
from vopd.rollout import RolloutConfig
from vopd.views import ViewConfig


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


@dataclass
class ModelConfig:
    path: str = ""  # hub id, local dir, "toy-base" (the shipped toy checkpoint) or "tiny:<family>" (random tiny model)
    dtype: str = "float32"  # weight dtype: float32 | bfloat16 | float16
    trust_remote_code: bool = False  # run model code from the checkpoint; only for sources you trust
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"; None = transformers default
    thinking: bool | None = False  # chat-template thinking mode (Qwen3.5); False = the paper's non-thinking mode

    def __post_init__(self) -> None:
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class DataConfig:
    train: str = ""  # JSONL (our format or Vision-OPD-6K), or "toyworld:N[:SEED]" for N generated toy scenes
    out_of_bounds: str = "clip"  # evidence box partly outside the image: clip (and count) | reject
    on_error: str = "raise"  # a bad record: raise (naming file:row) | skip (counted and reported)
    max_prompt_tokens: int = 8192  # longer prompts are an error naming the row
    num_workers: int = 0  # data-loader worker processes building views and processor inputs
    shuffle: bool = True  # reshuffle every epoch (seeded)

    def __post_init__(self) -> None:
        _choice("data.out_of_bounds", self.out_of_bounds, ("clip", "reject"))
        _choice("data.on_error", self.on_error, ("raise", "skip"))


@dataclass
class LossConfig:
    beta: float = 0.5  # generalized JSD mixture weight; 0 = forward KL(T||S), 1 = reverse KL(S||T)
    estimator: str = "topk"  # topk (student top-k + tail) | full (whole vocabulary) | sampled (sampled-token reverse KL)
    top_k: int = 100  # support size for estimator=topk
    add_tail: bool = True  # add the tail bucket (else renormalise the top-k)
    support: str = "student"  # whose top-k ids form the support: student | teacher | union
    temperature: float = 1.0  # applied to both models' logits inside the divergence
    aggregation: str = "token_mean"  # token_mean (released code) | seq_mean (the paper's 1/|y| formula)
    rollout_correction: bool = False  # weight tokens by min(pi_trainer/pi_sampler, clip); for external samplers
    ratio_clip: float = 2.0  # clip of the rollout-correction weight
    chunk_size: int = 128  # response tokens per chunk of the vocabulary projection (128 x 152k vocab ~ 80 MB per tensor)

    def __post_init__(self) -> None:
        _choice("loss.estimator", self.estimator, ("topk", "full", "sampled"))
        _choice("loss.support", self.support, ("student", "teacher", "union"))
        _choice("loss.aggregation", self.aggregation, ("token_mean", "seq_mean"))
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"loss.beta must be in [0, 1], got {self.beta}")
        if self.estimator == "sampled" and self.beta != 1.0:
            raise ConfigError(
                f"loss.estimator=sampled estimates reverse KL only: set loss.beta=1 (got {self.beta})"
            )
        if self.top_k < 1 or self.chunk_size < 1 or self.temperature <= 0:
            raise ConfigError("loss.top_k, loss.chunk_size and loss.temperature must be positive")


@dataclass
class TeacherConfig:
    kind: str = "ema"  # ema | frozen | trust_region | live | external
    rate: float = 0.05  # ema: theta_T <- (1-rate) theta_T + rate theta_S per step; trust_region: logit mix
    path: str | None = None  # checkpoint for kind=external
    view: str = "crop"  # what the teacher sees: crop (Vision-OPD) | full (control: no privileged view)

    def __post_init__(self) -> None:
        _choice("teacher.kind", self.kind, ("ema", "frozen", "trust_region", "live", "external"))
        _choice("teacher.view", self.view, ("crop", "full"))
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"teacher.rate must be in [0, 1], got {self.rate}")
        if self.kind == "external" and not self.path:
            raise ConfigError("teacher.kind=external needs teacher.path=<checkpoint>")


@dataclass
class OptimConfig:
    lr: float = 2e-6  # AdamW learning rate (paper: 2e-6)
    weight_decay: float = 0.01  # AdamW decoupled weight decay (paper: 0.01)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    warmup_steps: int = 10  # linear warmup from 0
    schedule: str = "constant"  # after warmup: constant | cosine | linear
    grad_clip: float = 1.0  # max global grad norm; 0 disables

    def __post_init__(self) -> None:
        _choice("optim.schedule", self.schedule, ("constant", "cosine", "linear"))
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas needs two values, got {self.betas}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    output_dir: str = "runs/vopd"  # checkpoints, metrics.jsonl, TensorBoard logs
    seed: int = 0  # seeds the model init (tiny:*), data order and sampling
    prompts_per_step: int = 96  # prompts per optimiser step (global, over all processes); x rollout.n sequences
    micro_batch_prompts: int = 8  # prompts per forward/backward (gradient accumulation splits a step)
    max_steps: int = 0  # 0 = one pass over the data (epochs x len(data) / prompts_per_step)
    epochs: float = 1.0  # used when max_steps = 0
    save_every: int = 0  # checkpoint every N steps (0 = only at the end); the last step always saves
    keep_checkpoints: int = 2  # newest checkpoints kept (0 = keep all)
    log_every: int = 1  # write metrics every N steps
    mixed_precision: str = "no"  # no | bf16 (autocast; master weights stay in model.dtype)
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "auto"])  # jsonl | tensorboard | wandb | auto (tensorboard if installed, else a one-line notice); a tracker named explicitly must be installed
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads (0 = torch default)
    naive: bool = False  # turn every optimisation off (for measuring their gain)

    def __post_init__(self) -> None:
        _choice("mixed_precision", self.mixed_precision, ("no", "bf16"))
        if self.prompts_per_step < 1 or self.micro_batch_prompts < 1:
            raise ConfigError("prompts_per_step and micro_batch_prompts must be >= 1")
        for r in self.report_to:
            _choice("report_to", r, ("jsonl", "tensorboard", "wandb", "auto"))


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


# ---------------------------------------------------------------- loading and overrides


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (inner, *_) = typing.get_args(tp) or (Any,)
            items = [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        raise ConfigError(f"{key} expects a list, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} expects a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} expects an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric-looking path
        raise ConfigError(f"{key} expects a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot use {value!r} as {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a (possibly nested) dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} expects a mapping, got {data!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


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
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-5)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {err}") from err
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads "1e-5" as a string; users mean a number
        _set_dotted(tree, key.strip(), value)
    return tree


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text) and text.strip().lower() not in ("nan", "inf", "-inf")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _fix_yaml_numbers(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_yaml_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_numbers(v) for v in node]
    if isinstance(node, str) and _looks_numeric(node) and ("e" in node.lower()):
        return float(node)
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a :class:`TrainConfig` from an optional YAML file plus ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
        tree = _fix_yaml_numbers(loaded)
    tree = _merge(tree, parse_overrides(overrides or []))
    return _build(TrainConfig, tree, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON serialisable) of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, data, "")


def describe_config(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every knob, read from the field comments of this file."""
    import inspect

    comments = _field_comments(inspect.getsource(cls))
    rows = []
    default_obj = cls()
    for f in dataclasses.fields(cls):
        value = getattr(default_obj, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_config(type(value), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), comments.get(f.name, "")))
    return rows


def config_markdown() -> str:
    """The Markdown reference of every knob (docs/config.md is this, kept in sync by a test)."""
    lines = [
        "# Training configuration reference",
        "",
        "Generated by `vopd config --markdown` from `src/vopd/config.py` (and the view, rollout and",
        "health dataclasses). Set any key in a YAML file or as `key=value` on the command line.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for key, default, help_text in describe_config():
        lines.append(f"| `{key}` | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


_FIELD_LINE = re.compile(r"^\w+\s*:\s*[\w\[\]., |]+=")  # "name: type = default", not "name: help text"


def _field_comments(source: str) -> dict[str, str]:
    """Help text per field: a trailing ``# comment`` on the field line, or else the field's entry
    in the class docstring (``name: text`` lines, continuation lines indented deeper)."""
    out: dict[str, str] = {}
    doc: dict[str, str] = {}
    current, indent = None, 0
    for line in source.splitlines():
        stripped = line.strip()
        lead = len(line) - len(line.lstrip())
        head = stripped.split(":", 1)[0].strip()
        if "#" in stripped and ":" in stripped and not stripped.startswith(("#", "def ", "_")) and head.isidentifier():
            out[head] = stripped.split("#", 1)[1].strip()
            current = None
        elif ":" in stripped and head.isidentifier() and not _FIELD_LINE.match(stripped) and not stripped.endswith(":"):
            current, indent = head, lead
            doc[head] = stripped.split(":", 1)[1].strip()
        elif current and stripped and lead > indent:
            doc[current] += " " + stripped
        else:
            current = None
    return {**doc, **out}
