"""`vopd gap` end to end: fake server (known answers), checkpoints, CLI args, a tiny HF model."""

import argparse
import base64
import io
import json

import pytest
from PIL import Image
from support.fake_server import FakeChatServer
from support.synthetic import oracle_answer, write_synthetic

from vopd.evaluation import BackendConfig, HFBackend, PredictionStore
from vopd.evaluation.cli_args import add_gap_arguments, gap_config_from_args, run_gap
from vopd.evaluation.gap import (
    GapConfig,
    _eval_item,
    gap_statistics,
    load_gap_samples,
    main_gap,
    measure_gap,
    view_prompt,
)
from vopd.evaluation.stats import mcnemar_exact
from vopd.records import load_records

N = 10


def _image(body):
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def oracle(text, body):
    # "ckpt-<k>": later checkpoints see smaller details (a model whose gap closes with training)
    model = body["model"]
    min_fraction = 0.001 if model.endswith("-10") else 0.01
    return oracle_answer(_image(body), text, min_fraction=min_fraction)


def _expected_global(samples):
    """Large squares (even rows) are seen; small ones get "A", right only when A is the answer."""
    return [i % 2 == 0 or s.answer == "A" for i, s in enumerate(samples)]


@pytest.mark.slow
def test_gap_on_records_matches_hand_count(tmp_path):
    path = write_synthetic("records", tmp_path / "data", n=N)
    samples = list(load_records(path))
    right = _expected_global(samples)
    with FakeChatServer(oracle) as server:
        cfg = GapConfig(
            data=str(path),
            out_dir=str(tmp_path / "out"),
            views=("full", "crop", "boxed_full"),
            backend=BackendConfig(kind="openai", model="ckpt-0", url=server.url),
            n_boot=2000,
        )
        result = main_gap(cfg)
        assert len(server.requests) == 3 * N
        main_gap(cfg)  # rerun: everything is in predictions.jsonl
        assert len(server.requests) == 3 * N
    k = N - sum(right)
    assert result["views"]["crop"]["accuracy"] == 100.0
    assert result["views"]["full"]["accuracy"] == pytest.approx(100 * sum(right) / N)
    assert result["gap"]["value"] == pytest.approx(100 * k / N)
    assert result["gap"]["table"] == {
        "both_right": sum(right),
        "only_crop_right": k,
        "only_full_right": 0,
        "both_wrong": 0,
    }
    assert result["gap"]["mcnemar_p"] == pytest.approx(mcnemar_exact(0, k))
    lo, hi = result["gap"]["ci"]
    assert 0 <= lo <= result["gap"]["value"] <= hi
    cats = result["categories"]
    assert cats["large"]["gap"]["value"] == 0.0 and cats["small"]["views"]["crop"] == 100.0
    assert result["views"]["boxed_full"]["n"] == N and "boxed_full_minus_full" in result
    saved = json.loads((tmp_path / "out" / "gap.json").read_text())
    assert saved["gap"] == result["gap"]
    assert (tmp_path / "out" / "gap.png").read_bytes()[:4] == b"\x89PNG"


def test_gap_on_zoombench_uses_shipped_crops(tmp_path):
    path = write_synthetic("zoombench", tmp_path / "zb", n=6)
    with FakeChatServer(oracle) as server:
        cfg = GapConfig(
            data=str(path),
            benchmark="zoombench",
            out_dir=str(tmp_path / "out"),
            n_boot=500,
            backend=BackendConfig(kind="openai", model="ckpt-0", url=server.url),
        )
        result = main_gap(cfg)
    assert result["views"]["crop"]["accuracy"] == 100.0
    assert set(result["categories"]) == {"colour", "attribute"}


def test_gap_over_checkpoints(tmp_path):
    path = write_synthetic("records", tmp_path / "data", n=N)
    with FakeChatServer(oracle) as server:
        cfg = GapConfig(
            data=str(path),
            out_dir=str(tmp_path / "out"),
            n_boot=500,
            checkpoints=[str(tmp_path / "run" / "ckpt-10"), str(tmp_path / "run" / "ckpt-0")],
            backend=BackendConfig(kind="openai", model="unused", url=server.url),
        )
        summary = main_gap(cfg)
    runs = summary["checkpoints"]
    assert [r["step"] for r in runs] == [0.0, 10.0]
    assert runs[0]["gap"]["value"] > 0 and runs[1]["gap"]["value"] == 0.0
    assert (tmp_path / "out" / "gap_over_training.png").is_file()
    assert (tmp_path / "out" / "gap-ckpt-0" / "gap.json").is_file()  # gap-<folder>: never a checkpoint folder


