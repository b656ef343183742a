"""Crops proposed by the model itself: candidate windows, quality against gold boxes,
and training that never reads a gold box (views.crop_source=search|attention)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import vopd.proposals as proposals_mod
from vopd.config import ViewConfig, load_config
from vopd.knobs import ConfigError
from vopd.proposals import (
    Proposal,
    ProposalConfig,
    attention_proposals,
    candidate_windows,
    crops_from_model,
    proposal_quality,
    search_proposals,
    surest,
    with_proposed_boxes,
)
from vopd.records import Box, write_records
from vopd.toyworld.scenes import TOY_VIEW, make_dataset


def test_candidate_windows_cover_and_contain_every_small_object():
    windows = candidate_windows((168, 168))
    assert len(windows) == 25 and all(w.width == 56 and w.height == 56 for w in windows)
    assert max(w.x2 for w in windows) == 168 and max(w.y2 for w in windows) == 168
    rng = np.random.default_rng(0)
    for _ in range(200):  # any object up to half a window wide lies wholly inside some window
        side = int(rng.integers(1, 29))
        x, y = (int(v) for v in rng.integers(0, 168 - side + 1, size=2))
        obj = Box(x, y, x + side, y + side)
        assert any(proposals_mod._contains(w, obj) for w in windows), obj
    odd = candidate_windows((200, 90), window=0.5, stride=0.5)
    assert {(w.width, w.height) for w in odd} == {(45, 45)} and max(w.x2 for w in odd) == 200


def test_centred_window_stays_inside_the_image():
    assert proposals_mod._centred_window((168, 168), 84, 84, 1 / 3) == Box(56, 56, 112, 112)
    assert proposals_mod._centred_window((168, 168), 5, 160, 1 / 3) == Box(0, 112, 56, 168)


def test_proposal_config_rejects_bad_values():
    with pytest.raises(ValueError, match="proposal source"):
        ProposalConfig(source="box")
    with pytest.raises(ValueError, match="window"):
        ProposalConfig(window=0)
    with pytest.raises(ValueError, match="crop_source"):
        ViewConfig(crop_source="detector")
    with pytest.raises(ConfigError):
        load_config(None, ["views.crop_source=boxes"])


def test_quality_against_gold_boxes():
    samples = make_dataset(4, 3)
    exact = [Proposal(s.id, s.boxes[0], 0.0, "search") for s in samples]
    q = proposal_quality(exact, samples, TOY_VIEW)
    assert q == {"n": 4, "hit_rate": 1.0, "centre_hit_rate": 1.0, "mean_iou": pytest.approx(1.0)}
    # A corner window far from every target: no hit; the boxless sample is not counted.
    far = []
    for s in samples:
        b = s.boxes[0]
        corner = Box(0, 0, 56, 56) if b.x1 > 84 or b.y1 > 84 else Box(112, 112, 168, 168)
        far.append(Proposal(s.id, corner, 0.0, "search"))
    blind = [*samples[:3], dataclasses.replace(samples[3], boxes=[])]
    q = proposal_quality(far, blind, TOY_VIEW)
    assert q["n"] == 3 and q["hit_rate"] == 0.0 and q["mean_iou"] < 0.3


def test_with_proposed_boxes_replaces_gold_and_crops():
    samples = make_dataset(2, 3)
    props = [Proposal(s.id, Box(0, 0, 56, 56), 0.0, "search") for s in samples]
    out = with_proposed_boxes([dataclasses.replace(s, teacher_image=s.image) for s in samples], props)
    assert [o.boxes for o in out] == [[Box(0, 0, 56, 56)]] * 2 and all(o.teacher_image is None for o in out)
    with pytest.raises(ValueError, match="no proposal"):
        with_proposed_boxes(samples, props[:1])


def test_crops_from_model_never_shows_gold_boxes_and_resumes(tmp_path, monkeypatch):
    samples = make_dataset(5, 4)
    seen: list = []

    def spy(model, processor, blind, view_cfg, cfg):
        seen.extend(blind)
        return [Proposal(s.id, Box(28, 28, 84, 84), -0.5, "search") for s in blind]

    monkeypatch.setattr(proposals_mod, "search_proposals", spy)
    view = dataclasses.replace(TOY_VIEW, crop_source="search")
    out = crops_from_model(samples[:3], view, None, None, tmp_path)
    assert seen and all(s.boxes == [] and s.teacher_image is None for s in seen)
    assert all(o.boxes == [Box(28, 28, 84, 84)] for o in out)
    rows = [json.loads(line) for line in (tmp_path / "proposals.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in samples[:3]]
    seen.clear()
    out = crops_from_model(samples, view, None, None, tmp_path)  # resume: only the two new samples
    assert [s.id for s in seen] == [s.id for s in samples[3:]] and len(out) == 5


def test_peak_margin_compares_the_peak_with_the_strongest_cell_outside_the_window():
    ratio = torch.zeros(6, 6) + 0.5
    ratio[2, 2], ratio[2, 3], ratio[5, 5] = 8.0, 7.0, 2.0  # (2, 3) is inside the window, (5, 5) is not
    window = proposals_mod._centred_window((168, 168), 2.5 * 28, 2.5 * 28, 1 / 3)
    assert proposals_mod._peak_margin(ratio, window, (168, 168)) == pytest.approx(8.0 / 2.0)
    whole = Box(0, 0, 168, 168)  # nothing outside: no competitor
    assert proposals_mod._peak_margin(ratio, whole, (168, 168)) == 1.0


def test_surest_keeps_the_highest_scores_in_input_order_and_fallbacks_last():
    box = Box(0, 0, 8, 8)
    props = [
        Proposal("a", box, 0.1, "grounding"),
        Proposal("b", box, 5.0, "grounding", "unparsed"),
        Proposal("c", box, 0.9, "grounding"),
        Proposal("d", box, 0.9, "grounding", "repaired"),
        Proposal("e", box, -1.0, "grounding"),
    ]
    assert [p.sample_id for p in surest(props, 0.4)] == ["c", "d"]  # tie on 0.9: input order
    assert [p.sample_id for p in surest(props, 0.8)] == ["a", "c", "d", "e"]  # the unparsed one goes first
    assert [p.sample_id for p in surest(props, 0.01)] == ["c"]  # at least one
    assert surest([], 0.5) == []
    with pytest.raises(ValueError, match="keep"):
        surest(props, 0)


def test_crops_from_model_keeps_the_surest_fraction(tmp_path, monkeypatch, capsys):
    samples = make_dataset(10, 4)

    def scored(model, processor, blind, view_cfg, cfg):
        return [Proposal(s.id, Box(28, 28, 84, 84), float(i % 5), "attention") for i, s in enumerate(blind)]

    monkeypatch.setattr(proposals_mod, "attention_proposals", scored)
    view = dataclasses.replace(TOY_VIEW, crop_source="attention", proposal_keep=0.2)
    out = crops_from_model(samples, view, None, None, tmp_path)
    assert [s.id for s in out] == [samples[4].id, samples[9].id]  # score 4.0, the highest
    assert "training on the 2 of 10 samples" in capsys.readouterr().out
    rows = (tmp_path / "proposals.jsonl").read_text().splitlines()
    assert len(rows) == 10  # every proposal is cached; the choice is remade from the scores on resume
    with pytest.raises(ConfigError, match="views.proposal_keep"):
        load_config(None, ["views.proposal_keep=0"])


@pytest.mark.slow
def test_search_and_attention_propose_candidate_windows(tiny_qwen2_vl):
    model, processor = tiny_qwen2_vl
    attn_before, training_before = model.config._attn_implementation, model.training
    samples = make_dataset(2, 5)
    windows = candidate_windows((168, 168))
    cfg = ProposalConfig(source="search", max_new_tokens=3)
    for fn in (search_proposals, attention_proposals):
        props = fn(model, processor, samples, TOY_VIEW, dataclasses.replace(cfg, source=fn.__name__.split("_")[0]))
        assert [p.sample_id for p in props] == [s.id for s in samples]
        assert all(np.isfinite(p.score) and (p.box.width, p.box.height) == (56, 56) for p in props)
        assert all(p.box.x1 >= 0 and p.box.y1 >= 0 and p.box.x2 <= 168 and p.box.y2 <= 168 for p in props)
        if fn is search_proposals:
            assert all(p.box in windows for p in props)
    # attention switched the model to eager attention and eval mode for the call only
    assert (model.config._attn_implementation, model.training) == (attn_before, training_before)


@pytest.mark.slow
def test_training_on_records_without_boxes(tmp_path):
    """crop_source=search trains on a record file that has no box at all (box would fail)."""
    from vopd.records import RecordError
    from vopd.trainer import train

    records = write_records([dataclasses.replace(s, boxes=[]) for s in make_dataset(4, 0)], tmp_path / "d" / "r.jsonl")
    assert all(
        "boxes" not in json.loads(line) or not json.loads(line)["boxes"] for line in records.read_text().splitlines()
    )
    base = [
        "model.path=tiny:qwen2_vl",
        f"data.train={records}",
        "rollout.n=1",
        "rollout.max_new_tokens=2",
        "loss.top_k=8",
        "prompts_per_step=2",
        "micro_batch_prompts=2",
        "max_steps=1",
        "threads=1",
        "report_to=[jsonl]",
        "views.context=0.0",
    ]
    res = train(load_config(None, [*base, "views.crop_source=search", f"output_dir={tmp_path / 'run'}"]))
    assert res.steps == 1
    rows = (tmp_path / "run" / "proposals.jsonl").read_text().splitlines()
    assert len(rows) == 4 and all(json.loads(r)["source"] == "search" for r in rows)
    with pytest.raises(RecordError, match="no evidence boxes"):
        train(load_config(None, [*base, f"output_dir={tmp_path / 'box'}"]))


@pytest.mark.slow
def test_demo_with_search_crops_reads_no_gold_box(tmp_path, monkeypatch):
    """`vopd demo views.crop_source=search`, reduced: the proposer and the training data never see
    a gold box; results.json names the crop source and the proposals' hit rate."""
    import vopd.train_setup as train_setup
    from vopd.toyworld.demo import DemoConfig, run_demo

    real_search, trained_on = proposals_mod.search_proposals, []

    def blind_search(model, processor, samples, view_cfg, cfg):
        assert all(s.boxes == [] and s.teacher_image is None for s in samples)
        return real_search(model, processor, samples, view_cfg, cfg)

    class SpyDataset(train_setup.ViewDataset):
        def __init__(self, samples, *a, **k):
            trained_on.extend(samples)
            super().__init__(samples, *a, **k)

    monkeypatch.setattr(proposals_mod, "search_proposals", blind_search)
    monkeypatch.setattr(train_setup, "ViewDataset", SpyDataset)
    cfg = DemoConfig(
        out=str(tmp_path),
        steps=1,
        eval_every=1,
        n_eval=10,
        threads=1,
        overrides=(
            "views.crop_source=search",
            "prompts_per_step=4",
            "micro_batch_prompts=4",
            "health.probe_data=toyworld:4:124",
        ),
    )
    results = run_demo(cfg)
    proposed = {p.sample_id: p.box for p in proposals_mod.read_proposals(tmp_path / "train" / "proposals.jsonl")}
    assert len(trained_on) == 16 and all(s.boxes == [proposed[s.id]] for s in trained_on)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["crop_source"] == "search"
    p = saved["proposals"]
    assert p["source"] == "search" and p["n"] == 16 and 0.0 <= p["hit_rate"] <= 1.0
    assert (tmp_path / p["file"]).is_file()
    report = (tmp_path / "report.md").read_text()
    assert "no gold box" in report and "hit rate" in report
    assert results["proposals"] == p


