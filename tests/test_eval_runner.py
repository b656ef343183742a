"""End to end `vopd eval` through a fake OpenAI-compatible server; resume; judge."""

import base64
import io
import json

import pytest
from PIL import Image
from support.fake_server import FakeChatServer
from support.synthetic import oracle_answer, write_synthetic

from vopd.evaluation import BackendConfig, EvalConfig, JudgeConfig, LLMJudge, PredictionStore, main_eval, predict
from vopd.evaluation.backends import OpenAIBackend, PartialFailure
from vopd.evaluation.benchmarks import BENCHMARKS, get_benchmark
from vopd.evaluation.runner import grade_items
from vopd.evaluation.types import PromptItem


def oracle(text, body):
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return oracle_answer(image, text)


class CountingBackend:
    """Answers with the oracle; raises KeyboardInterrupt after `stop_after` calls (an interrupted run)."""

    def __init__(self, stop_after=None):
        self.calls = 0
        self.items = 0
        self.stop_after = stop_after

    def generate(self, items):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.items += len(items)
        return [oracle_answer(i.image, i.text) for i in items]


@pytest.mark.slow
def test_eval_all_benchmarks_through_fake_server(tmp_path):
    benches = {name: str(write_synthetic(name, tmp_path / name, n=6)) for name in BENCHMARKS}
    with FakeChatServer(oracle) as server:
        cfg = EvalConfig(
            benchmarks=benches,
            out_dir=str(tmp_path / "out"),
            backend=BackendConfig(kind="openai", model="fake", url=server.url, batch_size=8),
        )
        summary = main_eval(cfg)
        asked = len(server.requests)
    rows = {r["benchmark"]: r for r in summary["rows"]}
    # the oracle sees the 3 large squares; small ones get "A", right when A is the answer
    for name in ("vstar", "mme_rw_en", "mmstar", "zoombench"):
        items = get_benchmark(name).load(benches[name])
        expected = sum(i % 2 == 0 or it.answer == "A" for i, it in enumerate(items)) / len(items) * 100
        assert rows[name]["overall"] == pytest.approx(expected), name
    assert rows["zoombench_crop"]["overall"] == 100.0
    assert asked == sum(len(get_benchmark(n).load(p)) for n, p in benches.items())
    avg = summary["paper_average"]["value"]
    parts = [rows[b]["overall"] for b in summary["paper_average"]["benchmarks"]]
    assert avg == pytest.approx(sum(parts) / 6)
    out = tmp_path / "out"
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Paper 6-benchmark average" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["rows"][0]["benchmark"] == "vstar"


