"""Typed config: YAML + key=value overrides, unknown keys and wrong types rejected by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from vopd.config import ConfigError, describe_config, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_nested_and_typed():
    cfg = load_config(None, ["optim.lr=1e-5", "rollout.n=4", "teacher.kind=frozen", "seed=7", "output_dir=runs/x"])
    assert cfg.optim.lr == pytest.approx(1e-5)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.rollout.n == 4 and cfg.teacher.kind == "frozen" and cfg.seed == 7
    assert cfg.output_dir == "runs/x"


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3.0e-4\nmax_steps: 5\nviews:\n  zoom: 3\n")
    cfg = load_config(path, ["max_steps=9"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.max_steps == 9
    assert cfg.views.zoom == 3.0


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2e-6\n")  # YAML 1.1 would read this as a string
    assert load_config(path).optim.lr == pytest.approx(2e-6)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=1", "optim.lr"),  # unknown key, with a suggestion
        ("rollout.n=two", "rollout.n"),  # wrong type
        ("teacher.kind=bogus", "teacher.kind"),  # bad choice
        ("loss.beta=1.5", "loss.beta"),  # out of range
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing"),
        ("nosuchsection.x=1", "nosuchsection"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["max_steps"])


def test_external_teacher_needs_path():
    with pytest.raises(ConfigError, match="teacher.path"):
        load_config(None, ["teacher.kind=external"])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.path and cfg.data.train


def test_paper_recipe_matches_method():
    cfg = load_config(CONFIGS / "paper_qwen35_4b.yaml")
    assert (cfg.prompts_per_step, cfg.rollout.n) == (96, 8)
    assert cfg.optim.lr == pytest.approx(2e-6) and cfg.optim.warmup_steps == 10
    assert (cfg.loss.beta, cfg.loss.estimator, cfg.loss.top_k, cfg.loss.add_tail) == (0.5, "topk", 100, True)
    assert (cfg.teacher.kind, cfg.teacher.rate) == ("ema", 0.05)
    assert cfg.rollout.max_new_tokens == 1024 and cfg.mixed_precision == "bf16" and cfg.epochs == 1.0


def test_describe_config_lists_every_knob_with_help():
    rows = describe_config()
    keys = {k for k, _, _ in rows}
    assert {"optim.lr", "loss.beta", "teacher.kind", "rollout.n", "views.zoom", "output_dir"} <= keys
    helps = dict((k, h) for k, _, h in rows)
    assert "JSD" in helps["loss.beta"] or "KL" in helps["loss.beta"]


def test_docs_config_reference_is_up_to_date():
    from vopd.config import config_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_markdown(), "regenerate with: vopd config --markdown > docs/config.md"
    missing = [key for key, _, help_text in describe_config() if not help_text]
    assert not missing, f"knobs without help text: {missing}"


def test_health_drift_warns_without_a_grader():
    """The label-free drift check must run even when no probe accuracy is measured."""
    from vopd.health import HealthConfig, TeacherHealth

    health = TeacherHealth(HealthConfig(every=1, drift_warn=0.5), [], views=None, grader=None)
    assert health._check(0, {"health/teacher_drift": 0.0}) is True  # the reference probe
    assert health._check(3, {"health/teacher_drift": 0.1}) is True
    with pytest.warns(UserWarning, match="teacher drift 2.000"):
        assert health._check(4, {"health/teacher_drift": 2.0}) is False
    # A resumed run's first probe (step > 0) is its reference, with or without a grader.
    resumed = TeacherHealth(HealthConfig(every=1, drift_warn=0.5), [], views=None)
    assert resumed._check(7, {"health/teacher_drift": 3.0}) is True
    with pytest.warns(UserWarning, match="teacher drift"):
        assert resumed._check(8, {"health/teacher_drift": 3.0}) is False


def test_sampled_estimator_requires_reverse_kl():
    with pytest.raises(ConfigError, match="loss.beta=1"):
        load_config(None, ["loss.estimator=sampled"])
    assert load_config(None, ["loss.estimator=sampled", "loss.beta=1"]).loss.beta == 1.0
