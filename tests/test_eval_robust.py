"""Evaluation against misbehaving servers and damaged logs.

Every server here is a loopback server on 127.0.0.1 that stops by itself (see
:mod:`support.bad_server`); every loop in it is bounded.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import published as pub
from support.bad_server import BadServer, completion, reply, trickle
from support.fake_server import FakeChatServer
from support.synthetic import write_synthetic

from vopd.evaluation import BackendConfig, EvalConfig, JudgeConfig, PredictionStore, main_eval, predict
from vopd.evaluation.backends import BackendError, OpenAIBackend, chat_completion
from vopd.evaluation.benchmarks import get_benchmark

pytest.importorskip("pyarrow")

SECRET = "sk-test-TOPSECRET0123456789"


def _mmstar(tmp_path, n=4):
    colours = ["red", "green", "blue", "yellow"]
    return pub.write_mmstar_snapshot(tmp_path / "MMStar", [(colours[i % 4], colours, "ABCD"[i % 4]) for i in range(n)])


def test_a_trickling_server_cannot_defeat_the_timeout():
    # one byte every 0.5 s: every single read returns in time, the whole reply never does
    with BadServer(trickle) as server:
        start = time.monotonic()
        with pytest.raises(BackendError, match="no complete reply within 1 s"):
            chat_completion(server.url, {"model": "m"}, api_key=None, timeout_s=1.0, retries=0)
        elapsed = time.monotonic() - start
    assert elapsed < 5.0  # the trickle alone would take 20 s; the deadline is per request, wall-clock


def _cut_or_answer(request):
    text = json.dumps(request.json())
    if "CUT" in text:  # announce 400 bytes, send 20, hang up
        request.send(reply(200, json.dumps(completion("B")).encode()[:20], length=400))
    else:
        request.send(reply(200, completion("A")))


def test_a_truncated_body_fails_only_its_item(tmp_path):
    items = get_benchmark("mmstar").load(_mmstar(tmp_path, 3))
    items[1].prompt = "CUT " + items[1].prompt
    store = PredictionStore(tmp_path / "predictions.jsonl")
    with BadServer(_cut_or_answer) as server:
        backend = OpenAIBackend(
            BackendConfig(
                kind="openai", model="m", url=server.url, retries=1, backoff_s=0.01, concurrency=3, timeout_s=5
            )
        )
        answers = predict(items, backend, store, batch_size=3)
    assert [answers[it.key] for it in items] == ["A", None, "A"]
    error = store.get("mmstar", "default", items[1].key)["error"]
    assert "IncompleteRead" in error and "after 2 attempts" in error


def _echo_key_401(request):
    request.send(
        reply(401, {"error": {"message": f"Incorrect API key provided: {request.headers.get('authorization')}"}})
    )


def _echo_key_400(request):
    request.send(reply(400, {"error": f"bad request from {request.headers.get('authorization')}"}))


@pytest.mark.parametrize("behaviour", [_echo_key_401, _echo_key_400])
def test_no_key_and_no_key_echoing_body_is_stored(tmp_path, monkeypatch, behaviour):
    monkeypatch.setenv("VOPD_TEST_EVAL_KEY", SECRET)
    out = tmp_path / "out"
    with BadServer(behaviour) as server:
        cfg = EvalConfig(
            benchmarks={"mmstar": str(_mmstar(tmp_path, 2))},
            out_dir=str(out),
            backend=BackendConfig(
                kind="openai", model="m", url=server.url, retries=0, api_key_env="VOPD_TEST_EVAL_KEY"
            ),
        )
        summary = main_eval(cfg)
        assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"  # the key was sent
    assert summary["failures"] == 2
    for file in out.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert SECRET.encode() not in data and b"TOPSECRET" not in data, file
            # the variable's name is not written either (see runner._settings: a pasted key lands there)
            assert b"VOPD_TEST_EVAL_KEY" not in data, file
    assert summary["settings"]["backend"]["api_key"] == "set"
    errors = [json.loads(line)["error"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(("HTTP 401" in e or "HTTP 400" in e) for e in errors)


def test_a_judge_that_echoes_the_key_is_redacted_too(tmp_path, monkeypatch):
    monkeypatch.setenv("VOPD_TEST_JUDGE_KEY", SECRET)
    path = write_synthetic("visualprobe", tmp_path / "vp", n=3)
    out = tmp_path / "out"
    with FakeChatServer(lambda t, b: "hmm, something else") as model, BadServer(_echo_key_400) as judge:
        cfg = EvalConfig(
            benchmarks={"visualprobe": str(path)},
            out_dir=str(out),
            backend=BackendConfig(kind="openai", model="m", url=model.url, retries=0),
            judge=JudgeConfig(url=judge.url, model="j", retries=0, api_key_env="VOPD_TEST_JUDGE_KEY"),
        )
        summary = main_eval(cfg)
    assert summary["rows"][0]["judge_failed"] == 3 and summary["rows"][0]["overall"] == 0.0
    log = (out / "judge.jsonl").read_text()
    assert "HTTP 400" in log and SECRET not in log and "TOPSECRET" not in log


def test_a_key_pasted_as_the_variable_name_is_refused_without_echo():
    with pytest.raises(ValueError, match="NAME of an environment variable") as info:
        BackendConfig(kind="openai", model="m", api_key_env=SECRET)
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        JudgeConfig(url="http://127.0.0.1:1/v1", model="j", api_key_env="Bearer xyz")


def test_credentials_in_the_url_are_not_written(tmp_path):
    with FakeChatServer(lambda t, b: "A") as server:
        url = server.url.replace("http://", "http://user:pw-secret@")
        summary = main_eval(
            EvalConfig(
                benchmarks={"mmstar": str(_mmstar(tmp_path, 1))},
                out_dir=str(tmp_path / "o"),
                backend=BackendConfig(kind="openai", model="m", url=url),
            )
        )
    assert "pw-secret" not in (tmp_path / "o" / "summary.json").read_text()
    assert summary["settings"]["backend"]["url"] == server.url


def test_malformed_prediction_lines_are_skipped_with_a_warning_on_resume(tmp_path, caplog):
    root = _mmstar(tmp_path, 4)
    out = tmp_path / "out"
    items = get_benchmark("mmstar").load(root)

    def run(server: FakeChatServer) -> dict:
        backend = BackendConfig(kind="openai", model="m", url=server.url)
        return main_eval(EvalConfig(benchmarks={"mmstar": str(root)}, out_dir=str(out), backend=backend))

    # A first run makes the folder vopd eval's own (a folder it did not write is refused); then its
    # predictions file is damaged as a kill mid-write or a hand edit would leave it.
    with FakeChatServer(lambda t, b: "A") as server:
        run(server)
    good = {"benchmark": "mmstar", "view": "default", "id": items[0].key, "prediction": "A", "error": None}
    lines = [
        "{}",
        "[1, 2]",
        json.dumps({"benchmark": "mmstar"}),
        "not json at all",
        json.dumps(good),
        json.dumps({**good, "id": items[1].key, "prediction": 7}),
        '{"benchmark": "mmstar", "vi',
    ]
    (out / "predictions.jsonl").write_text("\n".join(lines))  # the last line half-written, no newline
    with caplog.at_level(logging.WARNING), FakeChatServer(lambda t, b: "A") as server:
        summary = run(server)
        assert len(server.requests) == 3  # item 0 was answered; item 1's prediction was not text
    assert summary["rows"][0]["n"] == 4 and summary["failures"] == 0
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "predictions.jsonl:1: line skipped" in warned and "predictions.jsonl:4: unreadable" in warned
    assert "predictions.jsonl:7: unreadable" in warned
    store = PredictionStore(out / "predictions.jsonl")  # the half line was closed: appends stayed separate
    assert all(store.answer("mmstar", "default", it.key) == "A" for it in items)


def test_a_malformed_judge_log_line_is_skipped(tmp_path):
    from vopd.evaluation.judge import LLMJudge

    log = tmp_path / "judge.jsonl"
    log.write_text('{}\n{"key": "k", "correct": "maybe", "reply": "x"}\n[]\n')
    judge = LLMJudge(JudgeConfig(url="http://127.0.0.1:9/v1", model="j"), log)
    assert judge._cache == {}  # nothing usable, nothing crashed


NO_TORCH_SCRIPT = r"""
import json, sys
from vopd.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "accelerate", "vopd.models") if m in sys.modules)
print(json.dumps({"rc": rc, "heavy": heavy}))
"""


def test_vopd_eval_with_a_server_imports_no_torch(tmp_path):
    root = _mmstar(tmp_path, 2)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    with FakeChatServer(lambda t, b: "A") as server:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                NO_TORCH_SCRIPT,
                "eval",
                f"mmstar={root}",
                "--out",
                str(tmp_path / "o"),
                "--backend",
                "openai",
                "--model",
                "m",
                "--url",
                server.url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": []}


def test_an_unreadable_image_fails_its_item_only(tmp_path):
    items = get_benchmark("mmstar").load(_mmstar(tmp_path, 3))
    items[0].image = b"not an image"
    store = PredictionStore(tmp_path / "p.jsonl")
    with FakeChatServer(lambda t, b: "A") as server:
        backend = OpenAIBackend(BackendConfig(kind="openai", model="m", url=server.url))
        answers = predict(items, backend, store, batch_size=3)
        assert len(server.requests) == 2
    assert [answers[it.key] for it in items] == [None, "A", "A"]
    assert "mmstar item" in store.get("mmstar", "default", items[0].key)["error"]


def test_vopd_eval_exit_status_through_the_cli(tmp_path, capsys):
    from vopd.cli import main

    root = _mmstar(tmp_path, 2)
    with FakeChatServer(lambda t, b: 500) as server:  # every request fails
        argv = [
            "eval",
            f"mmstar={root}",
            "--out",
            str(tmp_path / "o"),
            "--backend",
            "openai",
            "--model",
            "m",
            "--url",
            server.url,
            "--retries",
            "0",
        ]
        assert main(argv) == 3
        assert main(argv + ["--allow-failures"]) == 0
    assert (
        main(
            [
                "eval",
                f"mmstar={tmp_path / 'missing'}",
                "--out",
                str(tmp_path / "o2"),
                "--backend",
                "openai",
                "--model",
                "m",
            ]
        )
        != 0
    )
    err = capsys.readouterr().err
    assert "2 items failed" in err and "missing" in err and "Traceback" not in err


def test_unparsed_replies_are_wrong_and_counted(tmp_path):
    from vopd.evaluation.runner import grade_items

    items = get_benchmark("mmstar").load(_mmstar(tmp_path, 3))
    preds = {items[0].key: "A", items[1].key: "I would rather not say", items[2].key: None}
    graded = grade_items(items, preds)
    assert [(g.correct, g.status) for g in graded] == [(True, "graded"), (False, "unparsed"), (None, "failed")]
    scores = get_benchmark("mmstar").score(graded)
    assert (scores["overall"], scores["judged_overall"]) == (pytest.approx(100 / 3), 50.0)