def test_interrupted_run_resumes_without_reasking(tmp_path):
    items = get_benchmark("hrbench_4k").load(write_synthetic("hrbench_4k", tmp_path, n=5))  # 20 rows
    store_path = tmp_path / "pred.jsonl"
    first = CountingBackend(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        predict(items, first, PredictionStore(store_path), batch_size=4)
    assert first.items == 8
    # a crash mid-write leaves half a line: it is dropped and that item asked again
    with store_path.open("a") as f:
        f.write('{"benchmark": "hrbench_4k", "vie')
    second = CountingBackend()
    preds = predict(items, second, PredictionStore(store_path), batch_size=4)
    assert second.items == 12 and all(p is not None for p in preds.values())
    third = CountingBackend()
    predict(items, third, PredictionStore(store_path), batch_size=4)
    assert third.calls == 0


def test_server_errors_are_retried_on_rerun(tmp_path):
    items = get_benchmark("vstar").load(write_synthetic("vstar", tmp_path, n=4))
    store = PredictionStore(tmp_path / "pred.jsonl")
    # the first 2 requests fail with HTTP 500 and no retries: two items fail this run
    with FakeChatServer(oracle, fail_first=2) as server:
        backend = OpenAIBackend(BackendConfig(kind="openai", model="m", url=server.url, retries=0, concurrency=1))
        preds = predict(items, backend, store, batch_size=4)
        assert sum(p is None for p in preds.values()) == 2
        preds = predict(items, backend, PredictionStore(tmp_path / "pred.jsonl"), batch_size=4)
        assert len(server.requests) == 6 and all(p is not None for p in preds.values())
    rec = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert sum(r["error"] is not None for r in rec) == 2 and "HTTP 500" in rec[0]["error"]


def test_backend_retries_transient_errors():
    with FakeChatServer(lambda t, b: "B", fail_first=2) as server:
        backend = OpenAIBackend(
            BackendConfig(kind="openai", model="m", url=server.url, retries=2, concurrency=1, backoff_s=0.01)
        )
        assert backend.generate([PromptItem("1", Image.new("RGB", (4, 4)), "q")]) == ["B"]
    with FakeChatServer(lambda t, b: "B", fail_first=5) as server:
        backend = OpenAIBackend(BackendConfig(kind="openai", model="m", url=server.url, retries=0, concurrency=2))
        with pytest.raises(PartialFailure) as info:
            backend.generate([PromptItem(str(i), Image.new("RGB", (4, 4)), "q") for i in range(3)])
        assert info.value.results == [None, None, None]


def _judge_reply(text, body):
    response = text.split("Model response: ", 1)[1].split("\n", 1)[0]
    reference = text.split("Reference answer: ", 1)[1].split("\n", 1)[0]
    if "crash" in response:
        return "Let me think about it."  # out of format
    return "**Yes.**" if reference in response else "no"


def test_judge_settles_only_what_rules_cannot(tmp_path):
    items = get_benchmark("visualprobe").load(write_synthetic("visualprobe", tmp_path, n=4))
    colours = {it.key: it.answer for it in items}
    ids = list(colours)
    preds = {
        ids[0]: colours[ids[0]],  # exact: rules settle, no judge call
        ids[1]: f"I believe it is {colours[ids[1]]}-ish",  # judge: yes
        ids[2]: "crash",  # judge out of format -> unjudged
        ids[3]: None,
    }  # no prediction -> unjudged
    with FakeChatServer(_judge_reply) as server:
        judge = LLMJudge(JudgeConfig(url=server.url, model="j", retries=0), tmp_path / "judge.jsonl")
        graded = grade_items(items, preds, judge=judge)
        assert len(server.requests) == 2
        by_id = {g.item.key: g for g in graded}
        assert (by_id[ids[0]].correct, by_id[ids[0]].method) == (True, "exact")
        assert (by_id[ids[1]].correct, by_id[ids[1]].method) == (True, "judge")
        assert (by_id[ids[2]].correct, by_id[ids[2]].method, by_id[ids[2]].status) == (None, "unjudged", "judge_failed")
        assert (by_id[ids[3]].correct, by_id[ids[3]].method, by_id[ids[3]].status) == (None, "no_prediction", "failed")
        # rerun: the settled verdict is cached, the out-of-format one asked again
        grade_items(items, preds, judge=LLMJudge(judge.cfg, tmp_path / "judge.jsonl"))
        assert len(server.requests) == 3
    log = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert all("Reference answer:" in r["prompt"] for r in log)
    assert [r["correct"] for r in log] == [True, None, None] or [r["correct"] for r in log] == [None, True, None]


def test_judge_down_leaves_items_unjudged(tmp_path):
    items = get_benchmark("visualprobe").load(write_synthetic("visualprobe", tmp_path, n=2))
    with FakeChatServer(lambda t, b: "Yes", fail_first=100) as server:
        judge = LLMJudge(JudgeConfig(url=server.url, model="j", retries=1, backoff_s=0.01), tmp_path / "judge.jsonl")
        graded = grade_items(items, {it.key: "something else" for it in items}, judge=judge)
    assert [g.correct for g in graded] == [None, None]
    assert [g.status for g in graded] == ["judge_failed", "judge_failed"]
    score = get_benchmark("visualprobe").score(graded)
    # a failed judgement is wrong in the headline (as in the official scripts), absent from judged-only
    assert score["unjudged"] == 2 and score["n"] == 2 and score["overall"] == 0.0
    assert score["judged_overall"] is None


@pytest.mark.slow
def test_eval_every_format_with_tiny_hf_model(tmp_path, tiny_qwen2_vl):
    from vopd.evaluation import HFBackend

    model, processor = tiny_qwen2_vl
    benches = {name: str(write_synthetic(name, tmp_path / name, n=2)) for name in BENCHMARKS}
    cfg = EvalConfig(
        benchmarks=benches,
        out_dir=str(tmp_path / "out"),
        label="tiny",
        backend=BackendConfig(kind="hf", model="tiny", batch_size=8, max_new_tokens=3),
    )
    summary = main_eval(cfg, backend=HFBackend(model, processor, max_new_tokens=3))
    assert [r["benchmark"] for r in summary["rows"]] == list(BENCHMARKS)
    graded = [json.loads(line) for line in (tmp_path / "out" / "graded" / "hrbench_4k.jsonl").read_text().splitlines()]
    assert len(graded) == 8 and all(g["prediction"] is not None for g in graded)
    counting = CountingBackend()
    main_eval(cfg, backend=counting)  # everything answered already
    assert counting.calls == 0


def test_eval_cli_arguments(tmp_path):
    import argparse

    from vopd.evaluation.cli_args import add_eval_arguments, eval_config_from_args, run_eval

    path = write_synthetic("vstar", tmp_path / "v", n=2)
    parser = add_eval_arguments(argparse.ArgumentParser())
    with FakeChatServer(oracle) as server:
        args = parser.parse_args(
            [
                f"vstar={path}",
                "--out",
                str(tmp_path / "o"),
                "--backend",
                "openai",
                "--model",
                "m",
                "--url",
                server.url,
                "--no-thinking",
                "--limit",
                "1",
            ]
        )
        cfg = eval_config_from_args(args)
        assert cfg.backend.thinking is False and cfg.limit == 1 and cfg.judge is None
        assert run_eval(args) == 0
        assert server.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}
        assert server.requests[0]["temperature"] == 0.0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["rows"][0]["n"] == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["vstar", "--out", "o"])  # NAME=PATH required
    with pytest.raises(KeyError, match="unknown benchmark"):
        EvalConfig(benchmarks={"nope": "x"}, out_dir=str(tmp_path))


def test_vopd_eval_with_an_unknown_benchmark_is_one_input_line_not_an_unexpected_error(tmp_path, capsys):
    from vopd.cli import main

    assert main(["eval", "nope=x", "--model", "tiny:qwen2_vl", "--out", str(tmp_path / "o")]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("vopd eval: invalid input: unknown benchmark 'nope'; choose from ["), line
    assert "unexpected" not in line and "--debug" not in line.split("->")[0]


def test_vopd_eval_and_gap_without_a_model_name_the_flag(tmp_path, capsys):
    """Was 'the hf backend needs a model path or hub id (BackendConfig.model)': no flag named."""
    from vopd.cli import main

    bench = write_synthetic("vstar", tmp_path / "v", n=2)
    assert main(["eval", f"vstar={bench}", "--out", str(tmp_path / "o")]) == 1
    assert "pass --model PATH_OR_HUB_ID" in capsys.readouterr().err
    assert (
        main(
            ["eval", f"vstar={bench}", "--backend", "openai", "--url", "http://127.0.0.1:9/v1"]
            + ["--out", str(tmp_path / "p")]
        )
        == 1
    )
    assert "pass --model NAME" in capsys.readouterr().err
