"""End-to-end training on a tiny random Qwen2-VL: resume equivalence, accumulation, bad steps,
signals, checkpoints that reload with the transformers Auto classes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.steps import seeded_step

import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec used below
import vopd.train_setup as train_setup
import vopd.trainer as trainer_mod
from vopd.checkpoint import latest_checkpoint
from vopd.cli import main as cli_main
from vopd.config import load_config
from vopd.data import PairCollator
from vopd.trainer import TrainingError, train

# Float comparisons between code paths: CI runs this file under a second kernel set too (.ci/run).
pytestmark = pytest.mark.numerics

BASE = [
    "model.path=tiny:qwen2_vl",
    "data.train=toyworld:16:0",
    "rollout.n=2",
    "rollout.max_new_tokens=4",
    "loss.top_k=16",
    "loss.chunk_size=7",  # several vocabulary chunks per micro-batch
    "optim.lr=1e-3",
    "optim.warmup_steps=1",
    "optim.weight_decay=0.0",
    "prompts_per_step=4",
    "micro_batch_prompts=2",
    "report_to=[jsonl]",
    "threads=1",
]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, [*BASE, f"output_dir={tmp_path}", *extra])


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


@pytest.mark.slow
def test_two_plus_two_steps_equal_four(tmp_path):
    train(_cfg(tmp_path / "a", "max_steps=4", "save_every=2"))
    train(_cfg(tmp_path / "b", "max_steps=2", "save_every=2"))
    res = train(_cfg(tmp_path / "b", "max_steps=4", "save_every=2"), resume=True)
    assert res.steps == 4 and res.checkpoint == tmp_path / "b" / "checkpoint-4"
    a, b = _weights(tmp_path / "a" / "checkpoint-4"), _weights(tmp_path / "b" / "checkpoint-4")
    start = _weights(tmp_path / "b" / "checkpoint-2")
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4, "training did not change the weights, the comparison would be vacuous"
    # Bit-exact: one machine, one process, the same kernels in the same order, and the resume restores
    # weights, optimiser, scheduler and RNG states exactly; any difference is a resume bug.
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    ta = load_file(tmp_path / "a" / "checkpoint-4" / "trainer_state" / "teacher.safetensors")
    tb = load_file(tmp_path / "b" / "checkpoint-4" / "trainer_state" / "teacher.safetensors")
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=0, rtol=0, msg=key)
    hist_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    hist_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist_b] == [1, 2, 3, 4]
    for ha, hb in zip(hist_a, hist_b):
        assert ha["divergence"] == hb["divergence"]


@pytest.mark.slow
def test_grad_accumulation_uses_global_token_count(tmp_path):
    """The 4 prompts of a step give the same gradient as 1 or as 2 micro-batches.

    Greedy rollouts make both score the same responses; the loss must be normalised by the step's
    total token count (not per micro-batch) for the gradients to agree. Gradients, not weights after
    AdamW: the first AdamW update is lr * g / (|g| + eps), whose slope lr / eps (1e4 here) turns the
    last-bit differences of a gradient element near eps into visible weight differences on any CPU.
    """
    common = ("rollout.temperature=0", "rollout.n=1", "teacher.kind=frozen", "loss.estimator=full")
    grads = []
    for name, micro in (("one", 4), ("two", 2)):
        cfg = _cfg(tmp_path / name, f"micro_batch_prompts={micro}", *common)
        state, sampler, dataset, _ = train_setup.setup(cfg)
        collate = PairCollator(state.processor, thinking=cfg.model.thinking, max_prompt_tokens=None)
        # The sampler yields micro-batches; the first step's 4 prompts are the same for both runs.
        step = [i for mb in list(iter(sampler))[: 4 // micro] for i in mb]
        assert len(step) == 4
        batches = [collate([dataset[i] for i in step[j : j + micro]]) for j in range(0, 4, micro)]
        store: dict = {}
        metrics = seeded_step(state, batches, capture=store)
        assert metrics["divergence"] > 0
        grads.append(store["grads"])
    one, two = grads
    assert one.keys() == two.keys()
    for key in one:
        # The two runs add the same per-token terms, grouped differently (one sum vs two partial sums
        # added): fp32 rounding of sums of a few hundred terms, far below 1e-4 of the tensor's largest
        # element. Normalising per micro-batch would change the gradients by tens of percent.
        scale = float(one[key].abs().max())
        torch.testing.assert_close(one[key], two[key], atol=1e-4 * scale + 1e-12, rtol=0, msg=key)


def test_ema_teacher_moves_towards_student_frozen_does_not(tmp_path):
    res_e = train(_cfg(tmp_path / "e", "max_steps=1", "teacher.kind=ema", "teacher.ema_rate=0.5"))
    res_f = train(_cfg(tmp_path / "f", "max_steps=1", "teacher.kind=frozen"))
    for res in (res_e, res_f):
        assert res.history[0]["skipped"] == 0.0
    student = _weights(res_e.checkpoint)
    ema = load_file(res_e.checkpoint / "trainer_state" / "teacher.safetensors")
    frozen = load_file(res_f.checkpoint / "trainer_state" / "teacher.safetensors")
    key = next(k for k in student if "lm_head" in k or "embed_tokens" in k)
    # Same seed -> same initial weights; the frozen teacher is exactly them, EMA is halfway to the student.
    init = frozen[key]
    torch.testing.assert_close(ema[key], 0.5 * init + 0.5 * student[key], atol=1e-6, rtol=1e-5)
    assert float((student[key] - init).abs().max()) > 0


def test_non_finite_loss_skips_then_stops(tmp_path, monkeypatch):
    calls = {"n": 0}

    def poison(real):
        def poisoned(*args, **kwargs):
            loss, stats = real(*args, **kwargs)
            calls["n"] += 1
            return loss * float("nan"), stats

        return poisoned

    # The trainer's one loss call per micro-batch (fused, chunked or one piece inside).
    monkeypatch.setattr(trainer_mod, "distillation_loss", poison(trainer_mod.distillation_loss))
    with pytest.raises(TrainingError, match="2 non-finite"):
        train(_cfg(tmp_path, "max_steps=5", "max_bad_steps=2", "save_every=1"))
    assert calls["n"] == 4  # 2 steps x 2 micro-batches, then the run stopped
    # Skipped steps never write NaN weights: the checkpoint of step 1 still holds finite weights.
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None
    assert all(torch.isfinite(v).all() for v in _weights(ckpt).values())


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    def send_term(state):
        if state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    res = train(_cfg(tmp_path, "max_steps=5"), callbacks=[send_term])
    assert res.interrupted and res.steps == 1
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_cfg(tmp_path / "empty", "max_steps=1"), resume=True)


@pytest.mark.slow
def test_cli_train_and_checkpoint_reloads_offline_in_fresh_process(tmp_path, capsys):
    out = tmp_path / "x"
    rc = cli_main(
        [
            "train",
            "--config",
            str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"),
            f"output_dir={out}",
            "max_steps=2",
            "save_every=1",
            "seed=7",
            "report_to=[jsonl]",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "vopd train: 2 steps" in printed
    ckpt = out / "checkpoint-2"
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "m = AutoModelForImageTextToText.from_pretrained(sys.argv[1])\n"
        # The checkpoint names the stock processor (servable by vLLM). Without torchvision the
        # stock Qwen2-VL processor cannot build its video processor; the image processor loads.
        "from transformers import AutoImageProcessor\n"
        "p = AutoImageProcessor.from_pretrained(sys.argv[1])\n"
        "assert 'vopd' not in sys.modules\n"
        "print(type(m).__name__, sum(x.numel() for x in m.parameters()), type(p).__name__)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Qwen2VLForConditionalGeneration" in done.stdout and "Qwen2VLImageProcessor" in done.stdout
    assert json.loads((ckpt / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    from vopd.models import load_model

    with pytest.warns(UserWarning, match="ImageOnlyQwen2VLProcessor"):  # vopd's fallback, announced
        assert load_model(str(ckpt))[1].image_processor is not None
    # keep_checkpoints=2 prunes older ones
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_teacher_health_probe_reports_drift_and_accuracy(tmp_path):
    """Frozen teacher: zero drift. Live teacher: the drift grows as the student trains."""
    common = (
        "max_steps=2",
        "health.every=1",
        "health.probe_size=4",
        "health.max_new_tokens=4",
        "health.probe_data=toyworld:4:9",
        "optim.lr=3e-3",
    )
    frozen = train(_cfg(tmp_path / "f", "teacher.kind=frozen", *common))
    with pytest.warns(UserWarning, match="collapse"):
        live = train(_cfg(tmp_path / "l", "teacher.kind=live", *common))
    for res in (frozen, live):
        for h in res.history:
            assert {"health/teacher_drift", "health/teacher_acc", "health/student_acc"} <= set(h)
            assert 0.0 <= h["health/teacher_acc"] <= 1.0
    assert [h["health/teacher_drift"] for h in frozen.history] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert live.history[-1]["health/teacher_drift"] > 1e-4


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) gives the weights of the 1-process run.

    Greedy rollouts make the responses identical; each process takes half of every step's prompts,
    the token count is summed globally, and DDP averages the gradients.
    """
    args = [
        *BASE,
        "rollout.temperature=0",
        "optim.warmup_steps=0",
        "teacher.kind=frozen",
        "max_steps=2",
        "micro_batch_prompts=1",
        "device=cpu",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "vopd.cli",
            "train",
            *args,
            f"output_dir={tmp_path / 'two'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "checkpoint-2" / "trainer_state" / "state.json").read_text())
    assert state["world_size"] == 2
    train(load_config(None, [*args, f"output_dir={tmp_path / 'one'}"]))
    one, two_w = _weights(tmp_path / "one" / "checkpoint-2"), _weights(tmp_path / "two" / "checkpoint-2")
    for key in one:
        torch.testing.assert_close(one[key], two_w[key], atol=1e-6, rtol=1e-5, msg=key)


def test_gradient_checkpointing_is_exact_and_bf16_autocast_stays_close(tmp_path):
    """Gradient checkpointing recomputes activations: the same step (same rollouts) gives the same
    loss and gradient norm. bf16 autocast changes the arithmetic, not the step: close, finite.
    The toy base with a frozen teacher, so the loss is far from 0 (the tiny random model's is ~1e-6)."""
    toy = ("model.path=toy-base", "teacher.kind=frozen", "max_steps=1")
    plain = train(_cfg(tmp_path / "plain", *toy)).history[0]
    ckpt = train(_cfg(tmp_path / "ckpt", *toy, "model.gradient_checkpointing=true")).history[0]
    assert plain["divergence"] > 1e-3 and plain["grad_norm"] > 0
    assert ckpt["response_tokens"] == plain["response_tokens"]
    assert ckpt["divergence"] == pytest.approx(plain["divergence"], rel=1e-4)
    assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-3)
    bf16 = train(_cfg(tmp_path / "bf16", *toy, "mixed_precision=bf16", "model.gradient_checkpointing=true")).history[0]
    assert bf16["skipped"] == 0.0 and math.isfinite(bf16["grad_norm"])
    assert bf16["divergence"] == pytest.approx(plain["divergence"], rel=0.5)