@pytest.mark.slow
def test_demo_with_proposal_keep_trains_on_the_surest_fraction_only(tmp_path, monkeypatch):
    """`views.proposal_keep=0.5`: training sees only the surest half of the attention proposals,
    and results.json measures those it used beside all of them."""
    import vopd.train_setup as train_setup
    from vopd.toyworld.demo import DemoConfig, run_demo, summary_text

    trained_on: list = []

    class SpyDataset(train_setup.ViewDataset):
        def __init__(self, samples, *a, **k):
            trained_on.extend(samples)
            super().__init__(samples, *a, **k)

    monkeypatch.setattr(train_setup, "ViewDataset", SpyDataset)
    cfg = DemoConfig(
        out=str(tmp_path),
        steps=1,
        eval_every=1,
        n_eval=10,
        threads=1,
        overrides=(
            "views.crop_source=attention",
            "views.proposal_keep=0.5",
            "data.train=toyworld:16:1",
            "prompts_per_step=4",
            "micro_batch_prompts=4",
            "health.probe_data=toyworld:4:124",
        ),
    )
    results = run_demo(cfg)
    props = proposals_mod.read_proposals(tmp_path / "train" / "proposals.jsonl")
    kept = surest(props, 0.5)
    assert len(props) == 16 and len(kept) == 8
    assert sorted(s.id for s in trained_on) == sorted(p.sample_id for p in kept)
    assert min(p.score for p in kept) >= max(p.score for p in props if p not in kept)
    assert results["proposals"]["n"] == 16 and results["proposals"]["kept"]["n"] == 8
    assert results["proposals"]["kept"]["keep"] == 0.5
    assert "trained on the surest 8" in summary_text(results, tmp_path)
    assert "Training kept the surest 0.5 of them" in (tmp_path / "report.md").read_text()


