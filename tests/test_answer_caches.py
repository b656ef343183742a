"""Second runs that never lie: every cache says what made it, and a mismatch is never reused.

Root cause: the answer caches of `vopd eval` / `vopd gap` were keyed only by (benchmark, view, id)
and the proposal caches by sample id, so a rerun into the same folder with another model, other
weights, another prompt template, another option shuffle or other images reported the old
answers as its own with exit 0. Each test below failed that way before the fix.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from support.fake_server import FakeChatServer
from support.synthetic import oracle_answer, write_synthetic

from vopd.evaluation import BackendConfig, EvalConfig, main_eval
from vopd.evaluation.gap import GapConfig, main_gap
from vopd.outputs import OutputError, weights_fingerprint


def _image(body):
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def good_or_bad(text, body):
    """Model 'good' answers like the oracle; any other model always says 'Z' (always wrong)."""
    return oracle_answer(_image(body), text) if body["model"].endswith("good") else "Z"


def _eval(out: Path, server, bench: dict[str, str], *, model: str = "good", **kw) -> dict:
    cfg = EvalConfig(
        benchmarks=bench,
        out_dir=str(out),
        backend=BackendConfig(kind="openai", model=model, url=server.url, retries=0),
        **kw,
    )
    return main_eval(cfg)


def _score(summary: dict) -> float:
    return summary["rows"][0]["overall"]


# ------------------------------------------------------------------------------ vopd eval --


def test_eval_with_another_model_into_the_same_folder_is_refused(tmp_path):
    """`--model bad --out D` where D holds good's answers showed good's score under bad's name."""
    bench = {"vstar": str(write_synthetic("vstar", tmp_path / "v", n=4))}
    with FakeChatServer(good_or_bad) as server:
        good = _eval(tmp_path / "o", server, bench)
        asked = len(server.requests)
        with pytest.raises(OutputError, match=r"other settings \(model: 'good' -> 'bad'\).*--overwrite"):
            _eval(tmp_path / "o", server, bench, model="bad")
        assert len(server.requests) == asked  # refused before any request
        fresh = _eval(tmp_path / "fresh", server, bench, model="bad")
        again = _eval(tmp_path / "o", server, bench, model="bad", overwrite=True)
    assert _score(good) > 0 and _score(fresh) == 0.0
    assert _score(again) == _score(fresh)  # --overwrite asked afresh, not the cache


def test_eval_rerun_with_another_prompt_template_is_refused(tmp_path):
    bench = {"hrbench_4k": str(write_synthetic("hrbench_4k", tmp_path / "h", n=2))}
    with FakeChatServer(good_or_bad) as server:
        _eval(tmp_path / "o", server, bench)
        with pytest.raises(OutputError, match=r"hrbench_4k.prompt: 'paper' -> 'letters'"):
            _eval(tmp_path / "o", server, bench, prompts={"hrbench_4k": "letters"})


def test_eval_original_vstar_layout_with_another_seed_is_refused(tmp_path):
    """The option order of V*'s original layout follows --seed: old letters, reshuffled options."""
    bench = {"vstar": str(write_synthetic("vstar_original", tmp_path / "v", n=4))}
    with FakeChatServer(good_or_bad) as server:
        _eval(tmp_path / "o", server, bench, seed=0)
        with pytest.raises(OutputError, match=r"vstar.seed: 0 -> 1"):
            _eval(tmp_path / "o", server, bench, seed=1)
        _eval(tmp_path / "o", server, bench, seed=0)  # the same settings resume


def test_eval_same_path_other_weights_is_refused(tmp_path):
    """A checkpoint retrained in place: same --model path, other weights (fingerprint)."""
    from test_eval_runner import CountingBackend

    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    bench = {"vstar": str(write_synthetic("vstar", tmp_path / "v", n=2))}
    cfg = EvalConfig(benchmarks=bench, out_dir=str(tmp_path / "o"), backend=BackendConfig(model=str(model)))
    before = weights_fingerprint(str(model))
    main_eval(cfg, backend=CountingBackend())
    (model / "model.safetensors").write_bytes(b"\1" * 4096)
    assert weights_fingerprint(str(model)) != before
    with pytest.raises(OutputError, match=r"model_weights: '[0-9a-f]+' -> '[0-9a-f]+'"):
        main_eval(cfg, backend=CountingBackend())


