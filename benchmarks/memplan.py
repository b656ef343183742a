"""Per-GPU memory estimate of a vopd run for each strategy (ddp, fsdp2, LoRA): the state that lives
through a step (weights, teacher, gradients, AdamW) plus FSDP2's gathered units, in bytes.

Activations are estimated separately and roughly (they depend on sequence lengths and on gradient
checkpointing); `bench_memory.py` checks the state part against CPU measurements at small scale.

    python benchmarks/memplan.py            # the paper recipe at 4B and 9B, per strategy
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass
class ModelShape:
    name: str
    params: float  # all parameters (vision tower included)
    hidden: int
    layers: int
    vocab: int
    tied: bool  # LM head shares the embedding matrix

    @property
    def root_params(self) -> float:
        """Parameters outside the per-layer FSDP2 units: embedding (+ LM head when untied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def layer_params(self) -> float:
        return (self.params - self.root_params) / self.layers


# Assumed shapes (check the checkpoint's config.json): Qwen3.5, vocabulary 248,320.
QWEN35_4B = ModelShape("Qwen3.5-4B", 4.0e9, 2560, 32, 248_320, tied=True)
QWEN35_9B = ModelShape("Qwen3.5-9B", 9.0e9, 4096, 32, 248_320, tied=False)


def lora_params(shape: ModelShape, r: int) -> float:
    """Adapter parameters for r on the language model's q/k/v/o/gate/up/down (k/v taken as full width:
    an upper bound under grouped-query attention)."""
    h, inter = shape.hidden, 3 * shape.hidden  # MLP width ~3x hidden (Qwen3.5 dense)
    per_layer = 4 * r * (h + h) + 3 * r * (h + inter)
    return per_layer * shape.layers


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


def load_table() -> str:
    """Markdown: per-rank host memory while loading, at 4B and 9B (fp32 student, EMA teacher, bf16)."""
    rows = ["| model | strategy | ranks | host memory per rank while loading |", "|---|---|---|---|"]
    for shape in (QWEN35_4B, QWEN35_9B):
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


def paper_table() -> str:
    """Markdown: per-GPU estimate of the paper recipe (EMA teacher, bf16, 8 rollouts x up to 1024
    tokens, one prompt per micro-batch) at 4B and 9B for each strategy."""
    tokens = 8 * (1024 + 1024)  # n=8 sequences x (prompt ~1024 incl. image tokens + 1024 response)
    rows = [
        "| model | strategy | GPUs | weights+teacher+grads+AdamW per GPU | + gathered units | + activations "
        "(1 prompt x 8 x ~2k tokens, checkpointed) | total per GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in (QWEN35_4B, QWEN35_9B):
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


if __name__ == "__main__":
    print(paper_table())
    print(load_table())
