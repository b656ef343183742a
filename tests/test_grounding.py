"""views.crop_source=grounding: each Qwen family's box format and coordinate frame,
robust parsing, counted fallbacks, and proposals from a scripted model answer end to end."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from support.scripted import ScriptedEngine

import vopd.proposals as proposals_mod
from vopd.config import ViewConfig
from vopd.knobs import ConfigError
from vopd.proposals import ProposalConfig, load_or_propose, proposal_quality, read_proposals
from vopd.proposals.grounding import (
    GROUNDING_FORMATS,
    INPUT_PIXELS,
    RELATIVE_1000,
    find_box,
    grounding_format,
    grounding_prompt,
    read_answer,
    status_counts,
    to_image_box,
)
from vopd.records import Box, Sample

QWEN2, QWEN25, QWEN3 = (GROUNDING_FORMATS[f] for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))


def test_family_table_frames_and_prompts():
    assert (QWEN2.frame, QWEN25.frame, QWEN3.frame) == (RELATIVE_1000, INPUT_PIXELS, RELATIVE_1000)
    sample = Sample("s", "x.png", "What colour is the cup?", options=["red", "blue"])
    q2 = grounding_prompt(QWEN2, sample)
    assert "<|object_ref_start|>" in q2 and "<|object_ref_end|>" in q2
    assert "What colour is the cup? Options: red; blue." in q2
    q25 = grounding_prompt(QWEN25, sample)
    assert '"bbox_2d": [x1, y1, x2, y2]' in q25 and "What colour is the cup?" in q25


def test_unsupported_family_is_a_config_error_naming_key_and_families():
    with pytest.raises(ConfigError) as err:
        grounding_format("idefics3")
    msg = str(err.value)
    assert "views.crop_source=grounding" in msg and "'idefics3'" in msg
    assert all(f in msg for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))


def test_qwen2_vl_box_tokens_are_thousandths_of_the_image():
    text = "<|object_ref_start|>the cup<|object_ref_end|><|box_start|>(100,250),(500,750)<|box_end|><|im_end|>"
    found = find_box(text)
    assert found.values == (100, 250, 500, 750) and text[found.span[0] : found.span[1]] == "(100,250),(500,750)"
    assert to_image_box(found.values, QWEN2, (200, 80)) == (Box(20, 20, 100, 60), "ok")
    assert find_box("(100, 250), (500, 750)").values == (100, 250, 500, 750)  # spaces, no box tokens


def test_qwen3_vl_json_is_relative_and_qwen2_5_vl_json_is_in_resized_input_pixels():
    text = '```json\n[\n  {"bbox_2d": [100, 250, 500, 750], "label": "cup"}\n]\n```'
    values = find_box(text).values
    assert to_image_box(values, QWEN3, (200, 80)) == (Box(20, 20, 100, 60), "ok")
    # Qwen2.5-VL: a 200 x 90 image enters the model as 140 x 56 (see the processor test below).
    box, status = to_image_box([14, 5.6, 70, 28], QWEN25, (200, 90), (140, 56))
    assert status == "ok" and box.as_list() == pytest.approx([20, 9, 100, 45])
    with pytest.raises(ValueError, match="input"):
        to_image_box(values, QWEN25, (200, 90))


def test_qwen2_5_vl_input_size_is_the_patch_grid_times_the_patch(tiny_models):
    """The resized size the absolute boxes refer to: image_grid_thw x patch = the processor's smart resize."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from vopd.models import build_prompts
    from vopd.proposals.grounding import model_input_size

    model, processor = tiny_models("qwen2_5_vl")
    for size in [(200, 90), (60, 300)]:
        batch = build_prompts(processor, [Image.new("RGB", size, "white")], ["hi"])
        height, width = smart_resize(size[1], size[0], factor=28, min_pixels=28 * 28, max_pixels=112 * 112)
        assert model_input_size(model, batch, 0) == (width, height) and (width, height) != size
    assert model_input_size(model, batch, 0) == (28, 224)


@pytest.mark.parametrize(
    "text",
    [
        "The triangle is blue.",
        "",
        '{"bbox_2d": [1, 2, 3]}',
        "[10, 20, 30, 40",
        "(1,2),(3",
        "box: 10 20 30 40",
    ],
)
def test_answers_without_a_well_formed_box(text):
    assert find_box(text) is None


def test_first_well_formed_box_wins():
    assert find_box('{"bbox_2d": [1, 2, 3]} then {"bbox_2d": [10, 20, 30, 40]}').values == (10, 20, 30, 40)
    two = '[{"bbox_2d": [10, 20, 30, 40]}, {"bbox_2d": [50, 60, 70, 80]}]'
    assert find_box(two).values == (10, 20, 30, 40)
    mixed = "(5,6),(7,8) and [10, 20, 30, 40]"
    assert find_box(mixed).values == (5, 6, 7, 8)
    assert find_box("[1.5, 2, 30.25, 40]").values == (1.5, 2, 30.25, 40)