def test_eval_overwrite_removes_every_cache_it_owns_and_nothing_else(tmp_path):
    bench = {"vstar": str(write_synthetic("vstar", tmp_path / "v", n=2))}
    out = tmp_path / "o"
    with FakeChatServer(good_or_bad) as server:
        _eval(out, server, bench)
        (out / "notes.txt").write_text("mine")
        (out / "judge.jsonl").write_text("{}\n")  # a judge cache of the earlier run
        asked = len(server.requests)
        _eval(out, server, bench, model="bad", overwrite=True)
        assert len(server.requests) == asked + 2  # every item asked again
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "judge.jsonl").exists()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["prediction"] for r in rows} == {"Z"}


def test_eval_with_a_benchmark_named_twice_is_refused(tmp_path):
    from vopd.evaluation.cli_args import add_eval_arguments, eval_config_from_args
    from vopd.knobs import ConfigError

    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["vstar=/data/a", "vstar=/data/b", "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match=r"'vstar' is named twice \(/data/a, /data/b\)"):
        eval_config_from_args(args)


# ------------------------------------------------------------------------------- vopd gap --


def _gap(out: Path, server, data: Path, **kw) -> dict:
    backend = BackendConfig(kind="openai", model=kw.pop("model", "good"), url=server.url, retries=0)
    return main_gap(GapConfig(data=str(data), out_dir=str(out), n_boot=200, backend=backend, **kw))


def test_gap_with_another_model_or_zoom_into_the_same_folder_is_refused(tmp_path):
    data = write_synthetic("records", tmp_path / "d", n=4)
    with FakeChatServer(good_or_bad) as server:
        _gap(tmp_path / "o", server, data)
        with pytest.raises(OutputError, match=r"model: 'good' -> 'bad'"):
            _gap(tmp_path / "o", server, data, model="bad")
        from vopd.config import ViewConfig

        with pytest.raises(OutputError, match=r"view.zoom: 2.0 -> 3.0"):
            _gap(tmp_path / "o", server, data, view=ViewConfig(zoom=3.0))
        result = _gap(tmp_path / "o", server, data, model="bad", overwrite=True)
    assert result["model"] == "bad" and result["views"]["full"]["accuracy"] == 0.0


def test_gap_checkpoints_with_one_folder_name_get_one_subfolder_each(tmp_path):
    """runA/checkpoint-2 and runB/checkpoint-2 used to share one subfolder: B's result was A's."""
    data = write_synthetic("records", tmp_path / "d", n=4)
    a, b = tmp_path / "good" / "checkpoint-2", tmp_path / "bad" / "checkpoint-2"  # one last folder name

    def by_parent(text, body):
        return oracle_answer(_image(body), text) if "/good/" in body["model"] else "Z"

    with FakeChatServer(by_parent) as server:
        summary = _gap(tmp_path / "o", server, data, checkpoints=[str(a), str(b)])
    runs = {r["model"]: r for r in summary["checkpoints"]}
    assert runs[str(a)]["views"]["full"]["accuracy"] > 0
    assert runs[str(b)]["views"]["full"]["accuracy"] == 0.0
    subs = sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_dir())
    assert subs == ["gap-bad-checkpoint-2", "gap-good-checkpoint-2"]


# ------------------------------------------------------------------------- proposal caches --


def _fake_propose(monkeypatch, calls):
    import vopd.proposals as props
    from vopd.records import Box

    def propose(model, processor, samples, view_cfg, cfg):
        calls.extend(s.id for s in samples)
        return [props.Proposal(s.id, Box(0, 0, 4, 4), 1.0, cfg.source) for s in samples]

    monkeypatch.setattr(props, "propose", propose)


