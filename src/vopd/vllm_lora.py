"""Weight pushes of a LoRA student to a vLLM server: the adapter alone, never the base.

With ``lora.r > 0`` and ``rollout.engine=vllm`` the server runs on the frozen *base* weights with
LoRA enabled (`server_args`: ``--enable-lora --max-lora-rank R --max-loras 1``) and runtime adapter
loading (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``). Each push writes the student adapter with
peft's ``save_pretrained`` (``adapter_model.safetensors`` + ``adapter_config.json``: megabytes,
not the model), loads it under a new name (``POST /v1/load_lora_adapter``), unloads the previous
name (``POST /v1/unload_lora_adapter``) and resets the prefix cache; sampling requests then name
the new adapter. A new name per push also gives the new adapter a new id inside vLLM, so nothing
computed with an older adapter (prefix-cache blocks are keyed by adapter name and path) is reused.

vLLM applies adapters to the language model only (its multimodal LoRA manager wraps no module of
the vision tower or the merger unless tower LoRA is enabled, and then it would also need the
encoder cache to know about adapters), and an adapter tensor whose module it does not wrap is
ignored without an error. `check_adapter_targets` therefore refuses an adapter on any module
outside the language model before a server starts (docs/vllm.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vopd.lora import STUDENT, TEACHER

__all__ = ["AdapterPush", "check_adapter_targets", "lora_server_args", "write_base_snapshot"]

# The ranks vLLM 0.32 accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks); an adapter of a
# smaller rank is served in a slot of the next allowed size.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LANGUAGE_MODEL = ".language_model."  # transformers' Qwen-VL module path of the text decoder


def lora_server_args(rank: int) -> list[str]:
    """Server arguments for one runtime-loaded adapter of rank ``rank`` (``--max-cpu-loras 2``: the
    new adapter is loaded before the old one is unloaded)."""
    slot = next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)
    if slot is None:
        raise ValueError(
            f"lora.r={rank} is above the largest LoRA rank vLLM serves ({VLLM_MAX_LORA_RANKS[-1]}): "
            "use a smaller lora.r or rollout.engine=hf"
        )
    return ["--enable-lora", "--max-lora-rank", str(slot), "--max-loras", "1", "--max-cpu-loras", "2"]


def adapted_modules(policy: nn.Module) -> list[str]:
    """Names of the modules that carry the student adapter (peft LoRA layers)."""
    suffix = f".lora_A.{STUDENT}.weight"
    return [name[: -len(suffix)] for name, _ in policy.named_parameters() if name.endswith(suffix)]


def check_adapter_targets(policy: nn.Module) -> None:
    """Refuse an adapter vLLM would not apply: any adapted module outside the language model."""
    modules = adapted_modules(policy)
    if not modules:
        raise ValueError("rollout.engine=vllm with lora.r > 0: the policy carries no LoRA adapter")
    outside = [m for m in modules if LANGUAGE_MODEL not in m]
    if outside:
        raise ValueError(
            f"rollout.engine=vllm with lora.r > 0: the adapter is on {outside[0]} ({len(outside)} module(s) outside "
            "the language model), but vLLM applies LoRA adapters to the language model only and would silently "
            "sample without it there. Restrict lora.target_modules to names of the language model's modules "
            "(e.g. [q_proj, k_proj, v_proj, o_proj] when the vision tower's MLP shares the names gate_proj/up_proj/"
            "down_proj, as in Qwen2.5-VL), or use rollout.engine=hf"
        )


def base_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights of a policy with peft LoRA layers injected, under the plain model's names."""
    out = {}
    for name, tensor in policy.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def write_base_snapshot(policy: Any, folder: str | Path) -> None:
    """``save_pretrained`` of the base model without the adapters (what the server starts on)."""
    policy.save_pretrained(str(folder), state_dict=base_state_dict(policy), safe_serialization=True)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class AdapterPush:
    """Writes and swaps the student adapter on a vLLM server (see the module docstring).

    Args:
        peft_model: the ``peft.PeftModel`` of `vopd.lora.apply_lora` (student adapter ``default``).
        work_dir: where each pushed adapter is written (``adapter-N``; only the newest is kept).
        served_name: the base model's name on the server; adapter N is served as ``{served_name}-lora-N``.
    """

    def __init__(self, peft_model: Any, work_dir: str | Path, served_name: str) -> None:
        self.peft_model = peft_model
        self.work_dir = Path(work_dir)
        self.served_name = served_name
        self.count = 0  # pushes so far; every training process counts, so all name the same adapter
        self.name: str | None = None
        self.last_bytes = 0
        check_adapter_targets(peft_model.base_model.model)
        self.server_args()  # a rank vLLM cannot serve fails here, before any server starts

    def server_args(self) -> list[str]:
        """The LoRA flags the server needs for the student adapter's rank (`lora_server_args`)."""
        return lora_server_args(int(self.peft_model.peft_config[STUDENT].r))

    def fingerprint(self) -> int:
        """Changes whenever a student-adapter parameter changes in place (the ``ema`` adapter is not served)."""
        policy = self.peft_model.base_model.model
        tag = f".{TEACHER}."
        return sum(p._version for n, p in policy.named_parameters() if "lora_" in n and tag not in n)

    def advance(self) -> str:
        """Count one push without doing it (the other training processes), returning the adapter's name."""
        self.count += 1
        self.name = f"{self.served_name}-lora-{self.count}"
        return self.name

    def push(self, post: Callable[..., Any]) -> None:
        """Write the student adapter, load it under a new name, unload the old one (``post(route, body)``)."""
        old_name, old_dir = self.name, self.work_dir / f"adapter-{self.count}"
        name = f"{self.served_name}-lora-{self.count + 1}"
        folder = self.work_dir / f"adapter-{self.count + 1}"
        if folder.exists():
            shutil.rmtree(folder)  # a leftover of an earlier run in this folder
        self.peft_model.save_pretrained(str(folder), selected_adapters=[STUDENT], safe_serialization=True)
        self.last_bytes = _folder_bytes(folder)
        body = {"lora_name": name, "lora_path": str(folder)}
        try:
            post("/v1/load_lora_adapter", body)
        except RuntimeError as err:
            if "has already been loaded" not in str(err):  # a user's server kept a name of an earlier run
                raise
            post("/v1/unload_lora_adapter", {"lora_name": name})
            post("/v1/load_lora_adapter", body)
        self.advance()
        if old_name is not None:
            post("/v1/unload_lora_adapter", {"lora_name": old_name})
            shutil.rmtree(old_dir, ignore_errors=True)
        post("/reset_prefix_cache", None)
