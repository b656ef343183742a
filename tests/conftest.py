"""Shared test fixtures: offline mode and tiny models built from configs (no hub access).

Session-scoped models are shared by every test: treat them as read-only (deep-copy before
changing weights).
"""

from __future__ import annotations

import os

# Must be set before huggingface_hub is imported: otherwise a hub id fails only after ~27 s of retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class TinyModels:
    """Builds each tiny family once per session: `tiny_models("gemma3") -> (model, processor)`."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple] = {}

    def __call__(self, family: str) -> tuple:
        if family not in self._cache:
            from vopd.tiny_models import build_tiny_model

            self._cache[family] = build_tiny_model(family, seed=0)
        return self._cache[family]


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    """Factory of session-cached tiny (model, processor) pairs, one per family."""
    return TinyModels()


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tiny_models: TinyModels) -> tuple:
    """A tiny random Qwen2-VL (hidden 64, 2 layers) and its full image-only processor."""
    return tiny_models("qwen2_vl")


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_vl: tuple):
    """`tiny_qwen2_vl` saved with save_pretrained (safetensors); load with vopd.models.load_model(str(dir))."""
    from vopd.tiny_models import save_tiny

    model, processor = tiny_qwen2_vl
    return save_tiny(model, processor, tmp_path_factory.mktemp("tiny_qwen2_vl"))


@pytest.fixture(scope="session")
def tiny_images():
    """Two small RGB images of different sizes (112x112 and 56x84) with some structure."""
    from PIL import Image, ImageDraw

    big = Image.new("RGB", (112, 112), "white")
    ImageDraw.Draw(big).ellipse((20, 30, 44, 54), fill="blue")
    small = Image.new("RGB", (84, 56), "white")
    ImageDraw.Draw(small).rectangle((10, 10, 30, 30), fill="green")
    return big, small


def with_bias(model, token_bias: dict[int, float]):
    """A copy of `model` whose LM head adds a fixed bias to some token ids (e.g. makes image pads likely)."""
    import copy

    import torch
    from torch import nn

    biased = copy.deepcopy(model)
    old = biased.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for i, b in token_bias.items():
            head.bias[i] = b
    biased.set_output_embeddings(head)
    return biased


@pytest.fixture(scope="session")
def vllm_python():
    """The vLLM environment's interpreter (scripts/setup_vllm.sh makes .venv-vllm; or set VOPD_VLLM_PYTHON).

    Tests marked `vllm` skip when it is absent, unless VOPD_REQUIRE_VLLM=1 (CI sets it: there
    they must run, never silently skip).
    """
    from pathlib import Path

    path = Path(
        os.environ.get("VOPD_VLLM_PYTHON") or Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    )
    if not path.exists():
        reason = f"vLLM environment absent ({path}): run `bash scripts/setup_vllm.sh` or set VOPD_VLLM_PYTHON"
        if os.environ.get("VOPD_REQUIRE_VLLM") == "1":
            pytest.fail(reason + " (VOPD_REQUIRE_VLLM=1)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def vopd_train_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """The checkpoint folder of `vopd train --config configs/tiny_cpu.yaml max_steps=1` (what a user saves)."""
    from pathlib import Path

    from vopd.checkpoint import latest_checkpoint
    from vopd.cli import main as cli_main

    recipe = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    out = tmp_path_factory.mktemp("vopd_train") / "run"
    argv = ["train", "--config", str(recipe), "max_steps=1", "threads=1", "report_to=[jsonl]", f"output_dir={out}"]
    assert cli_main(argv) == 0
    found = latest_checkpoint(out)
    assert found is not None
    return Path(found)