def _samples(root: Path, colour: str, n: int = 3):
    from vopd.records import Sample

    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = root / f"{i}.png"
        Image.new("RGB", (16, 16), colour).save(path)
        out.append(Sample(id=f"s{i}", image=str(path), question="q?", answer="a"))
    return out


def test_proposals_for_other_images_under_the_same_ids_are_refused(tmp_path, monkeypatch):
    from vopd.config import ViewConfig
    from vopd.proposals import ProposalConfig, load_or_propose

    calls: list[str] = []
    _fake_propose(monkeypatch, calls)
    cache = tmp_path / "proposals.jsonl"
    cfg = ProposalConfig(source="attention")
    load_or_propose(None, None, _samples(tmp_path / "a", "red"), ViewConfig(), cfg, cache, model_name="m")
    load_or_propose(None, None, _samples(tmp_path / "a", "red"), ViewConfig(), cfg, cache, model_name="m")
    assert len(calls) == 3  # the same images resume from the cache
    with pytest.raises(OutputError, match=r"sample 's0' was proposed otherwise \(image content: .*same id"):
        load_or_propose(None, None, _samples(tmp_path / "b", "blue"), ViewConfig(), cfg, cache, model_name="m")
    with pytest.raises(OutputError, match=r"window: 0.3333333333333333 -> 0.5"):
        load_or_propose(
            None, None, _samples(tmp_path / "a", "red"), ViewConfig(), ProposalConfig("attention", window=0.5), cache
        )


def test_proposals_of_other_weights_at_the_same_path_are_refused(tmp_path, monkeypatch):
    from vopd.config import ViewConfig
    from vopd.proposals import ProposalConfig, load_or_propose

    _fake_propose(monkeypatch, [])
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 100)
    cache, cfg, samples = tmp_path / "p.jsonl", ProposalConfig(source="search"), _samples(tmp_path / "i", "red")
    load_or_propose(None, None, samples, ViewConfig(), cfg, cache, model_name=str(model))
    (model / "model.safetensors").write_bytes(b"\1" * 100)
    with pytest.raises(OutputError, match=r"weights: "):
        load_or_propose(None, None, samples, ViewConfig(), cfg, cache, model_name=str(model))


def test_training_overwrite_removes_the_earlier_runs_proposals(tmp_path):
    """views.crop_source=attention, then --overwrite with another model.path kept the old proposals."""
    from vopd.runfolder import RunFolderError, prepare_run_folder

    (tmp_path / "proposals.jsonl").write_text('{"id": "a", "box": [0, 0, 1, 1], "score": 1, "source": "attention"}\n')
    with pytest.raises(RunFolderError, match=r"already holds a run \(proposals.jsonl\)"):
        prepare_run_folder(tmp_path, resume=False, overwrite=False)
    prepare_run_folder(tmp_path, resume=False, overwrite=True, say=lambda _: None)
    assert not (tmp_path / "proposals.jsonl").exists()


def test_a_vstar_folder_with_both_layouts_names_the_one_left_out(tmp_path):
    """The parquet wins; the original layout's JSON + images beside it were left out without a word."""
    from vopd.evaluation.benchmarks import get_benchmark

    root = tmp_path / "vstar"
    write_synthetic("vstar", root, n=3)
    write_synthetic("vstar_original", root, n=2)
    loaded = get_benchmark("vstar").load(root)
    assert len(list(loaded)) == 3
    assert any("not read (the original layout" in note for note in loaded.notes)


def test_a_first_run_that_wrote_nothing_does_not_lock_the_folder(tmp_path):
    """A typo in --model failed before any answer: the corrected rerun must not be refused."""
    from vopd.outputs import claim_output

    out = tmp_path / "o"
    claim_output(out, command="vopd eval", owned=("predictions.jsonl",), settings={"model": "typo"})
    claim_output(out, command="vopd eval", owned=("predictions.jsonl",), settings={"model": "right"})
    (out / "predictions.jsonl").write_text("{}\n")
    with pytest.raises(OutputError, match="model: 'right' -> 'other'"):
        claim_output(out, command="vopd eval", owned=("predictions.jsonl",), settings={"model": "other"})
