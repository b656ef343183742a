"""Per-GPU memory estimate of a vopd run for each strategy (ddp, fsdp2, LoRA): the state that lives
through a step (weights, teacher, gradients, AdamW) plus FSDP2's gathered units, in bytes.

Activations are estimated separately and roughly (they depend on sequence lengths and on gradient
checkpointing); `bench_memory.py` checks the state part against CPU measurements at small scale.

    python benchmarks/memplan.py            # the paper recipe at 4B and 9B, per strategy
    python benchmarks/memplan.py --config PATH   # a checkpoint's config.json (or its folder): exact shape

With ``--config`` the parameter count is exact: the model is built on PyTorch's meta device from
the config (no memory, no weights) and its parameters counted, so it equals the checkpoint's
(e.g. 8,292,166,656 for Qwen2.5-VL-7B-Instruct, its safetensors index's total_size / 2).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GB = 1e9


@dataclass
class ModelShape:
    name: str
    params: float  # all parameters (vision tower included)
    hidden: int
    layers: int
    vocab: int
    tied: bool  # LM head shares the embedding matrix
    intermediate: int | None = None  # the language model's MLP width (None: unknown, taken as 3 x hidden)

    @property
    def root_params(self) -> float:
        """Parameters outside the per-layer FSDP2 units: embedding (+ LM head when untied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def layer_params(self) -> float:
        return (self.params - self.root_params) / self.layers


# Qwen3.5 shapes from the released config.json values (docs/real_checkpoints.md cites the sources);
# parameters: language model + vision tower as transformers loads them (the checkpoints also hold a
# multi-token-prediction head, ~0.12 B at 4B and ~0.24 B at 9B, that training does not load).
QWEN35_4B = ModelShape("Qwen3.5-4B", 4.539e9, 2560, 32, 248_320, tied=True, intermediate=9216)
QWEN35_9B = ModelShape("Qwen3.5-9B", 9.410e9, 4096, 32, 248_320, tied=False, intermediate=12288)


def lora_params(shape: ModelShape, r: int) -> float:
    """Adapter parameters for r on the language model's q/k/v/o/gate/up/down (every attention
    projection taken as hidden x hidden: an upper bound under grouped-query attention, and an
    estimate for linear-attention layers, whose projections have other shapes)."""
    h = shape.hidden
    inter = shape.intermediate or 3 * h
    per_layer = 4 * r * (h + h) + 3 * r * (h + inter)
    return per_layer * shape.layers


def shape_from_config(path: str | Path) -> ModelShape:
    """The exact shape of a checkpoint from its ``config.json`` (a file or the folder holding it).

    Parameters are counted on a model built on the meta device (transformers, no weights, no
    memory); hidden size, layers, vocabulary, tying and MLP width are read from the text config.
    Raises FileNotFoundError without a config.json and ValueError for a model_type this
    transformers does not know (its count cannot be derived: say so rather than guess).
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file() or file.name != "config.json":
        raise FileNotFoundError(f"{file}: no config.json (pass the file or the checkpoint folder)")
    raw = json.loads(file.read_text())
    model_type = raw.get("model_type")
    try:
        config = AutoConfig.from_pretrained(file.parent)  # as the checkpoint loads (old flat layouts converted)
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"{file}: model_type {model_type!r} is unknown to this transformers: its parameter count cannot be derived"
        ) from err
    with torch.device("meta"):
        if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            model = AutoModelForImageTextToText.from_config(config)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once
    text = config.get_text_config()
    return ModelShape(
        name=file.parent.resolve().name,
        params=params,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        vocab=text.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        intermediate=getattr(text, "intermediate_size", None),
    )


def state_bytes(
    shape: ModelShape,
    *,
    strategy: str,
    world: int = 1,
    teacher: str = "ema",
    bf16: bool = True,
    lora_r: int = 0,
    base_bytes: int = 2,
) -> dict[str, float]:
    """Bytes per rank that live through a step, by component.

    ``strategy``: ddp | fsdp2 | lora. Full fine-tuning keeps fp32 master weights, fp32 gradients and
    AdamW's two fp32 moments; with ``bf16`` the teacher copy is bf16 and an EMA teacher adds fp32
    master weights (vopd.teacher). LoRA keeps the base in ``base_bytes`` per parameter and trains
    fp32 adapters; its teacher is the base (frozen) or a second adapter (ema).
    """
    P = shape.params
    if strategy == "lora":
        A = lora_params(shape, lora_r or 16)
        out = {
            "base weights": base_bytes * P,
            "adapter + grad + AdamW": 16 * A,
            "teacher": 4 * A if teacher == "ema" else 0.0,
        }
        return out
    shard = world if strategy == "fsdp2" else 1
    teacher_bytes = (2 + (4 if teacher == "ema" else 0)) if bf16 else 4
    out = {
        "student weights (fp32)": 4 * P / shard,
        "gradients (fp32)": 4 * P / shard,
        "AdamW moments (fp32)": 8 * P / shard,
        "teacher": teacher_bytes * P / shard,
    }
    if strategy == "fsdp2":
        compute = 2 if bf16 else 4
        # Gathered while in use: both roots (embeddings, head) and ~2 layers (current + the next one).
        out["gathered units (fsdp2)"] = (
            compute * shape.root_params + (2 if bf16 else 4) * shape.root_params + 2 * compute * shape.layer_params
        )
    return out


def load_bytes(
    shape: ModelShape, *, strategy: str, world: int = 1, teacher: str = "ema", bf16: bool = True, base_bytes: int = 4
) -> float:
    """Peak host bytes per rank while a run loads its model and teacher (before the first step).

    fsdp2 (meta-device loading, `vopd.parallel.load_sharded`): the rank's student and teacher
    shards plus one decoder layer's worth of tensors in flight (each rank reads only its own
    slices). ddp: the whole student and the whole teacher copy. The student is read at
    ``base_bytes`` per parameter (fp32 master weights: 4).
    """
    P = shape.params
    teacher_bytes = (2 + (4 if teacher == "ema" else 0)) if bf16 else 4
    if teacher == "frozen" and not bf16:
        teacher_bytes = 4
    if strategy == "fsdp2":
        return (base_bytes + teacher_bytes) * P / world + base_bytes * shape.layer_params
    return (base_bytes + teacher_bytes) * P


def load_table(shapes: tuple[ModelShape, ...] | None = None) -> str:
    """Markdown: per-rank host memory while loading (fp32 student, EMA teacher, bf16), at Qwen3.5
    4B and 9B by default."""
    rows = ["| model | strategy | ranks | host memory per rank while loading |", "|---|---|---|---|"]
    for shape in shapes or (QWEN35_4B, QWEN35_9B):
        for strategy, world in (("ddp", 8), ("fsdp2", 8)):
            need = load_bytes(shape, strategy=strategy, world=world)
            rows.append(f"| {shape.name} | {strategy} | {world} | {need / GB:.1f} GB |")
    return "\n".join(rows) + "\n"


def activation_bytes(shape: ModelShape, *, tokens: int, checkpointing: bool = True, bytes_per: int = 2) -> float:
    """Rough activation memory of one micro-batch of ``tokens`` tokens: with gradient checkpointing
    each layer keeps its input and one layer's internals (~16 x hidden per token) are live."""
    per_token = shape.hidden * bytes_per
    if checkpointing:
        return tokens * per_token * (shape.layers + 16)
    return tokens * per_token * shape.layers * 16


