"""Lines that name the cause: a Ctrl-C at any moment, and counts that make no sense, refused up front.

Root cause: the CLI's `try` began after its imports (Ctrl-C in the first 0.2 s was a traceback),
and `vopd demo --n-eval 0` worked 67 s before failing in matplotlib, `--eval-every 0` ended in
ZeroDivisionError, `--steps 0` trained one step, and `vopd gap --limit -1` measured 7 of 8.
(A full disk during a checkpoint save: tests/test_run_safety.py.)
"""

from __future__ import annotations

import time

import pytest

import vopd.cli as cli


def test_ctrl_c_while_the_cli_loads_is_the_one_interrupted_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["train", "x=1"]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "vopd train: interrupted" and "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("flag", "value"), [("--steps", "0"), ("--n-eval", "0"), ("--eval-every", "0"), ("--eval-every", "-5")]
)
def test_demo_counts_are_refused_before_any_work(tmp_path, capsys, flag, value):
    start = time.monotonic()
    assert cli.main(["demo", "--out", str(tmp_path / "d"), flag, value]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert f"{flag} must be >= 1, got {value}" in err and "config error" in err
    assert not (tmp_path / "d").exists()


def test_gap_limit_below_one_is_refused(tmp_path, capsys):
    code = cli.main(["gap", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "o"), "--limit", "-1"])
    assert code == 1
    assert "limit must be >= 1, got -1" in capsys.readouterr().err


def test_gap_with_one_checkpoint_given_twice_is_refused(tmp_path, capsys):
    """It was measured twice into one folder: two points of one step in gap_over_training."""
    ckpt = tmp_path / "run" / "checkpoint-1"
    args = ["gap", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "o"), "--checkpoints", str(ckpt)]
    assert cli.main([*args, str(tmp_path / "run" / ".." / "run" / "checkpoint-1")]) == 1
    assert "is given twice" in capsys.readouterr().err


def test_ctrl_c_while_vopd_cli_itself_is_imported_is_the_one_interrupted_line():
    """The signal arrives after the script started importing vopd.cli but before `main` runs."""
    import os
    import subprocess
    import sys

    code = (
        "import os, signal, sys, time\n"
        # Ctrl-C with its default meaning, as in a terminal's foreground job: a job started in the
        # background (nohup ... &) inherits SIGINT ignored, and vopd then leaves it alone on purpose
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "sys.argv = ['/usr/bin/vopd', 'train']\n"  # what the installed `vopd` script sees
        "import vopd.cli\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"  # still before main(): the module's own handler answers
        "time.sleep(30)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "vopd: interrupted"
