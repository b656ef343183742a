"""Model FLOPs of a vopd update phase, and the dense bf16 peak of the GPU they are divided by (MFU).

The count is the *model* FLOPs (the work the method needs, as in the PaLM paper's MFU, appendix B):
a multiply-add is 2 FLOPs; gradient checkpointing's recomputation is not counted (it is hardware
work, not model work), nor are elementwise ops, norms, softmaxes or the optimiser (O(parameters)).

For one view (the student's full image or the teacher's crop) of one prompt with ``T_p`` prompt
tokens (image tokens included), ``n_patch`` vision patches and ``n`` responses of ``r_i`` tokens,
scored the way vopd scores it (the LM head only at the response tokens; the prompt as the scoring
mode of `vopd.scoring.sharing_mode` computes it):

    F_vision = 2 * P_vision * n_patch                      (x n in mode "none")
    F_layers = 2 * P_layers * (c * T_p + sum_i r_i)        (c = 1 in mode "prefix", else n)
    F_attn   = 4 * L * d_attn * A                          (QK^T and AV, causal)
               A = T_p^2 / 2 + sum_i (r_i * T_p + r_i^2 / 2)   in mode "prefix" (the prompt once)
               A = sum_i (T_p + r_i)^2 / 2                      otherwise (each row whole)
    F_head   = 2 * d * V * sum_i r_i

Mode "prefix" computes the prompt once and each response on top of its cache; gradient
checkpointing drops the cache, so a checkpointed model scores in mode "image" (the image encoded
once, the prompt's text repeated per row). Those repeated tokens are work the model does, so they
count.

``P_layers`` = parameters of the language model's decoder layers, ``P_vision`` = the vision tower's
(merger included), ``L`` layers, ``d_attn`` = heads x head dim, ``d`` hidden, ``V`` vocabulary.
``F_vision`` is approximate: the mergers run on n_patch / 4 merged tokens and the position table
is a lookup, so it overcounts them, by well under 1 % of the update's FLOPs at the check's shapes.

Update phase (teacher scoring + student forward/backward): the teacher runs one forward
``F(crop)``; the student's backward costs twice its forward for every weight that trains (input
and weight gradients) and once for frozen weights that the gradient passes through (input
gradients only). So

    full fine-tuning:  F_update = F(crop) + 3 * F(full)
    LoRA (base frozen): F_update = F(crop) + F(full) + (F_layers + 2 * F_attn + F_head)(full)

(attention has no weights: its backward is twice its forward either way; the LoRA vision tower is
frozen and below every adapter: forward only; the adapters' own FLOPs, rank x width, are left
out). The fused loss's three head products per chunk (logits, hidden gradient, weight gradient)
are the factor 3 of the head for full fine-tuning. MFU = F_update / (update seconds) / peak.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets (the sheets
#: print the sparse figure, twice these). H100 SXM5 and H200: 989.4 TFLOP/s; H100 PCIe: 756.
DENSE_BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989.4e12, "H200": 989.4e12}


def dense_bf16_peak(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by its name (``torch.cuda.get_device_name``), or None."""
    for key, peak in DENSE_BF16_PEAK.items():  # the specific names first
        if all(word in device_name for word in key.split()):
            return peak
    return None


@dataclass(frozen=True)
class ViewWork:
    """What one view of one prompt computes: prompt tokens, vision patches, each response's length."""

    prompt_tokens: int
    patches: int
    responses: tuple[int, ...]
    mode: str = "prefix"  # vopd.scoring sharing mode: prefix | image | none


@dataclass(frozen=True)
class ModelSize:
    """The sizes the FLOP count reads (see the module docstring)."""

    layer_params: int
    vision_params: int
    layers: int
    attention_width: int
    hidden: int
    vocab: int


def view_flops(m: ModelSize, w: ViewWork) -> dict[str, float]:
    """Forward FLOPs of one view, by part (vision, layers, attention, head)."""
    if w.mode not in ("prefix", "image", "none"):
        raise ValueError(f"unknown scoring mode {w.mode!r}")
    tp, rs = w.prompt_tokens, w.responses
    if w.mode == "prefix":
        copies, pairs = 1, tp * tp / 2 + sum(r * tp + r * r / 2 for r in rs)
    else:
        copies, pairs = len(rs), sum((tp + r) ** 2 / 2 for r in rs)
    return {
        "vision": 2.0 * m.vision_params * w.patches * (len(rs) if w.mode == "none" else 1),
        "layers": 2.0 * m.layer_params * (copies * tp + sum(rs)),
        "attention": 4.0 * m.layers * m.attention_width * pairs,
        "head": 2.0 * m.hidden * m.vocab * sum(rs),
    }


def update_flops(m: ModelSize, student: list[ViewWork], teacher: list[ViewWork], *, lora: bool = False) -> float:
    """Model FLOPs of one update phase over the step's prompts (``student[i]``/``teacher[i]``: prompt i)."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        crop, full = view_flops(m, t), view_flops(m, s)
        total += sum(crop.values())
        if lora:
            total += sum(full.values()) + full["layers"] + 2 * full["attention"] + full["head"]
        else:
            total += 3 * sum(full.values())
    return total
