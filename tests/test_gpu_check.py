"""The GPU check (`scripts/gpu_check.sh`, `benchmarks/bench_gpu.py`) kept working between GPU runs:
its dry run on CPU writes every part's status and the fields of docs/scaling.md; the shapes are the
real checkpoints'; the FLOP count and the wheel list are what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402
import gpu_flops  # noqa: E402
import gpu_models  # noqa: E402

# Exact parameter counts of the real checkpoints (their safetensors index's total_size / 2, bf16).
EXACT = {"qwen2_5_vl_7b": 8_292_166_656, "qwen3_vl_8b": 8_767_123_696}


@pytest.mark.parametrize("shape", sorted(EXACT))
def test_real_shapes_have_the_checkpoints_parameter_counts(shape):
    assert gpu_models.count_parameters(gpu_models.real_config(shape)) == EXACT[shape]


def test_qwen3_vl_2b_shape_matches_the_published_size():
    config = gpu_models.real_config("qwen3_vl_2b")
    assert gpu_models.count_parameters(config) == 2_127_532_032  # Qwen3-VL-2B-Instruct: 2.13 B
    summary = gpu_models.shape_summary(config, 0)
    assert (summary["hidden"], summary["layers"], summary["vocab"], summary["tied"]) == (2048, 28, 151_936, True)


def test_flop_count_by_hand():
    size = gpu_flops.ModelSize(layer_params=100, vision_params=10, layers=2, attention_width=4, hidden=3, vocab=7)
    view = gpu_flops.ViewWork(prompt_tokens=5, patches=8, responses=(2, 3))
    parts = gpu_flops.view_flops(size, view)
    assert parts == {
        "vision": 2 * 10 * 8,
        "layers": 2 * 100 * (5 + 5),
        "attention": 4 * 2 * 4 * (25 / 2 + (2 * 5 + 2) + (3 * 5 + 4.5)),
        "head": 2 * 3 * 7 * 5,
    }
    fwd = sum(parts.values())
    assert gpu_flops.update_flops(size, [view], [view]) == fwd + 3 * fwd
    frozen = parts["layers"] + 2 * parts["attention"] + parts["head"]
    assert gpu_flops.update_flops(size, [view], [view], lora=True) == fwd + fwd + frozen
    # Checkpointed models score in mode "image": the prompt's tokens once per row, each row whole.
    image = gpu_flops.view_flops(size, gpu_flops.ViewWork(5, 8, (2, 3), mode="image"))
    assert image["layers"] == 2 * 100 * (2 * 5 + 5) and image["vision"] == parts["vision"]
    assert image["attention"] == 4 * 2 * 4 * ((5 + 2) ** 2 / 2 + (5 + 3) ** 2 / 2)
    assert gpu_flops.view_flops(size, gpu_flops.ViewWork(5, 8, (2, 3), mode="none"))["vision"] == 2 * parts["vision"]


def test_dense_bf16_peaks_by_device_name():
    assert gpu_flops.dense_bf16_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_flops.dense_bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_flops.dense_bf16_peak("NVIDIA H200") == 989.4e12
    assert gpu_flops.dense_bf16_peak("NVIDIA A10G") is None


def test_wheel_list_covers_transformers_and_leaves_torch_on_the_box():
    import gpu_wheels

    names = dict(gpu_wheels.carry_list())
    assert {"transformers", "huggingface-hub", "tokenizers", "peft"} <= set(names)
    assert "torch" not in names and "numpy" not in names
    command = gpu_wheels.download_command()
    assert "--python-version 3.12" in command and f"transformers=={names['transformers']}" in command


def test_a_failing_part_is_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch):
    """The orchestration alone (no model): a part that raises is 'failed' with its error, one that hangs
    is stopped at its timeout, and the parts after them run; the JSON is written after each part."""
    script = tmp_path / "fake_bench.py"
    script.write_text(
        "import json, sys, time\n"
        "args = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
        "name, result = args['--worker'], args['--result']\n"
        "if name == 'loss_cuda':\n"
        "    raise SystemExit('boom: no kernel')\n"
        "if name == 'train_step_device':\n"
        "    json.dump({'status': 'running', 'partial': 1}, open(result, 'w')); time.sleep(60)\n"
        "json.dump({'status': 'ok', 'device': 'fake', 'torch': 't', 'transformers': 'x'}, open(result, 'w'))\n"
    )
    monkeypatch.setattr(bench_gpu, "__file__", str(script))
    monkeypatch.setattr(bench_gpu, "DRY_TIMEOUT_S", 5)
    report = bench_gpu.orchestrate(
        tmp_path / "out",
        dry=True,
        budget_s=100,
        parts=["env", "loss_cuda", "train_step_device", "full_ft"],
        work=tmp_path / "w",
    )
    parts = report["parts"]
    assert parts["env"]["status"] == "ok" and report["device"] == "fake"
    assert parts["loss_cuda"]["status"] == "failed" and "boom: no kernel" in parts["loss_cuda"]["error"]
    assert parts["train_step_device"]["status"] == "failed" and "timed out" in parts["train_step_device"]["error"]
    assert parts["train_step_device"]["partial"] == 1  # what it wrote before the timeout is kept
    assert parts["full_ft"]["status"] == "ok"
    on_disk = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert on_disk["parts"]["full_ft"]["status"] == "ok"
    assert "| loss_cuda | failed" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_a_part_is_skipped_when_the_budget_is_spent(tmp_path):
    report = bench_gpu.orchestrate(tmp_path / "out", dry=True, budget_s=0, parts=["env"], work=tmp_path / "w")
    assert report["parts"]["env"]["status"] == "skipped" and "time" in report["parts"]["env"]["reason"]


@pytest.mark.slow
def test_dry_run_writes_every_part_and_its_fields(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**__import__("os").environ, "VOPD_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
    )
    report = json.loads((out / "gpu_check.json").read_text())
    statuses = {name: (p["status"], p.get("error")) for name, p in report["parts"].items()}
    assert proc.returncode == 0, (statuses, proc.stdout[-3000:], (out / "gpu_check.log").read_text()[-6000:])
    assert set(report["parts"]) == {p.name for p in bench_gpu.PARTS}
    assert all(p["status"] == "ok" for p in report["parts"].values()), statuses
    assert report["dry_run"] and report["device"].startswith("cpu") and report["torch"] and report["transformers"]
    parts = report["parts"]
    for name in ("full_ft", "lora"):
        p = parts[name]
        for key in ("rollout_tokens_per_s", "peak_memory_bytes", "memplan_bytes", "update_flops"):
            assert p[key] > 0, (name, key, p[key])
        assert p["step_seconds"]["step"] > 0 and p["step_seconds"]["sample"] > 0
        assert "mfu" in p and p["mfu"] is None  # no bf16 peak for a CPU
        assert p["response_tokens"] == 8 * 8  # 8 rollouts x 8 tokens: a random model over 151k ids never stops early
    assert {c["precision"] for c in parts["loss_cuda"]["checks"]} == {"float32", "bfloat16"}
    assert {(c["vocab"], c["path"]) for c in parts["loss_scale"]["cells"]} == {
        (v, p) for v in (151_936, 248_320) for p in ("fused", "one_piece")
    }
    assert parts["fsdp2"]["backend"] == "gloo" and parts["fsdp2"]["sharded"]
    assert parts["train_step_device"]["relative_differences"]["loss"] == 0.0  # CPU on both sides in the dry run
    assert "| full_ft | ok |" in (out / "gpu_check.md").read_text()