def test_tensorboard_events_written(tmp_path):
    train(_cfg(tmp_path, "max_steps=1", "report_to=[jsonl,tensorboard]"))
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_trains_on_released_visionopd6k_layout(tmp_path):
    """The released Vision-OPD-6K folder (train.jsonl + relative image paths) trains as is."""
    from vopd.datasets.visionopd6k import write_visionopd6k
    from vopd.toyworld.scenes import make_dataset

    folder = tmp_path / "vopd6k"
    write_visionopd6k(make_dataset(4, 5), folder)
    moved = tmp_path / "moved"
    folder.rename(moved)  # relative paths: the folder can move
    res = train(_cfg(tmp_path / "run", "max_steps=1", f"data.train={moved / 'train.jsonl'}"))
    assert res.steps == 1 and res.history[0]["response_tokens"] > 0


@pytest.mark.slow
def test_paper_recipe_runs_two_steps_at_tiny_scale(tmp_path):
    """configs/paper_qwen35_4b.yaml with only the sizes shrunk: Qwen3.5 family, bf16 autocast,
    gradient checkpointing, red box + hint student, data-loader workers, EMA teacher."""
    recipe = Path(__file__).resolve().parents[1] / "configs" / "paper_qwen35_4b.yaml"
    cfg = load_config(
        recipe,
        [
            "model.path=tiny:qwen3_5",
            "data.train=toyworld:8:3",
            "data.num_workers=2",
            "prompts_per_step=2",
            "micro_batch_prompts=1",
            "rollout.n=2",
            "rollout.max_new_tokens=4",
            "max_steps=2",
            "save_every=0",
            f"output_dir={tmp_path}",
            "report_to=[jsonl]",
            "threads=1",
        ],
    )
    assert cfg.views.draw_box and cfg.views.hint and cfg.mixed_precision == "bf16"
    res = train(cfg)
    assert res.steps == 2 and all(h["skipped"] == 0.0 for h in res.history)
    assert res.checkpoint == tmp_path / "checkpoint-2"