def test_gap_cli_arguments_round_trip(tmp_path):
    path = write_synthetic("records", tmp_path / "data", n=4)
    parser = add_gap_arguments(argparse.ArgumentParser())
    with FakeChatServer(oracle) as server:
        args = parser.parse_args(
            [
                str(path),
                "--out",
                str(tmp_path / "o"),
                "--backend",
                "openai",
                "--model",
                "m",
                "--url",
                server.url,
                "--boxed-full",
                "--zoom",
                "3",
                "--n-boot",
                "300",
            ]
        )
        cfg = gap_config_from_args(args)
        assert cfg.views == ("full", "crop", "boxed_full") and cfg.view.zoom == 3.0
        assert run_gap(args) == 0
    result = json.loads((tmp_path / "o" / "gap.json").read_text())
    assert result["n_questions"] == 4


def test_gap_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="'full' and 'crop'"):
        GapConfig(data="x", out_dir=str(tmp_path), views=("crop",))
    with pytest.raises(ValueError, match="zoomed"):
        GapConfig(data="x", out_dir=str(tmp_path), views=("full", "zoomed"))


def test_gap_refuses_the_old_view_names(tmp_path):
    """`vopd gap` used global/regional/student before 0.x; one vocabulary now (full/crop/boxed_full)."""
    with pytest.raises(ValueError, match="'global' is not one of full"):
        GapConfig(data="x", out_dir=str(tmp_path), views=("global", "regional", "student"))
    with pytest.raises(ValueError, match="n_boot"):
        GapConfig(data="x", out_dir=str(tmp_path), n_boot=10)


def test_gap_needs_boxes_or_crops(tmp_path):
    path = write_synthetic("mmstar", tmp_path / "m", n=2)
    with pytest.raises(ValueError, match="no evidence boxes and no crop"):
        load_gap_samples(str(path), benchmark="mmstar")


class _Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def generate(self, items):
        self.calls += 1
        return self.inner.generate(items)


@pytest.mark.slow
def test_gap_with_tiny_hf_model(tmp_path, tiny_qwen2_vl):
    model, processor = tiny_qwen2_vl
    samples = load_gap_samples(str(write_synthetic("records", tmp_path / "data", n=4)))
    backend = _Counting(HFBackend(model, processor, max_new_tokens=4))
    cfg = GapConfig(
        data="unused", out_dir=str(tmp_path), n_boot=200, backend=BackendConfig(kind="hf", model="tiny", batch_size=4)
    )
    store = PredictionStore(tmp_path / "pred.jsonl")
    result = measure_gap(samples, backend, cfg, store=store)
    assert backend.calls == 2  # one batch per view
    for view in ("full", "crop"):
        block = result["views"][view]
        assert block["n"] + block["unjudged"] == 4
    table = result["gap"]["table"]
    assert sum(table.values()) == result["gap"]["n_paired"]
    # greedy decoding is deterministic: asking again gives the same answers
    prompt = view_prompt(_eval_item(samples[0], "gap"), "full", cfg.view)
    again = HFBackend(model, processor, max_new_tokens=4).generate([prompt])
    assert again[0] == store.answer("gap", "full", samples[0].id)
    measure_gap(samples, backend, cfg, store=PredictionStore(tmp_path / "pred.jsonl"))
    assert backend.calls == 2  # resumed: nothing asked again


def test_gap_statistics_identical_views_zero_gap():
    from vopd.evaluation.types import EvalItem, GradedItem

    items = [EvalItem("b", str(i), b"", "", "A", category="c") for i in range(6)]
    outcomes = [True, False, True, True, False, None]
    graded = [GradedItem(it, "x", o, "t") for it, o in zip(items, outcomes)]
    result = gap_statistics({"full": graded, "crop": graded}, n_boot=200)
    assert result["gap"]["value"] == 0.0 and result["gap"]["ci"] == [0.0, 0.0]
    assert result["gap"]["n_paired"] == 5 and result["views"]["full"]["unjudged"] == 1
    assert result["gap"]["mcnemar_p"] == 1.0