def test_a_cache_torn_by_a_kill_mid_write_resumes(tmp_path, monkeypatch):
    """A run killed while appending leaves half a row without its newline: the resume skips it,
    proposes that sample again and appends on a line of its own (the cache stays readable)."""
    samples = make_dataset(3, 4)
    asked: list = []

    def spy(model, processor, blind, view_cfg, cfg):
        asked.extend(s.id for s in blind)
        return [Proposal(s.id, Box(28, 28, 84, 84), -0.5, "search") for s in blind]

    monkeypatch.setattr(proposals_mod, "search_proposals", spy)
    view = dataclasses.replace(TOY_VIEW, crop_source="search")
    cache = tmp_path / "proposals.jsonl"
    whole = json.dumps({"id": samples[0].id, "box": [0, 0, 56, 56], "score": -0.1, "source": "search"})
    cache.write_text(whole + "\n" + '{"id": "' + samples[1].id + '", "box": [0, 0,')  # killed mid-row
    out = crops_from_model(samples, view, None, None, tmp_path)
    assert asked == [samples[1].id, samples[2].id]  # the intact row is reused
    assert out[0].boxes == [Box(0, 0, 56, 56)] and out[1].boxes == [Box(28, 28, 84, 84)]
    done = proposals_mod.read_proposals(cache, source="search")
    assert sorted(p.sample_id for p in done) == sorted(s.id for s in samples)


