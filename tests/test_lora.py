"""LoRA (`lora.r > 0`, peft): adapters train, the teacher lives on the same base (adapters off or
a frozen `ema` adapter), checkpoints hold the adapter (+ a merged HF folder) and resume exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec used below
from vopd.config import load_config
from vopd.knobs import ConfigError
from vopd.lora import STUDENT, TEACHER, adapter_parameters
from vopd.scoring import FullInputs
from vopd.train_setup import setup
from vopd.trainer import train

pytest.importorskip("peft")

# Float comparisons between code paths: CI runs this file under a second kernel set too (.ci/run).
pytestmark = pytest.mark.numerics

ARGS = [
    "model.path=tiny:qwen2_vl",
    "data.train=toyworld:16:0",
    "rollout.n=2",
    "rollout.max_new_tokens=4",
    "loss.top_k=16",
    "optim.lr=1e-2",
    "optim.warmup_steps=0",
    "optim.weight_decay=0.0",
    "prompts_per_step=4",
    "micro_batch_prompts=2",
    "report_to=[jsonl]",
    "threads=1",
    "device=cpu",
    "lora.r=4",
    "teacher.ema_rate=0.5",
    "save_every=1",
    "keep_checkpoints=0",
]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_teacher_shares_the_base_and_never_trains(tmp_path):
    from vopd.tiny_models import build_tiny_model

    state = setup(load_config(None, [*ARGS, f"output_dir={tmp_path}"])).state
    policy = state.policy
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and f".{STUDENT}." in n for n in trainable)
    optimised = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in policy.named_parameters() if n in trainable}
    assert state.teacher.model is policy  # no second model copy
    ema = adapter_parameters(policy, TEACHER)
    assert ema and not any(p.requires_grad for p in ema.values())
    # Scoring with the teacher switches adapters and back: the flags must survive it.
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    state.teacher.score(FullInputs(inputs, 2), torch.ones(1, 2, dtype=torch.bool))(slice(None))
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == trainable
    # A moved student adapter: the EMA adapter goes halfway (rate 0.5), the student keeps its values.
    with torch.no_grad():
        for p in adapter_parameters(policy, STUDENT).values():
            p.add_(0.2)
    before = {k: v.clone() for k, v in ema.items()}
    state.teacher.update(policy)
    for name, p in adapter_parameters(policy, STUDENT).items():
        torch.testing.assert_close(ema[name], 0.5 * before[name] + 0.5 * p.detach())
    # The frozen teacher is the base model exactly (adapters off), even with a moved adapter.
    frozen = setup(load_config(None, [*ARGS, "teacher.kind=frozen", f"output_dir={tmp_path / 'f'}"])).state
    with torch.no_grad():
        for p in adapter_parameters(frozen.policy, STUDENT).values():
            p.add_(0.2)
    base, _ = build_tiny_model("qwen2_vl", seed=0)
    got = frozen.teacher.score(FullInputs(inputs, 2), torch.ones(1, 2, dtype=torch.bool))(slice(None))
    want = _logits(base, ids)[0, 2:4]
    # The teacher with adapters off vs a fresh base: the same weights, but LoRA's wrapped layers add a
    # zero term in another kernel; fp32 logits of size ~1 through ~70 sqrt-units: ~4e-6, hence 1e-5.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float((_logits(frozen.policy, ids)[0, 2:4] - want).abs().max()) > 1e-4  # the student differs


@pytest.mark.slow
def test_lora_checkpoint_adapter_and_merged_model_reload_equal(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vopd.tiny_models import build_tiny_model

    res = train(load_config(None, [*ARGS, "max_steps=2", "lora.save_merged=true", f"output_dir={tmp_path}"]))
    ckpt = res.checkpoint
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    base, _ = build_tiny_model("qwen2_vl", seed=0)
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    base_logits = _logits(base, ids)
    adapted = PeftModel.from_pretrained(base, str(ckpt))
    merged = AutoModelForImageTextToText.from_pretrained(ckpt / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())  # a plain HF model
    a, m = _logits(adapted, ids), _logits(merged, ids)
    assert float((a - base_logits).abs().max()) > 1e-4, "the adapter did not train"
    # Adapter applied (x W + x A B) vs merged (x (W + A B)): reassociated fp32 products, ~chain * 2**-24
    # * |logit| (tests/support/tolerance.py) ~ 4e-6 here, hence 1e-5.
    torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_lora_resume_one_plus_one_equals_two(tmp_path):
    train(load_config(None, [*ARGS, "max_steps=2", f"output_dir={tmp_path / 'a'}"]))
    train(load_config(None, [*ARGS, "max_steps=1", f"output_dir={tmp_path / 'b'}"]))
    train(load_config(None, [*ARGS, "max_steps=2", f"output_dir={tmp_path / 'b'}"]), resume=True)
    for name in ("adapter_model.safetensors", "trainer_state/teacher.safetensors"):
        a, b = load_file(tmp_path / "a" / "checkpoint-2" / name), load_file(tmp_path / "b" / "checkpoint-2" / name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    one = load_file(tmp_path / "a" / "checkpoint-1" / "adapter_model.safetensors")
    two = load_file(tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors")
    assert max(float((one[k] - two[k]).abs().max()) for k in one) > 1e-4


def test_lora_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(None, ["lora.r=-1"])
    with pytest.raises(ConfigError, match="target_modules is empty"):
        load_config(None, ["lora.r=4", "lora.target_modules=[]"])
    with pytest.raises(ConfigError, match="fsdp2 is not supported"):
        load_config(None, ["lora.r=4", "parallel.strategy=fsdp2"])


def test_lora_target_that_matches_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lora.target_modules=.'no_such_proj'. matches no module"):
        setup(load_config(None, [*ARGS, "lora.target_modules=[no_such_proj]", f"output_dir={tmp_path}"]))


@pytest.mark.slow
def test_health_probe_measures_the_lora_teacher_not_the_student(tmp_path):
    """The probe's teacher accuracy is the teacher's answers (frozen: the base with adapters off),
    not the student's adapter on crops: a frozen teacher's accuracy cannot move while the student's does."""
    cfg = load_config(
        None,
        [
            "model.path=toy-base",
            "data.train=toyworld:16:0",
            "rollout.n=2",
            "rollout.max_new_tokens=8",
            "prompts_per_step=8",
            "micro_batch_prompts=8",
            "report_to=[jsonl]",
            "threads=1",
            "max_steps=3",
            "lora.r=8",
            "lora.alpha=16",
            "teacher.kind=frozen",
            "health.every=1",
            "health.probe_data=toyworld:32:5",
            "optim.lr=5e-2",
            "optim.warmup_steps=0",
            f"output_dir={tmp_path}",
        ],
    )
    probes = train(cfg).health
    teacher = [p["health/teacher_acc"] for p in probes]
    crop = [p["health/student_crop_acc"] for p in probes]
    assert len(probes) == 4 and len(set(crop)) > 1, crop  # the student's adapter moved its crop answers
    assert teacher == [teacher[0]] * 4, teacher