def test_swapped_corners_out_of_image_and_degenerate_boxes():
    assert to_image_box([500, 750, 100, 250], QWEN2, (200, 80)) == (Box(20, 20, 100, 60), "repaired")
    assert to_image_box([-50, 100, 1200, 900], QWEN2, (200, 80)) == (Box(0, 8, 200, 72), "repaired")
    assert to_image_box([300, 300, 300, 500], QWEN2, (200, 80)) == (None, "degenerate")
    assert to_image_box([1100, 1100, 1200, 1300], QWEN2, (200, 80)) == (None, "degenerate")  # wholly outside
    assert to_image_box([0, 0, 150, 60], QWEN25, (200, 90), (140, 56))[1] == "repaired"  # past the input's edge


def _tokenizer():
    from vopd.tiny_models import build_tokenizer

    return build_tokenizer(family="qwen2_5_vl")


def test_score_is_the_mean_log_prob_of_the_box_tokens_and_fallback_is_the_whole_image():
    tok = _tokenizer()
    text = 'Sure: {"bbox_2d": [100, 250, 500, 750]} is it'
    ids = tok.encode(text)
    # Reference: character ranges from decoding each token alone (ASCII text, so lengths add up).
    pieces = [tok.decode([i]) for i in ids]
    assert "".join(pieces) == text
    start = text.index("[100")
    end = text.index("750]") + 4
    pos, inside = 0, []
    for piece in pieces:
        inside.append(pos < end and pos + len(piece) > start)
        pos += len(piece)
    logp = [-0.5 if b else -3.0 for b in inside]
    g = read_answer(tok, ids, logp, QWEN3, (200, 80))
    assert g.status == "ok" and g.box == Box(20, 20, 100, 60) and g.score == pytest.approx(-0.5)
    assert 0 < sum(inside) < len(ids)
    miss = read_answer(
        tok, tok.encode("It is blue."), [-1.0, -2.0, -3.0, -4.0][: len(tok.encode("It is blue."))], QWEN3, (200, 80)
    )
    assert miss.status == "unparsed" and miss.box == Box(0, 0, 200, 80) and miss.answer == "It is blue."
    point = read_answer(
        tok, tok.encode("[300, 300, 300, 500]"), [-1.0] * len(tok.encode("[300, 300, 300, 500]")), QWEN3, (200, 80)
    )
    assert point.status == "degenerate" and point.box == Box(0, 0, 200, 80)


def test_status_counts():
    assert status_counts(["ok", "repaired", "unparsed", "unparsed", "degenerate"]) == {
        "parsed": 2,
        "repaired": 1,
        "degenerate": 1,
        "unparsed": 2,
        "fallback_box": "whole image",
    }


def test_grounding_proposals_end_to_end_with_a_scripted_qwen2_5_vl(tiny_models, monkeypatch, tmp_path):
    """A tiny Qwen2.5-VL whose answers are scripted: the box comes back in the original image's pixels,
    is cached with source=grounding, and the quality dict counts and reports the unparsed answer."""
    model, processor = tiny_models("qwen2_5_vl")
    engine = ScriptedEngine(
        processor, ['```json\n[{"bbox_2d": [14, 5.6, 70, 28], "label": "cup"}]\n```', "The cup is red."]
    )
    monkeypatch.setattr(proposals_mod, "HFGenerateEngine", lambda processor: engine)
    image = Image.new("RGB", (200, 90), "white")
    gold = [Box(30, 20, 60, 40), Box(30, 20, 60, 40)]
    samples = [Sample(f"s{i}", image, "What colour is the cup?", boxes=[b]) for i, b in enumerate(gold)]
    view = ViewConfig(context=0.0, min_side=20, crop_source="grounding")
    cache = tmp_path / "proposals.jsonl"
    props = load_or_propose(model, processor, samples, view, ProposalConfig(source="grounding"), cache)
    assert props[0].box.as_list() == pytest.approx([20, 9, 100, 45]) and props[0].status == "ok"
    assert props[0].score == pytest.approx(-0.25)
    assert props[1].box == Box(0, 0, 200, 90) and props[1].status == "unparsed"
    assert len(engine.prompts) == 2 and "What colour is the cup?" in engine.prompts[0]
    assert '"bbox_2d"' in engine.prompts[0] and "<|image_pad|>" in engine.prompts[0]
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["source"] for r in rows] == ["grounding"] * 2 and rows[1]["status"] == "unparsed"
    assert "status" not in rows[0]
    again = read_proposals(cache, source="grounding")
    assert [(p.box, p.status) for p in again] == [(p.box, p.status) for p in props]
    # Resume: nothing left to ask.
    assert load_or_propose(model, processor, samples, view, ProposalConfig(source="grounding"), cache) == again
    q = proposal_quality(props, samples, view)
    assert q["n"] == 2 and q["hit_rate"] == 0.5  # the whole-image fallback holds the box but is a miss
    assert (q["parsed"], q["unparsed"], q["degenerate"], q["fallback_box"]) == (1, 1, 0, "whole image")


def test_grounding_on_a_family_without_a_box_format_fails_before_generating(tiny_models):
    model, processor = tiny_models("idefics3")
    samples = [Sample("s", Image.new("RGB", (56, 56)), "What colour?")]
    with pytest.raises(ConfigError, match="crop_source=grounding"):
        proposals_mod.propose(model, processor, samples, ViewConfig(), ProposalConfig(source="grounding"))


