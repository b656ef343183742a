"""Every `vopd` command fails with one line on stderr and a non-zero status; tracebacks only with --debug."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vopd.cli import EXPECTED_ERRORS, main
from vopd.knobs import ConfigError


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


def _config_raising(monkeypatch, capsys, error: BaseException) -> tuple[int, str]:
    """Run ``vopd config`` with its handler raising ``error``; its exit status and its one stderr line."""
    import vopd.cli as cli

    monkeypatch.delenv("VOPD_DEBUG", raising=False)

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_config", fail)
    code = main(["config"])
    return code, _one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv, code, needles",
    [
        (["train", "optim.lr=-1"], 2, ["vopd train: config error", "optim.lr must be", "vopd config"]),
        (["train", "--config", "/nonexistent/x.yaml"], 2, ["config file /nonexistent/x.yaml not found"]),
        (["train", "optim.lrr=1"], 2, ["unknown config key optim.lrr", "did you mean optim.lr"]),
        (["data", "check", "/nonexistent/rows.jsonl"], 1, ["data error", "/nonexistent/rows.jsonl", "vopd data check"]),
        (["gap", "/nonexistent/rows.jsonl", "--model", "x", "--out", "OUT"], 1, ["vopd gap: data error"]),
        (["train", "--config", "tiny_cpu", "output_dir=FILE"], 1, ["vopd train: run folder", "is a file"]),
    ],
)
def test_expected_failures_are_one_line_and_non_zero(argv, code, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("VOPD_DEBUG", raising=False)
    (tmp_path / "file").write_text("x")
    subs = {"OUT": str(tmp_path / "out"), "output_dir=FILE": f"output_dir={tmp_path / 'file'}"}
    argv = [subs.get(a, a) for a in argv]
    assert main(argv) == code
    line = _one_line(capsys.readouterr().err)
    for needle in needles:
        assert needle in line


def test_debug_flag_anywhere_or_env_shows_the_traceback(monkeypatch):
    monkeypatch.delenv("VOPD_DEBUG", raising=False)
    with pytest.raises(ConfigError, match="optim.lr"):
        main(["--debug", "train", "optim.lr=-1"])
    with pytest.raises(ConfigError, match="optim.lr"):
        main(["train", "optim.lr=-1", "--debug"])
    monkeypatch.setenv("VOPD_DEBUG", "1")
    with pytest.raises(ConfigError, match="optim.lr"):
        main(["train", "optim.lr=-1"])


def test_unexpected_errors_are_one_line_with_the_debug_hint(monkeypatch, capsys):
    code, line = _config_raising(monkeypatch, capsys, KeyError("surprise"))
    assert code == 1
    assert "unexpected error (KeyError)" in line and "--debug" in line and "VOPD_DEBUG=1" in line


@pytest.mark.parametrize(
    "module, name, label, code", [(m, n, lab, 2 if n == "ConfigError" else 1) for m, n, lab, _ in EXPECTED_ERRORS]
)
def test_every_expected_error_class_exists_and_maps_to_its_line(module, name, label, code, monkeypatch, capsys):
    """The table names real classes (a rename would silently turn them into 'unexpected error')."""
    import importlib

    cls = getattr(importlib.import_module(module), name)
    err = cls.__new__(cls)
    Exception.__init__(err, "what went wrong\nsecond line")
    got, line = _config_raising(monkeypatch, capsys, err)
    assert got == code
    assert line.startswith(f"vopd config: {label}: what went wrong; second line")


def test_library_value_errors_are_invalid_input_not_unexpected(monkeypatch, capsys):
    code, line = _config_raising(monkeypatch, capsys, ValueError("data.jsonl: no questions to measure"))
    assert code == 1
    assert line.startswith("vopd config: invalid input: data.jsonl: no questions to measure -> fix what")


def test_command_return_value_is_the_exit_status(monkeypatch):
    """gap/eval return their own status (e.g. items failed); the CLI passes it through."""
    import vopd.evaluation.cli_args as eval_args

    monkeypatch.setattr(eval_args, "run_gap", lambda args: 3)
    assert main(["gap", "data.jsonl", "--model", "x", "--out", "o"]) == 3
    monkeypatch.setattr(eval_args, "run_gap", lambda args: {"n_questions": 1})  # a result means success
    assert main(["gap", "data.jsonl", "--model", "x", "--out", "o"]) == 0


def test_exit_status_reaches_the_shell():
    out = subprocess.run(
        [sys.executable, "-m", "vopd.cli", "train", "device=tpu"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "device='tpu' is not one of auto | cpu | cuda" in _one_line(out.stderr)


@pytest.mark.parametrize("fails", [False, True])
def test_a_command_destroys_the_process_group_before_exit(fails, monkeypatch, capsys):
    """A torchrun rank must not leave its gloo group to interpreter teardown: its C++ worker threads
    can then abort the process (SIGABRT, "terminate called without an active exception") after a
    run that finished, and torchrun reports the rank as failed. Success or failure, the group goes."""
    import torch

    import vopd.cli as cli
    from vopd.parallel import ensure_process_group

    ensure_process_group(torch.device("cpu"))  # what accelerate sets up for a torchrun rank
    assert torch.distributed.is_initialized()

    def command(args):
        if fails:
            raise ValueError("bad input")
        return 0

    monkeypatch.setattr(cli, "_config", command)
    assert main(["config"]) == (1 if fails else 0)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("argv, code", [(["config"], 0), (["train", "device=tpu"], 2)])
def test_a_torchrun_rank_leaves_without_teardown_and_loses_no_output(argv, code):
    """Under a launcher (WORLD_SIZE > 1) a rank ends with os._exit after its command (interpreter
    teardown could abort it, see `vopd.parallel.exit_rank`): same status, same complete output as one process."""
    import os

    runs = {}
    for world in ("1", "2"):
        env = dict(os.environ, WORLD_SIZE=world)
        runs[world] = subprocess.run(
            [sys.executable, "-m", "vopd.cli", *argv], capture_output=True, text=True, env=env, timeout=120
        )
    assert runs["1"].returncode == runs["2"].returncode == code
    assert runs["2"].stdout == runs["1"].stdout and runs["2"].stderr == runs["1"].stderr
    assert len(runs["1"].stdout) + len(runs["1"].stderr) > 0