def paper_table(shapes: tuple[ModelShape, ...] | None = None) -> str:
    """Markdown: per-GPU estimate of the paper recipe (EMA teacher, bf16, 8 rollouts x up to 1024
    tokens, one prompt per micro-batch) for each strategy, at Qwen3.5 4B and 9B by default."""
    tokens = 8 * (1024 + 1024)  # n=8 sequences x (prompt ~1024 incl. image tokens + 1024 response)
    rows = [
        "| model | strategy | GPUs | weights+teacher+grads+AdamW per GPU | + gathered units | + activations "
        "(1 prompt x 8 x ~2k tokens, checkpointed) | total per GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in shapes or (QWEN35_4B, QWEN35_9B):
        act = activation_bytes(shape, tokens=tokens)
        for strategy, world in (("ddp", 8), ("fsdp2", 8), ("lora", 1)):
            parts = state_bytes(shape, strategy=strategy, world=world, lora_r=16)
            gathered = parts.pop("gathered units (fsdp2)", 0.0)
            state = sum(parts.values())
            name = "lora (r=16, bf16 base)" if strategy == "lora" else strategy
            rows.append(
                f"| {shape.name} | {name} | {world} | {state / GB:.1f} GB | {gathered / GB:.1f} GB | "
                f"{act / GB:.1f} GB | **{(state + gathered + act) / GB:.0f} GB** |"
            )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a checkpoint's config.json or its folder (default: Qwen3.5 4B and 9B)")
    args = parser.parse_args(argv)
    if args.config:
        shape = shape_from_config(args.config)
        print(f"parameters: {shape.params}")
        tied = "tied" if shape.tied else "untied"
        print(
            f"{shape.name}: hidden {shape.hidden}, {shape.layers} layers, MLP {shape.intermediate}, "
            f"vocabulary {shape.vocab:,} ({tied} head)\n"
        )
        print(paper_table((shape,)))
        print(load_table((shape,)))
    else:
        print(paper_table())
        print(load_table())


if __name__ == "__main__":
    main()
