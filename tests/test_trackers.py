"""report_to: `auto` (the default) logs to what is installed and says what it skipped; a tracker
named explicitly but not installed is a clear error before any model is loaded."""

from __future__ import annotations

import pytest

import vopd.toyworld  # noqa: F401  registers the toyworld:N data spec used below
import vopd.train_setup as train_setup
from vopd.config import load_config
from vopd.knobs import ConfigError
from vopd.train_setup import resolve_trackers


def _missing(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    real = train_setup._tracker_available
    monkeypatch.setattr(train_setup, "_tracker_available", lambda n: n not in names and real(n))


def test_a_config_without_report_to_logs_to_every_installed_auto_tracker(monkeypatch):
    """Nothing named: metrics.jsonl plus TensorBoard when installed, and one notice when it is not."""
    report_to = load_config(None, []).report_to
    assert "jsonl" in report_to  # the trainer writes metrics.jsonl whenever report_to holds jsonl
    monkeypatch.setattr(train_setup, "_tracker_available", lambda n: True)
    assert resolve_trackers(report_to) == (["tensorboard"], None)
    monkeypatch.setattr(train_setup, "_tracker_available", lambda n: n != "tensorboard")
    trackers, notice = resolve_trackers(report_to)
    assert trackers == [] and "tensorboard not installed" in notice


def test_auto_uses_installed_tensorboard(monkeypatch):
    monkeypatch.setattr(train_setup, "_tracker_available", lambda n: True)
    assert resolve_trackers(["jsonl", "auto"]) == (["tensorboard"], None)
    assert resolve_trackers(["auto", "tensorboard"]) == (["tensorboard"], None)
    assert resolve_trackers(["jsonl"]) == ([], None)


def test_auto_skips_missing_tensorboard_with_one_line_notice(monkeypatch):
    _missing(monkeypatch, "tensorboard")
    trackers, notice = resolve_trackers(["jsonl", "auto"])
    assert trackers == []
    assert notice is not None and "\n" not in notice
    assert "tensorboard not installed" in notice and "vision-opd[tensorboard]" in notice


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_explicit_missing_tracker_is_an_error(monkeypatch, name):
    _missing(monkeypatch, name)
    with pytest.raises(ConfigError, match=f"report_to={name} but the {name} package is not installed"):
        resolve_trackers(["jsonl", name])


def test_unknown_tracker_rejected_by_config():
    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, ["report_to=[jsonl,mlflow]"])


def _tiny(tmp_path, report_to: str):
    return load_config(
        None,
        [
            "model.path=tiny:qwen2_vl",
            "data.train=toyworld:4:0",
            "rollout.n=1",
            "rollout.max_new_tokens=2",
            "loss.top_k=8",
            "prompts_per_step=2",
            "micro_batch_prompts=2",
            "max_steps=1",
            "threads=1",
            f"report_to={report_to}",
            f"output_dir={tmp_path}",
        ],
    )


def test_train_fails_before_loading_when_named_tracker_missing(tmp_path, monkeypatch):
    from vopd.trainer import train

    _missing(monkeypatch, "tensorboard")
    monkeypatch.setattr(train_setup, "resolve_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(ConfigError, match="tensorboard package is not installed"):
        train(_tiny(tmp_path, "[jsonl,tensorboard]"))


@pytest.mark.slow
def test_train_with_auto_and_missing_tensorboard_says_so(tmp_path, monkeypatch, capsys):
    from vopd.trainer import train

    _missing(monkeypatch, "tensorboard")
    train(_tiny(tmp_path, "[jsonl,auto]"))
    assert "report_to=auto: tensorboard not installed" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
