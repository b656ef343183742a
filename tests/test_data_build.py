"""``vopd data build`` against scripted local servers on toy scenes: stages, drops by reason, caches, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.fake_server import FakeChatServer
from support.toy_oracle import ToyOracle

from vopd.cli import main
from vopd.databuild.filtering import count_votes, crop_verdict
from vopd.databuild.writer import parse_question, render_prompt
from vopd.datacheck import check_data
from vopd.records import load_records
from vopd.toyworld.scenes import write_dataset

TEMPLATE = "image={image} label={label}\n{views}\nWrite one question as JSON."
SHAPE = re.compile(r"the (\w+)\?")


def _shape_agreement(shares: dict[str, float]):
    return lambda key: shares[SHAPE.search(key).group(1)]


@pytest.fixture
def toy(tmp_path):
    """12 toy scenes, a boxes file of their targets (labelled by shape) and the writer template."""
    records = write_dataset(tmp_path / "toy", 12, 5)
    samples = load_records(records).samples
    boxes = tmp_path / "boxes.jsonl"
    rows = [
        {"image": f"toy/images/{s.id}.png", "boxes": [b.as_list() for b in s.boxes], "labels": [s.meta["shape"]]}
        for s in samples
    ]
    boxes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tmpl.txt").write_text(TEMPLATE)
    return tmp_path, samples, boxes


def _args(root: Path, writer: FakeChatServer, filt: FakeChatServer, out: str = "built/data.jsonl", *extra: str):
    return [
        "data",
        "build",
        str(root / "toy" / "images"),
        "--boxes",
        str(root / "boxes.jsonl"),
        "--out",
        str(root / out),
        "--writer-url",
        writer.url,
        "--writer-model",
        "toy-writer",
        "--writer-prompt",
        str(root / "tmpl.txt"),
        "--writer-full-image",
        "--filter-url",
        filt.url,
        "--filter-model",
        "toy-filter",
        "--retries",
        "1",
        "--timeout",
        "10",
        "--no-progress",
        *extra,
    ]


def test_parse_question_accepts_fenced_json_letters_and_option_text():
    q, why = parse_question(
        'Sure!\n```json\n{"question": "Colour?", "options": ["A. red", "B. blue", "C. x", "D. y"], "answer": "b"}\n```'
    )
    assert why is None and q.options == ["red", "blue", "x", "y"] and q.answer == "B"
    q, _ = parse_question('{"question": "Q?", "options": ["red", "blue", "x", "y"], "answer": "blue"}')
    assert q.answer == "B"
    q, _ = parse_question('{"question": "Q?", "options": ["red", "blue", "x", "y"], "answer": "(D)"}')
    assert q.answer == "D"


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("no JSON here", "writer_invalid_json"),
        ('{"question": "Q?", "options": ["a", "b", "c"], "answer": "A"}', "writer_bad_fields"),
        ('{"question": "Q?", "options": ["a", "b", "c", "A"], "answer": "A"}', "writer_bad_fields"),
        ('{"question": "", "options": ["a", "b", "c", "d"], "answer": "A"}', "writer_bad_fields"),
        ('{"question": "Q?", "options": ["a", "b", "c", "d"], "answer": "E"}', "writer_answer_not_in_options"),
        ('{"question": "Q?", "options": ["a", "b", "c", "d"], "answer": "zebra"}', "writer_answer_not_in_options"),
        ('{"question": "Q?", "options": ["a", "b", "c", "d"]}', "writer_answer_not_in_options"),
    ],
)
def test_parse_question_drops_unusable_replies_with_their_reason(reply, reason):
    assert parse_question(reply) == (None, reason)


def test_render_prompt_replaces_only_its_placeholders():
    text = render_prompt('{image} {label} {"question": 1}', image="a.png", label=None, show_full=False)
    assert text == 'a.png unknown {"question": 1}'


def test_filter_rule_is_a_strict_majority_share():
    opts = ["red", "blue", "green", "cyan"]
    assert crop_verdict(count_votes(["A"] * 7 + ["B"], opts), "A", 0.75) is None  # 7/8 > 0.75
    assert crop_verdict(count_votes(["A"] * 6 + ["B"] * 2, opts), "A", 0.75) == "filter_unsure"  # 6/8 is not
    assert crop_verdict(count_votes(["B"] * 5 + ["A"] * 3, opts), "A", 0.75) == "filter_disagrees"
    assert count_votes(["A", "A", "B", "B"], opts).majority is None  # a tie has no majority
    assert count_votes(["no idea"] * 4, opts).majority is None


def test_build_keeps_agreeing_questions_and_counts_every_drop(toy, capsys):
    root, samples, boxes = toy
    # Extra rows: a box too large, one too small, one around empty canvas (the writer refuses), and
    # an unreadable image in the folder.
    first = samples[0].id
    with boxes.open("a") as fh:
        fh.write(json.dumps({"image": f"toy/images/{first}.png", "boxes": [[0, 0, 160, 160], [1, 1, 5, 5]]}) + "\n")
    empty = next(s for s in samples if not any(o["box"][0] < 20 and o["box"][1] < 20 for o in s.meta["objects"]))
    with boxes.open("a") as fh:
        fh.write(json.dumps({"image": f"toy/images/{empty.id}.png", "boxes": [[0, 0, 12, 12]]}) + "\n")
        fh.write(json.dumps({"image": "elsewhere/missing.png", "boxes": [[0, 0, 12, 12], [1, 1, 9, 9]]}) + "\n")
    (root / "toy" / "images" / "broken.png").write_bytes(b"not a png")
    shares = {"circle": 1.0, "square": 0.75, "triangle": 0.25}
    oracle = ToyOracle(root / "toy" / "records.jsonl", agreement=_shape_agreement(shares))
    with FakeChatServer(oracle.writer) as writer, FakeChatServer(oracle.filter) as filt:
        assert main(_args(root, writer, filt)) == 0
    shapes = [s.meta["shape"] for s in samples]
    summary = json.loads((root / "built" / "data.summary.json").read_text())
    stages = summary["stages"]
    assert stages["images"] == {"found": 13, "unreadable": 1, "read": 12}
    assert summary["unreadable_images"][0]["path"].endswith("broken.png")
    assert stages["regions"]["found"] == 15 and stages["regions"]["too_large"] == 1
    assert stages["regions"]["boxes_for_no_input"] == 2  # named an image that is not an input
    assert stages["regions"]["too_small"] == 1 and stages["regions"]["kept"] == 13
    assert stages["writer"]["writer_invalid_json"] == 1 and stages["writer"]["written"] == 12
    filt_counts = stages["filter"]
    assert filt_counts["kept"] == shapes.count("circle") == summary["records"]
    assert filt_counts["filter_unsure"] == shapes.count("square")  # 6 of 8 agree: not more than 0.75
    assert filt_counts["filter_disagrees"] == shapes.count("triangle")
    out = load_records(root / "built" / "data.jsonl", check_images=True)
    assert [s.question for s in out] == ["What color is the circle?"] * shapes.count("circle")
    by_id = {s.id: s for s in samples}
    for s in out:
        truth = by_id[s.id.rsplit("-r", 1)[0]]
        assert s.options[ord(s.answer) - 65] == truth.meta["colour"] and s.boxes == truth.boxes
        assert s.meta["filter"]["share"] == 1.0 and s.meta["writer"]["model"] == "toy-writer"
    assert check_data(root / "built" / "data.jsonl", decode=True).ok
    assert (root / "built" / "data.gallery.png").is_file()
    report = capsys.readouterr().out
    assert "broken.png" in report and f"wrote {shapes.count('circle')} records" in report


def test_failed_requests_are_dropped_not_cached_and_asked_again(toy):
    root, samples, _ = toy
    victim = samples[3].id
    oracle = ToyOracle(root / "toy" / "records.jsonl")

    def flaky(text, body):
        return 500 if f"image={victim}.png" in text else oracle.writer(text, body)

    with FakeChatServer(flaky) as writer, FakeChatServer(oracle.filter) as filt:
        assert main(_args(root, writer, filt)) == 0
        assert sum(f"image={victim}.png" in json.dumps(b) for b in writer.requests) == 2  # 1 retry
    stages = json.loads((root / "built" / "data.summary.json").read_text())["stages"]
    assert stages["writer"]["writer_failed"] == 1 and stages["filter"]["kept"] == len(samples) - 1
    assert victim + "-r0" not in {s.id for s in load_records(root / "built" / "data.jsonl")}
    with FakeChatServer(oracle.writer) as writer, FakeChatServer(oracle.filter) as filt:
        assert main(_args(root, writer, filt)) == 0
        assert len(writer.requests) == 1 and len(filt.requests) == 1  # only the failed item
    assert len(load_records(root / "built" / "data.jsonl")) == len(samples)


def test_rerun_reuses_caches_and_another_writer_does_not(toy):
    root, samples, _ = toy
    oracle = ToyOracle(root / "toy" / "records.jsonl")
    with FakeChatServer(oracle.writer) as writer, FakeChatServer(oracle.filter) as filt:
        assert main(_args(root, writer, filt)) == 0
        assert main(_args(root, writer, filt)) == 0
        assert len(writer.requests) == len(samples) and len(filt.requests) == len(samples)
        args = _args(root, writer, filt)
        args[args.index("toy-writer")] = "other-writer"
        assert main(args) == 0
        assert len(writer.requests) == 2 * len(samples)
        args[args.index("toy-filter")] = "other-filter"
        assert main(args) == 0
        assert len(filt.requests) == 2 * len(samples)
    caches = sorted(p.name.split("-")[0] for p in (root / "built" / "data.build").glob("*.jsonl"))
    assert caches == ["filter", "filter", "writer", "writer"]
    manifest = json.loads((root / "built" / "data.build" / "build.json").read_text())
    assert {v["model"] for v in manifest["stages"].values()} == {
        "toy-writer",
        "other-writer",
        "toy-filter",
        "other-filter",
    }


def test_drop_easy_removes_questions_the_full_image_answers(toy):
    root, samples, _ = toy
    oracle = ToyOracle(
        root / "toy" / "records.jsonl", full_agreement=_shape_agreement({"circle": 1.0, "square": 0.0, "triangle": 0.0})
    )
    with FakeChatServer(oracle.writer) as writer, FakeChatServer(oracle.filter) as filt:
        assert main(_args(root, writer, filt, "built/data.jsonl", "--drop-easy")) == 0
    stages = json.loads((root / "built" / "data.summary.json").read_text())["stages"]
    shapes = [s.meta["shape"] for s in samples]
    assert stages["filter"]["filter_too_easy"] == shapes.count("circle")
    assert stages["filter"]["kept"] == len(samples) - shapes.count("circle")


def test_refuses_to_overwrite_a_file_it_did_not_write(toy, capsys):
    root, _, _ = toy
    (root / "built").mkdir()
    (root / "built" / "data.jsonl").write_text("precious\n")
    oracle = ToyOracle(root / "toy" / "records.jsonl")
    with FakeChatServer(oracle.writer) as writer, FakeChatServer(oracle.filter) as filt:
        assert main(_args(root, writer, filt)) == 1
        assert not writer.requests
    assert (root / "built" / "data.jsonl").read_text() == "precious\n"
    assert "was not written by vopd data build" in capsys.readouterr().err


def test_a_killed_build_resumes_where_it_stopped(toy):
    root, samples, _ = toy
    oracle = ToyOracle(root / "toy" / "records.jsonl")
    release = threading.Event()

    def stalling(text, body):
        if len(writer.requests) > 5:  # the 6th request and later hang until the build is killed
            release.wait(30)
            return 503
        return oracle.writer(text, body)

    with FakeChatServer(stalling) as writer, FakeChatServer(oracle.filter) as filt:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])}
        args = [*_args(root, writer, filt), "--concurrency", "2"]
        proc = subprocess.Popen([sys.executable, "-m", "vopd.cli", *args], env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while len(writer.requests) < 7 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert len(writer.requests) >= 7, "the build never reached the stalled requests"
            cache = root / "built" / "data.build"
            while (
                time.monotonic() < deadline
                and sum(len(p.read_text().splitlines()) for p in cache.glob("writer-*.jsonl")) < 5
            ):  # the 5 replies are in: wait until the build has cached them
                time.sleep(0.05)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            release.set()
    cache = next((root / "built" / "data.build").glob("writer-*.jsonl"))
    assert len(cache.read_text().splitlines()) == 5 and not (root / "built" / "data.jsonl").exists()
    with FakeChatServer(oracle.writer) as writer, FakeChatServer(oracle.filter) as filt:
        assert main(_args(root, writer, filt)) == 0
        assert len(writer.requests) == len(samples) - 5  # only what the killed build had not cached
    assert len(load_records(root / "built" / "data.jsonl")) == len(samples)


def test_regions_proposed_by_the_model_are_cached_by_image_content(toy, monkeypatch):
    root, samples, _ = toy
    oracle = ToyOracle(root / "toy" / "records.jsonl")
    with FakeChatServer(oracle.writer) as writer, FakeChatServer(oracle.filter) as filt:
        args = _args(root, writer, filt)
        at = args.index("--boxes")
        args[at : at + 2] = [
            "--propose-model",
            "toy-base",
            "--source",
            "attention",
            "--config",
            "configs/toy_demo.yaml",
        ]
        assert main(args) == 0
        stages = json.loads((root / "built" / "data.summary.json").read_text())["stages"]
        assert stages["regions"]["found"] == len(samples) and stages["writer"]["asked"] == stages["regions"]["kept"]
        rows = (next((root / "built" / "data.build").glob("regions-*.jsonl"))).read_text().splitlines()
        assert len(rows) == len(samples) and all(json.loads(r)["model"] == "toy-base" for r in rows)

        def no_model(*a, **k):
            raise AssertionError("the proposer was loaded although every proposal is cached")

        monkeypatch.setattr("vopd.specs.resolve_model_spec", no_model)
        assert main(args) == 0
    out = load_records(root / "built" / "data.jsonl")
    assert all(s.meta["region"]["source"] == "attention" and s.meta["region"]["model"] == "toy-base" for s in out)


def test_filter_local_samples_with_a_local_model(toy):
    root, samples, _ = toy
    oracle = ToyOracle(root / "toy" / "records.jsonl")
    with FakeChatServer(oracle.writer) as writer, FakeChatServer(oracle.filter) as filt:
        args = _args(root, writer, filt, "built/data.jsonl", "--filter-samples", "2", "--limit", "4")
        at = args.index("--filter-url")
        args[at : at + 4] = ["--filter-local", "toy-base"]
        assert main(args) == 0
        assert not filt.requests
    counts = json.loads((root / "built" / "data.summary.json").read_text())["stages"]["filter"]
    assert counts["asked"] == 4 and counts["requests"] == 4
    assert counts["kept"] + counts.get("filter_disagrees", 0) + counts.get("filter_unsure", 0) == 4
    rows = [
        json.loads(r) for r in next((root / "built" / "data.build").glob("filter-*.jsonl")).read_text().splitlines()
    ]
    assert len(rows) == 4 and all(len(r["replies"]) == 2 for r in rows)


def test_an_output_inside_the_image_folder_is_not_read_back_as_an_image(toy):
    root, samples, _ = toy
    oracle = ToyOracle(root / "toy" / "records.jsonl")
    with FakeChatServer(oracle.writer) as writer, FakeChatServer(oracle.filter) as filt:
        for _ in range(2):
            assert main(_args(root, writer, filt, "toy/images/built.jsonl")) == 0
            summary = json.loads((root / "toy" / "images" / "built.summary.json").read_text())
            assert summary["stages"]["images"]["found"] == len(samples)
    assert (root / "toy" / "images" / "built.gallery.png").is_file()


def test_the_thinking_switch_can_be_left_out_for_hosted_apis():
    from PIL import Image

    from vopd.databuild.chat import ChatClient
    from vopd.databuild.settings import ChatConfig

    image = Image.new("RGB", (8, 8))
    body = ChatClient(ChatConfig(url="http://x/v1", model="m")).body([image], "q", n=3, temperature=1.0, max_tokens=9)
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["n"] == 3
    bare = ChatClient(ChatConfig(url="http://x/v1", model="m", thinking=None))
    assert "chat_template_kwargs" not in bare.body([image], "q", n=1, temperature=0.0, max_tokens=9)


def test_a_bad_boxes_row_is_named_by_file_and_row(toy, capsys):
    root, samples, boxes = toy
    with boxes.open("a") as fh:
        fh.write(json.dumps({"image": f"toy/images/{samples[0].id}.png", "boxes": [[1, 2, 3]]}) + "\n")
    with FakeChatServer(lambda t, b: "x") as writer, FakeChatServer(lambda t, b: "x") as filt:
        assert main(_args(root, writer, filt)) == 1
        assert not writer.requests
    assert f"boxes.jsonl:{len(samples) + 1}: field 'boxes[0]'" in capsys.readouterr().err