def test_toy_demo_recipe_matches_the_toy_views():
    from vopd.toyworld.scenes import TOY_VIEW

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "toy_demo.yaml")
    # Crop replay only picks which view a training prompt's student gets; every geometry knob
    # must equal the evaluation's.
    assert 0 < cfg.views.student_crop_share < 1
    assert dataclasses.replace(cfg.views, student_crop_share=0.0) == TOY_VIEW


def test_resume_of_a_finished_run_does_nothing_and_says_so(tmp_path, capsys):
    train(_cfg(tmp_path, "max_steps=1"))
    res = train(_cfg(tmp_path, "max_steps=1"), resume=True)
    assert res.steps == 1 and res.history == [] and res.checkpoint == tmp_path / "checkpoint-1"
    assert "nothing to do" in capsys.readouterr().out


def test_health_rollback_restores_the_last_healthy_teacher(tmp_path):
    """An EMA teacher that drifts past the threshold is put back to its last healthy weights."""
    common = (
        "max_steps=2",
        "health.every=1",
        "health.probe_size=4",
        "health.max_new_tokens=4",
        "health.probe_data=toyworld:4:9",
        "optim.lr=3e-2",
        "teacher.kind=ema",
        "teacher.ema_rate=1.0",
        "health.drift_warn=1e-9",
        "health.on_degrade=rollback",
    )
    with pytest.warns(UserWarning, match="teacher degrading"):
        res = train(_cfg(tmp_path, *common))
    assert all(h.get("health/rolled_back") == 1.0 for h in res.history)
    init = load_file(res.checkpoint / "trainer_state" / "teacher.safetensors")
    # rate 1.0 copies the student into the teacher every step; the rollback undid it each time.
    student = _weights(res.checkpoint)
    key = next(k for k in student if "lm_head" in k or "embed_tokens" in k)
    assert float((student[key] - init[key]).abs().max()) > 0
    frozen = train(_cfg(tmp_path / "f", "max_steps=1", "teacher.kind=frozen"))
    frozen_init = load_file(frozen.checkpoint / "trainer_state" / "teacher.safetensors")
    torch.testing.assert_close(init[key], frozen_init[key])


