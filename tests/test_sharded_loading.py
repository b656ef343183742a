"""Sharded loading under parallel.strategy=fsdp2: the model is built on the meta device, each rank
reads only its own slices of the safetensors files, the teacher is copied shard by shard from the
student. One process here (the 2-process run is in tests/test_parallel.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec
from vopd.config import load_config
from vopd.parallel import WeightFiles
from vopd.tiny_models import build_tiny_model
from vopd.train_setup import _sharded_skeleton
from vopd.trainer import train

ARGS = [
    "data.train=toyworld:8:0",
    "rollout.n=2",
    "rollout.max_new_tokens=2",
    "loss.top_k=8",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
    "optim.weight_decay=0.0",
    "prompts_per_step=2",
    "micro_batch_prompts=1",
    "report_to=[jsonl]",
    "threads=1",
    "rollout.temperature=0",
    "teacher.kind=ema",
    "teacher.ema_rate=0.5",
    "device=cpu",
    "max_steps=1",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    model, processor = build_tiny_model("qwen2_vl", seed=3)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_the_skeleton_is_on_meta_and_every_tensor_is_found(folder):
    cfg = load_config(None, [*ARGS, f"model.path={folder}", "parallel.strategy=fsdp2"])
    policy, processor, weights = _sharded_skeleton(cfg, str(folder))
    assert weights is not None and processor is not None
    assert all(p.is_meta for p in policy.parameters())
    assert len(weights.names_for(policy)) == len(list(policy.parameters()))
    # not taken for ddp, LoRA or a tiny: spec (every rank then loads the full model)
    assert _sharded_skeleton(load_config(None, [*ARGS, f"model.path={folder}"]), str(folder))[0] is None
    assert not WeightFiles.usable("tiny:qwen2_vl")


def test_meta_loaded_fsdp2_equals_a_full_load(folder, tmp_path):
    common = [*ARGS, f"model.path={folder}", "save_every=1"]
    train(load_config(None, [*common, f"output_dir={tmp_path / 'ddp'}"]))
    train(load_config(None, [*common, "parallel.strategy=fsdp2", f"output_dir={tmp_path / 'fsdp2'}"]))
    ref = load_file(tmp_path / "ddp" / "checkpoint-1" / "model.safetensors")
    got = load_file(tmp_path / "fsdp2" / "checkpoint-1" / "model.safetensors")
    assert ref.keys() == got.keys()
    base = load_file(folder / "model.safetensors")
    assert max(float((ref[k] - base[k]).abs().max()) for k in ref) > 1e-4  # the step moved the weights
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
