"""Bounded waits, prompt stops, no orphans: the vLLM rollout engine against servers that misbehave.

Root cause: the engine waited 600 s per request and 600 s for a server to start, its requests ran
on pool threads a stopping run had to join, a signal only set a flag checked after the step (so
SIGTERM did not stop a run waiting on a silent server), a server vopd started outlived a killed
vopd, and a URL that was no OpenAI/vLLM server failed with a JSON or KeyError line. Every server
here is a loopback socket that stops by itself (tests/support/bad_server.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.bad_server import BadServer, reply

from vopd.config import load_config
from vopd.rollout_vllm import VLLMServerEngine


def silent(request) -> None:
    """Accept, read the request, never answer (bounded: gives up after 20 s)."""
    time.sleep(20)


def _engine(tmp_path: Path, url: str, **kw) -> VLLMServerEngine:
    return VLLMServerEngine(None, work_dir=tmp_path, url=url.removesuffix("/v1"), **kw)


BODY = {"model": "vopd-policy", "n": 1}
PROMPT = ([1, 2], "text", "data:image/png;base64,")


def test_a_server_that_never_answers_fails_the_request_within_its_timeout(tmp_path):
    with BadServer(silent, lifetime_s=25) as server:
        engine = _engine(tmp_path, server.url, request_timeout=1.0)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"no reply within 1 s \(rollout.vllm_request_timeout\)"):
            engine._request(BODY, PROMPT, 0)
        assert time.monotonic() - start < 5


def test_the_request_timeout_scales_with_max_new_tokens_and_is_a_knob():
    short = load_config(None, ["rollout.max_new_tokens=16"]).rollout
    long = load_config(None, ["rollout.max_new_tokens=2048"]).rollout
    assert short.request_timeout() < long.request_timeout() <= 300
    assert load_config(None, ["rollout.vllm_request_timeout=7"]).rollout.request_timeout() == 7
    assert load_config(None, []).rollout.vllm_start_timeout <= 300


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (reply(200, b"<html><body>Welcome to nginx</body></html>"), r"answered something that is not JSON \('<html>"),
        (reply(200, {}), r"answered without 'choices' \(empty\): not an OpenAI/vLLM chat-completions server"),
        (reply(200, {"detail": "hi"}), r"without 'choices' \(detail\)"),
    ],
)
def test_a_url_that_is_not_an_openai_server_is_named_in_one_line(tmp_path, answer, said):
    with BadServer(lambda r: r.send(answer), lifetime_s=10) as server:
        engine = _engine(tmp_path, server.url, request_timeout=5.0)
        with pytest.raises(RuntimeError, match=said) as err:
            engine._request(BODY, PROMPT, 0)
    assert "\n" not in str(err.value) and "rollout.vllm_url" in str(err.value)


def test_requests_wait_interruptibly_on_daemon_threads(tmp_path):
    """While replies are awaited the engine says it only waits, and a stopping run joins no thread."""
    seen: list[bool] = []

    def answer_late(request):
        seen.append(engine.interruptible)
        time.sleep(0.3)
        request.send(reply(200, {"choices": []}))

    with BadServer(answer_late, lifetime_s=10) as server:
        engine = _engine(tmp_path, server.url, request_timeout=5.0)
        out = engine._map(lambda a: engine._request(BODY, PROMPT, a), [0, 1, 2])
    assert out == [([], [])] * 3 and seen == [True] * 3 and engine.interruptible is False


def test_a_signal_while_waiting_stops_the_run_at_once_and_keeps_the_finished_steps(tmp_path, capsys):
    """SIGTERM mid-request used to print 'finishing this step' and wait up to 600 s for the reply."""
    from vopd.checkpoint import check_checkpoint
    from vopd.trainer import train

    cfg = load_config(
        None,
        [
            "model.path=tiny:qwen2_vl",
            "data.train=toyworld:16:0",
            "rollout.n=2",
            "rollout.max_new_tokens=4",
            "prompts_per_step=2",
            "micro_batch_prompts=2",
            "report_to=[jsonl]",
            "threads=1",
            "max_steps=5",
            "save_every=0",
            f"output_dir={tmp_path}",
        ],
    )

    def stuck_at_step_2(state):  # step 2 done; the next step "waits on a server" that never answers
        if state.step == 2:
            state.engine.interruptible = True
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler must interrupt this
        return {}

    start = time.monotonic()
    result = train(cfg, callbacks=[stuck_at_step_2])
    assert time.monotonic() - start < 25
    assert result.interrupted and result.steps == 2
    check_checkpoint(tmp_path / "checkpoint-2")
    out = capsys.readouterr().out
    assert "abandoning the step in flight" in out and "stopping at step 2: signal 15" in out


def test_a_server_that_never_starts_is_stopped_after_the_start_timeout(tmp_path, tiny_qwen2_vl):
    model, processor = tiny_qwen2_vl
    fake = tmp_path / "python"
    pid_file = tmp_path / "server.pid"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    fake.chmod(0o755)
    engine = VLLMServerEngine(processor, work_dir=tmp_path / "w", python=str(fake), startup_timeout=2.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"not healthy after 2 s \(rollout.vllm_start_timeout"):
        engine.start(model)
    assert time.monotonic() - start < 15
    pid = int(pid_file.read_text())
    assert engine.process is None and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as stopped
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ", 1)[1].startswith("Z"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_server_vopd_started_dies_with_a_killed_vopd(tmp_path):
    """After SIGKILL of vopd the server it started was left running as an orphan."""
    code = (
        "import subprocess, time\n"
        "from vopd.rollout_vllm import _die_with_parent\n"
        "p = subprocess.Popen(['sleep', '60'], start_new_session=True, preexec_fn=_die_with_parent)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        parent.kill()