def test_resume_applies_this_runs_learning_rate(tmp_path, capsys):
    train(_cfg(tmp_path, "max_steps=1", "optim.warmup_steps=0"))
    res = train(_cfg(tmp_path, "max_steps=2", "optim.warmup_steps=0", "optim.lr=5e-4"), resume=True)
    assert res.history[-1]["lr"] == pytest.approx(5e-4)
    assert "optim.lr 0.001 -> 0.0005" in capsys.readouterr().out


def test_external_teacher_with_another_vocabulary_is_refused(tmp_path):
    """An external teacher must share the student's token ids; a mismatch is an error, not garbage."""
    from vopd.tiny_models import build_tiny_model, save_tiny

    other, proc = build_tiny_model("qwen2_vl", seed=1, text={"vocab_size": 700})
    save_tiny(other, proc, tmp_path / "other")
    with pytest.raises(ValueError, match="vocabulary"):
        train(_cfg(tmp_path / "run", "max_steps=1", "teacher.kind=external", f"teacher.path={tmp_path / 'other'}"))
    same, proc2 = build_tiny_model("qwen2_vl", seed=3)
    save_tiny(same, proc2, tmp_path / "same")
    res = train(_cfg(tmp_path / "ok", "max_steps=1", "teacher.kind=external", f"teacher.path={tmp_path / 'same'}"))
    assert res.steps == 1 and res.history[0]["divergence"] > 0
