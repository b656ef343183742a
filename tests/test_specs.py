"""Model and data specs: one resolver for every command, names registered from above; the split
teacher knobs."""

from __future__ import annotations

import pytest

import vopd.specs as specs
import vopd.toyworld  # noqa: F401  registers toy-base and toyworld:N
from vopd.config import load_config
from vopd.data import load_train_samples
from vopd.knobs import ConfigError


def test_toyworld_registers_its_names_and_unregistered_names_fail_clearly(monkeypatch):
    assert "toy-base" in specs.model_spec_names() and "tiny:<family>" in specs.model_spec_names()
    assert len(load_train_samples("toyworld:3:5")) == 3
    monkeypatch.setattr(specs, "_MODELS", {})
    monkeypatch.setattr(specs, "_DATA", {})
    with pytest.raises(ValueError, match="import vopd.toyworld"):
        specs.resolve_model_spec("toy-base")
    with pytest.raises(ValueError, match="import vopd.toyworld"):
        load_train_samples("toyworld:3")
    with pytest.raises(ValueError, match="empty model spec"):
        specs.resolve_model_spec("")
    with pytest.raises(ValueError, match="must not contain"):
        specs.register_model_spec("tiny:x", lambda **kw: None)


def test_registered_model_spec_gets_the_load_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(specs, "_MODELS", {})
    specs.register_model_spec("mine", lambda **kw: (seen.update(kw), "processor"))
    assert specs.resolve_model_spec("mine", dtype="bfloat16", seed=7)[1] == "processor"
    assert seen == {"dtype": "bfloat16", "trust_remote_code": False, "attn_implementation": None, "seed": 7}


def test_tiny_spec_builds_a_tiny_model():
    model, processor = specs.resolve_model_spec("tiny:qwen2_vl", seed=0)
    assert model.config.model_type == "qwen2_vl" and processor is not None


def test_teacher_ema_rate_and_mix_are_separate_knobs():
    cfg = load_config(None, ["teacher.kind=ema", "teacher.ema_rate=0.1", "teacher.mix=0.2"]).teacher
    assert (cfg.ema_rate, cfg.mix) == (0.1, 0.2)
    with pytest.raises(ConfigError, match="teacher.mix"):
        load_config(None, ["teacher.mix=1.5"])