def test_demo_report_says_how_many_answers_fell_back():
    from vopd.toyworld.report import proposal_summary

    base = {
        "source": "grounding",
        "file": "proposals.jsonl",
        "n": 10,
        "hit_rate": 0.1,
        "centre_hit_rate": 0.1,
        "mean_iou": 0.2,
    }
    text = proposal_summary({**base, **status_counts(["ok"] * 2 + ["unparsed"] * 7 + ["degenerate"])})
    assert "7 of 10 answers held no box and 1 a box of no area: their crop was the whole image" in text
    assert "held no box" not in proposal_summary({**base, "source": "search"})


@pytest.mark.parametrize(
    "family,answer,expected",
    [
        ("qwen2_vl", "<|box_start|>(100,250),(500,750)<|box_end|>", Box(20, 22.5, 100, 67.5)),
        ("qwen2_5_vl", '[{"bbox_2d": [14, 14, 70, 42], "label": "cup"}]', Box(20, 22.5, 100, 67.5)),
        ("qwen3_vl", '[{"bbox_2d": [100, 250, 500, 750], "label": "cup"}]', Box(20, 22.5, 100, 67.5)),
    ],
)
def test_ground_reads_each_family_in_its_own_frame(tiny_models, family, answer, expected):
    """A non-square 200 x 90 image, which the tiny processors resize to 140 x 56: each family's answer
    lands on the same region of the original image only when read in the family's own frame."""
    from vopd.proposals.grounding import ground

    model, processor = tiny_models(family)
    engine = ScriptedEngine(processor, [answer])
    sample = Sample("s", Image.new("RGB", (200, 90), "white"), "What colour is the cup?")
    (g,) = ground(model, processor, engine, [sample])
    assert g.status == "ok" and g.box.as_list() == pytest.approx(expected.as_list())
    marker = "<|object_ref_start|>" if family == "qwen2_vl" else '"bbox_2d"'
    assert marker in engine.prompts[0] and "What colour is the cup?" in engine.prompts[0]


@pytest.mark.slow
def test_training_with_grounding_crops_on_records_without_boxes(tmp_path, tiny_models, monkeypatch):
    """crop_source=grounding trains on a record file without any box; the scripted Qwen2-VL answer
    (0-1000 of the image) becomes the cached proposal the teacher's crop is cut around."""
    from vopd.config import load_config
    from vopd.records import write_records
    from vopd.toyworld.scenes import make_dataset
    from vopd.trainer import train

    _, processor = tiny_models("qwen2_vl")
    engine = ScriptedEngine(processor, ["<|box_start|>(250,250),(750,750)<|box_end|>", "no idea"] * 2)
    monkeypatch.setattr(proposals_mod, "HFGenerateEngine", lambda processor: engine)
    scenes = make_dataset(4, 0)
    records = write_records([s.__class__(**{**s.__dict__, "boxes": []}) for s in scenes], tmp_path / "d" / "r.jsonl")
    res = train(
        load_config(
            None,
            [
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
                "views.crop_source=grounding",
                f"output_dir={tmp_path / 'run'}",
            ],
        )
    )
    assert res.steps == 1 and engine.calls == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "proposals.jsonl").read_text().splitlines()]
    assert [r["box"] for r in rows] == [[42, 42, 126, 126], [0, 0, 168, 168]] * 2
    assert [r.get("status", "ok") for r in rows] == ["ok", "unparsed"] * 2


@pytest.mark.slow
def test_demo_with_grounding_reports_the_answers_without_a_box(tmp_path):
    """`vopd demo views.crop_source=grounding`, reduced: the toy base never learned boxes, so its answers
    fall back to the whole image; results.json and the report count them instead of hiding them."""
    from vopd.toyworld.demo import DemoConfig, run_demo, summary_text

    cfg = DemoConfig(
        out=str(tmp_path),
        steps=1,
        eval_every=1,
        n_eval=10,
        threads=1,
        overrides=(
            "views.crop_source=grounding",
            "prompts_per_step=4",
            "micro_batch_prompts=4",
            "health.probe_data=toyworld:4:124",
        ),
    )
    results = run_demo(cfg)
    p = json.loads((tmp_path / "results.json").read_text())["proposals"]
    assert p == results["proposals"] and p["source"] == "grounding" and p["n"] == 16
    assert p["parsed"] + p["degenerate"] + p["unparsed"] == 16 and p["fallback_box"] == "whole image"
    rows = [json.loads(line) for line in (tmp_path / p["file"]).read_text().splitlines()]
    assert sum(r.get("status", "ok") in ("unparsed", "degenerate") for r in rows) == p["unparsed"] + p["degenerate"]
    report = (tmp_path / "report.md").read_text()
    assert "no gold box" in report and f"{p['unparsed']} of 16 answers held no box" in report
    assert f"{p['unparsed'] + p['degenerate']} answers without a box (whole image)" in summary_text(results, tmp_path)
