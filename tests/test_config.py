"""Typed config: YAML + key=value overrides, unknown keys and wrong types rejected by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from vopd.config import describe_config, load_config, parse_overrides
from vopd.knobs import ConfigError

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
    assert (cfg.teacher.kind, cfg.teacher.ema_rate, cfg.teacher.mix) == ("ema", 0.05, 0.05)
    assert cfg.rollout.max_new_tokens == 1024 and cfg.mixed_precision == "bf16" and cfg.epochs == 1.0


def test_describe_config_lists_every_knob_with_help():
    rows = describe_config()
    keys = {row.key for row in rows}
    assert {"optim.lr", "loss.beta", "teacher.kind", "rollout.n", "views.zoom", "output_dir"} <= keys
    helps = {row.key: row.help for row in rows}
    assert "JSD" in helps["loss.beta"] or "KL" in helps["loss.beta"]
    allowed = {row.key: row.allowed for row in rows}
    assert allowed["loss.beta"] == "in [0, 1]" and allowed["optim.betas"] == "in [0, 1)"
    assert allowed["teacher.kind"] == "ema | frozen | trust_region | live | external"
    assert allowed["log_every"] == ">= 1" and allowed["views.zoom"] == "> 0"


def test_docs_config_reference_is_up_to_date():
    from vopd.config import config_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_markdown(), "regenerate with: vopd config --markdown > docs/config.md"
    missing = [row.key for row in describe_config() if not row.help]
    assert not missing, f"knobs without help text: {missing}"


def test_health_drift_warns_without_a_grader():
    """The label-free drift check must run even when no probe accuracy is measured."""
    from vopd.config import HealthConfig
    from vopd.health import TeacherHealth

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


# ---------------------------------------------------------------------------- validation at load time


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1e-5", r"optim\.lr must be a finite number >= 0, got -1e-05"),
        ("optim.lr=.inf", r"optim\.lr must be a finite number >= 0"),
        ("optim.betas=[0.9,1.5]", r"optim\.betas\[1\] must be a finite number in \[0, 1\)"),
        ("optim.betas=[-0.1,0.9]", r"optim\.betas\[0\] must be a finite number in \[0, 1\)"),
        ("optim.betas=[0.9]", r"optim\.betas needs two values"),
        ("log_every=0", r"log_every must be a finite number >= 1, got 0"),
        ("max_bad_steps=0", r"max_bad_steps must be a finite number >= 1"),
        ("max_steps=-1", r"max_steps must be a finite number >= 0"),
        ("epochs=-1", r"epochs must be a finite number > 0"),
        ("optim.warmup_steps=-3", r"optim\.warmup_steps must be a finite number >= 0"),
        ("optim.grad_clip=-1", r"optim\.grad_clip must be a finite number >= 0"),
        ("device=tpu", r"device='tpu' is not one of auto \| cpu \| cuda"),
        ("rollout.top_p=0", r"rollout\.top_p must be a finite number in \(0, 1\]"),
        ("health.on_degrade=panic", r"health\.on_degrade='panic' is not one of warn \| stop \| rollback"),
        ("health.acc_drop_warn=2", r"health\.acc_drop_warn"),
        ("views.box_color=[255,0,300]", r"views\.box_color\[2\] must be a finite number in \[0, 255\]"),
        ("report_to=[jsonl,csv]", r"report_to\[1\]='csv' is not one of jsonl \| tensorboard \| wandb \| auto"),
        ("prompts_per_step=0", r"prompts_per_step must be a finite number >= 1"),
        ("seed=1.5", r"seed expects an integer, got 1.5"),
    ],
)
def test_every_range_is_checked_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_string_keys_keep_their_text():
    assert load_config(None, ["output_dir=1e5"]).output_dir == "1e5"
    assert load_config(None, ["output_dir=007"]).output_dir == "007"
    assert load_config(None, ["output_dir=1.50"]).output_dir == "1.50"


def test_string_keys_keep_their_text_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: 1.50\ndata:\n  train: 2024\noptim:\n  lr: 1e-5\nmax_steps: 1e3\n")
    cfg = load_config(path)
    assert (cfg.output_dir, cfg.data.train) == ("1.50", "2024")
    assert cfg.optim.lr == pytest.approx(1e-5) and cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)


def test_duplicate_yaml_key_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 1.0e-5\n  lr: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml, line 3: duplicate key 'lr' \(first set on line 2\)"):
        load_config(path)


def test_broken_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line \d+"):
        load_config(path)


def test_yaml_tags_are_refused_not_executed(tmp_path):
    path = tmp_path / "tag.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(
        ConfigError, match=r"tag\.yaml, line 1: the YAML tag !!python/object/apply:os\.system is not allowed"
    ):
        load_config(path)
    assert not marker.exists()


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_old_key_names_are_refused_with_the_current_name():
    """0.x dropped the old names: an old key fails at load time and the error suggests the new one."""
    with pytest.raises(ConfigError, match=r"unknown config key micro_batch \(did you mean micro_batch_prompts\?\)"):
        load_config(None, ["micro_batch=3"])
    with pytest.raises(ConfigError, match=r"unknown config key teacher\.rate \(did you mean teacher\.ema_rate\?\)"):
        load_config(None, ["teacher.rate=0.2"])


def test_every_section_raises_config_error_when_built_in_python():
    from vopd.config import HealthConfig, RolloutConfig, ViewConfig

    for make, key in [
        (lambda: HealthConfig(probe_size=0), "health.probe_size"),
        (lambda: RolloutConfig(n=0), "rollout.n"),
        (lambda: ViewConfig(zoom=-1.0), "views.zoom"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            make()


def test_integer_knobs_refuse_floats_when_built_in_python():
    from vopd.config import ViewConfig

    with pytest.raises(ConfigError, match=r"views\.min_side expects an integer, got 1\.5"):
        ViewConfig(min_side=1.5)


def test_every_knob_has_a_rule_or_is_free_text():
    """Numbers and enums all carry a rule, so nothing numeric slips through unchecked."""
    import dataclasses
    import typing

    from vopd.config import TrainConfig

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", hints[f.name], f.metadata["rule"]

    free: set[str] = set()  # none today; kept explicit so a new exception is a visible decision
    for key, tp, rule in walk(TrainConfig):
        numeric = tp in (int, float) or typing.get_args(tp)[:1] in ((int,), (float,))
        if numeric and key not in free:
            assert rule.describe(), f"{key} is numeric but has no allowed range"


def test_view_vocabulary_refuses_other_names():
    from vopd.config import VIEW_NAMES, check_view

    assert VIEW_NAMES == ("full", "crop", "boxed_full")
    assert [check_view(v) for v in VIEW_NAMES] == list(VIEW_NAMES)
    for old in ("global", "regional", "student", "zoomed"):  # the names vopd gap used before 0.x too
        with pytest.raises(ConfigError, match=f"view='{old}' is not one of full \\| crop \\| boxed_full"):
            check_view(old)


def test_vopd_config_imports_no_model_code():
    import subprocess
    import sys

    code = (
        "import sys; from vopd.cli import main; rc = main(['config']); "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print('LOADED', bad); sys.exit(rc or (3 if bad else 0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-500:] + out.stderr[-2000:]
    assert "LOADED []" in out.stdout and "optim.lr" in out.stdout


def test_vllm_with_lora_loads():
    """The server serves the base and each push is the adapter alone (docs/vllm.md, vopd.vllm_lora)."""
    cfg = load_config(None, ["rollout.engine=vllm", "lora.r=8"])
    assert (cfg.rollout.engine, cfg.lora.r) == ("vllm", 8)
    with pytest.raises(ConfigError, match="rollout.engine=vllm with lora.r=600: vLLM serves LoRA ranks up to 512"):
        load_config(None, ["rollout.engine=vllm", "lora.r=600"])  # at load, before anything is built
    assert load_config(None, ["lora.r=600"]).lora.r == 600  # the HF engine has no such limit


def test_vllm_with_fsdp2_loads():
    """The sharded student writes the server's snapshot itself (docs/vllm.md, vopd.sharded_snapshot)."""
    cfg = load_config(None, ["rollout.engine=vllm", "parallel.strategy=fsdp2"])
    assert (cfg.rollout.engine, cfg.parallel.strategy) == ("vllm", "fsdp2")


# What train_setup may still raise, and why none of it is a combination of config keys: each is
# about the environment (an installed package, a folder on disk) or a programming error.
SETUP_REFUSALS_OUTSIDE_THE_CONFIG = {
    ("resolve_trackers", "ConfigError"),  # report_to names a tracker whose package is not installed
    ("build_model", "CheckpointError"),  # --resume: the saved model cannot be loaded
    ("_resume_point", "FileNotFoundError"),  # --resume without a checkpoint in output_dir
}


def test_setup_refuses_no_combination_the_config_could_refuse_at_load():
    """Every `raise` in vopd.train_setup, by enclosing function: only the environment checks above are
    left; a bad combination of keys is the config's to refuse (`TrainConfig.__post_init__`)."""
    import ast

    import vopd.train_setup

    tree = ast.parse(Path(vopd.train_setup.__file__).read_text())
    found = set()
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(func):
                if isinstance(node, ast.Raise) and node.exc is not None:
                    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                    found.add((func.name, getattr(exc, "id", None) or getattr(exc, "attr", "?")))
    assert found - SETUP_REFUSALS_OUTSIDE_THE_CONFIG == set()
