"""The scale recipes (FSDP2 on one 8-GPU node at 4B / 9B, LoRA on one 24 GB GPU) run two steps at
tiny scale with only the sizes shrunk, as the paper recipe's test does (tests/test_trainer.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec used below
from vopd.config import load_config
from vopd.trainer import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "model.path=tiny:qwen3_5",
    "data.train=toyworld:8:3",
    "data.num_workers=0",
    "prompts_per_step=2",
    "micro_batch_prompts=1",
    "rollout.n=2",
    "rollout.max_new_tokens=4",
    "max_steps=2",
    "save_every=0",
    "report_to=[jsonl]",
    "threads=1",
    "device=cpu",
]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["paper_qwen35_4b_fsdp2", "paper_qwen35_9b_fsdp2"])
def test_fsdp2_recipe_runs_two_steps_on_two_processes(tmp_path, recipe):
    cfg = load_config(CONFIGS / f"{recipe}.yaml")
    assert cfg.parallel.strategy == "fsdp2" and cfg.mixed_precision == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.teacher.kind == "ema" and cfg.views.draw_box and cfg.views.hint
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "vopd.cli",
            "train",
            "--config",
            str(CONFIGS / f"{recipe}.yaml"),
            *TINY,
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["skipped"] == 0.0 for r in rows)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()


def test_accelerate_config_launches_eight_plain_processes():
    acc = yaml.safe_load((CONFIGS / "accelerate" / "fsdp2_8gpu.yaml").read_text())
    # vopd shards the model itself: accelerate must not wrap it in its own FSDP or DDP plugin config.
    assert acc["distributed_type"] == "MULTI_GPU" and acc["num_processes"] == 8 and acc["mixed_precision"] == "no"


@pytest.mark.slow
def test_lora_24gb_recipe_runs_two_steps(tmp_path):
    pytest.importorskip("peft")
    cfg = load_config(CONFIGS / "lora_qwen35_4b_24gb.yaml", [*TINY, f"output_dir={tmp_path}"])
    assert cfg.lora.r == 16 and cfg.model.dtype == "bfloat16" and cfg.teacher.kind == "ema"
    res = train(cfg)
    assert res.steps == 2 and all(h["skipped"] == 0.0 for h in res.history)
    assert (res.checkpoint / "adapter_model.safetensors").is_file()