def test_proposal_keep_keeps_each_training_row_with_its_own_file_row(tmp_path, monkeypatch):
    """With views.proposal_keep < 1 the dataset's ``file:row`` origins (named in data errors)
    belong to the samples kept, not to the first rows of the file."""
    import vopd.train_setup as train_setup
    from vopd.data import load_train_data

    records = write_records(make_dataset(8, 4), tmp_path / "d" / "r.jsonl")

    def scored(model, processor, blind, view_cfg, cfg):  # the last rows are surest
        return [Proposal(s.id, Box(28, 28, 84, 84), float(i), "attention") for i, s in enumerate(blind)]

    monkeypatch.setattr(proposals_mod, "attention_proposals", scored)
    cfg = load_config(
        None,
        [
            "model.path=toy-base",
            f"data.train={records}",
            "views.crop_source=attention",
            "views.proposal_keep=0.5",
            "prompts_per_step=2",
            "micro_batch_prompts=2",
            "threads=1",
            "report_to=[jsonl]",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    _, _, dataset, _ = train_setup.setup(cfg)
    samples, origins = load_train_data(str(records))
    origin_of = dict(zip((s.id for s in samples), origins))
    assert [s.id for s in dataset.samples] == [s.id for s in samples[4:]]
    assert dataset.origins == [origin_of[s.id] for s in dataset.samples]


def test_other_processes_read_the_main_process_proposals(tmp_path, monkeypatch):
    """``main=False`` (a non-main process, after the main one wrote the cache) reads the cache and
    proposes nothing itself: every rank trains on the same crops, on resume too (the policy is
    then the checkpoint's, whose proposals would differ)."""
    samples = make_dataset(3, 4)
    cache = tmp_path / "proposals.jsonl"
    cache.write_text(
        "".join(
            json.dumps({"id": s.id, "box": [0, 0, 56, 56], "score": -0.1, "source": "search"}) + "\n" for s in samples
        )
    )
    before = cache.read_bytes()

    def must_not_run(*args):
        raise AssertionError("a non-main process proposed although the cache holds every sample")

    monkeypatch.setattr(proposals_mod, "search_proposals", must_not_run)
    view = dataclasses.replace(TOY_VIEW, crop_source="search")
    out = crops_from_model(samples, view, None, None, tmp_path, main=False)
    assert all(o.boxes == [Box(0, 0, 56, 56)] for o in out) and cache.read_bytes() == before


def test_proposal_keep_without_a_proposed_crop_source_is_a_config_error():
    """proposal_keep ranks proposals; with crop_source=box there are none, so a value < 1 would
    be ignored in silence (every sample trains)."""
    with pytest.raises(ConfigError, match="views.proposal_keep=0.5.*views.crop_source"):
        load_config(None, ["views.proposal_keep=0.5"])
    for order in (
        ["views.proposal_keep=0.5", "views.crop_source=search"],
        ["views.crop_source=search", "views.proposal_keep=0.5"],
    ):
        assert load_config(None, order).views.proposal_keep == 0.5


def test_report_of_proposals_kept_on_training_data_without_gold_boxes():
    """A demo trained on boxless records measures no proposal (n = 0, rates None): the report
    says '-' for the kept share too instead of failing after training."""
    from vopd.toyworld.report import proposal_summary

    none = {"n": 0, "hit_rate": None, "centre_hit_rate": None, "mean_iou": None}
    text = proposal_summary(
        {"source": "attention", "file": "train/proposals.jsonl", **none, "kept": {"keep": 0.5, **none}}
    )
    assert (
        "hit rate - (gold box" in text
        and "Training kept the surest 0.5 of them (views.proposal_keep), 0 scenes: hit rate -, mean IoU -." in text
    )
    kept = {"keep": 0.2, "n": 4, "hit_rate": 0.75, "centre_hit_rate": 1.0, "mean_iou": 0.5}
    assert "4 scenes: hit rate 75.0 %, mean IoU 0.50." in proposal_summary(
        {
            "source": "attention",
            "file": "p",
            "n": 20,
            "hit_rate": 0.5,
            "centre_hit_rate": 0.6,
            "mean_iou": 0.4,
            "kept": kept,
        }
    )


def test_proposed_crops_with_fsdp2_load():
    """Every crop source runs under FSDP2 (every rank proposes in step with the root gathered; the
    2-process run equal to 1 process is in tests/test_parallel.py). Before, the proposers ran the
    sharded policy on one rank and died with 'aten.embedding got mixed torch.Tensor and DTensor'."""
    for source in ("search", "attention", "grounding"):
        cfg = load_config(None, ["parallel.strategy=fsdp2", "teacher.kind=ema", f"views.crop_source={source}"])
        assert cfg.views.crop_source == source


def test_proposal_config_rejects_empty_batches_and_budgets():
    for bad in ({"batch_size": 0}, {"max_new_tokens": 0}, {"box_tokens": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            ProposalConfig(**bad)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["search", "attention", "grounding"])
def test_the_proposer_prompts_follow_the_thinking_switch(tiny_qwen2_vl, monkeypatch, tmp_path, source):
    """model.thinking reaches every prompt a proposer builds, as it reaches training's prompts."""
    import vopd.proposals.grounding as grounding_mod

    model, processor = tiny_qwen2_vl
    seen: list = []

    def spy(real):
        def build(*args, **kwargs):
            seen.append(kwargs.get("thinking", "missing"))
            return real(*args, **kwargs)

        return build

    monkeypatch.setattr(proposals_mod, "build_prompts", spy(proposals_mod.build_prompts))
    monkeypatch.setattr(grounding_mod, "build_prompts", spy(grounding_mod.build_prompts))
    view = dataclasses.replace(TOY_VIEW, crop_source=source)
    out = crops_from_model(make_dataset(2, 5), view, model, processor, tmp_path, thinking=False)
    assert len(out) == 2 and seen and set(seen) == {False}
