"""`vopd eval` on benchmark files in the layouts their publishers ship.

Fixtures come from :mod:`support.published` (written from the published schemas). A scripted
server on 127.0.0.1 answers by the colour of each image, so every answer is known and each
official number below is computed by hand from its definition.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image
from support import published as pub
from support.fake_server import FakeChatServer

from vopd.evaluation import BackendConfig, EvalConfig, main_eval
from vopd.evaluation.benchmarks import get_benchmark
from vopd.grading import pope_answer

pytest.importorskip("pyarrow")

R, G, B, Y, W = "red", "green", "blue", "yellow", "white"


def _image(body) -> Image.Image:
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def oracle(text, body):
    return pub.colour_oracle(_image(body), text)


def _run(tmp_path, benchmarks, responder=oracle, **cfg):
    with FakeChatServer(responder) as server:
        backend = BackendConfig(kind="openai", model="m", url=server.url, retries=0, concurrency=2, timeout_s=10)
        summary = main_eval(
            EvalConfig(
                benchmarks={k: str(v) for k, v in benchmarks.items()},
                out_dir=str(tmp_path / "out"),
                backend=backend,
                **cfg,
            )
        )
    return summary, {r["benchmark"]: r for r in summary["rows"]}, server


def test_hrbench_snapshot_folder_scores_each_resolution_from_its_own_files(tmp_path):
    root = pub.write_hrbench_snapshot(
        tmp_path / "HR-Bench",
        spec_4k=[("single", R, [R, G, B, Y]), ("cross", W, [G, R, B, Y])],  # right, wrong: 50 per rotation
        spec_8k=[("single", G, [G, R, B, Y]), ("cross", Y, [Y, R, G, B]), ("cross", W, [R, G, B, Y])],  # 2 of 3
    )
    summary, rows, _ = _run(tmp_path, {"hrbench_4k": root, "hrbench_8k": root})
    # index repeats across the four files; each resolution is graded with its own answers
    assert rows["hrbench_4k"]["overall"] == pytest.approx(50.0) and rows["hrbench_4k"]["n"] == 8
    assert rows["hrbench_8k"]["overall"] == pytest.approx(200 / 3) and rows["hrbench_8k"]["n"] == 12
    details = summary["details"]["hrbench_4k"]
    assert details["groups"] == {"FCP (cross)": pytest.approx(0.0), "FSP (single)": pytest.approx(100.0)}
    assert summary["sources"]["hrbench_4k"]["files"] == {"hr_bench_4k.parquet": 8}
    notes = " ".join(summary["sources"]["hrbench_4k"]["notes"])
    assert "hr_bench_8k.parquet" in notes and "hr_bench_4k.tsv" in notes
    # the paper's prompt: question, " Select from the following choices.", (A) lines
    item = get_benchmark("hrbench_4k").load(root)[0]
    assert (
        item.prompt
        == "What colour is thing 0? Select from the following choices.\n(A) red\n(B) green\n(C) blue\n(D) yellow"
    )
    assert "A. red" in get_benchmark("hrbench_4k").load(root, prompt="letters")[0].prompt
    # a single file works the same
    assert len(get_benchmark("hrbench_8k").load(root / "hr_bench_8k.tsv")) == 12


def test_mme_realworld_lmms_eval_parquet_full_lite_and_cn(tmp_path):
    spec = [
        ("Perception/Monitoring", R, [R, G, B, Y, W], "A"),  # right
        ("Perception/Remote Sensing", G, [R, G, B, Y, W], "B"),  # right
        ("Reasoning/Diagram and Table", B, [R, G, B, Y, W], "D"),  # wrong (says C)
        ("Reasoning/Monitoring", Y, [R, G, B, Y, W], "D"),  # right
        ("Perception/Autonomous_Driving", W, [R, G, B, Y, G], "A"),
    ]  # wrong (says E)
    en = pub.write_mmerw_lmms(tmp_path / "MME-RealWorld-Lmms-eval", pub.mmerw_rows(spec))
    lite = pub.write_mmerw_lmms(tmp_path / "MME-RealWorld-lite-lmms-eval", pub.mmerw_rows(spec[:2]), shards=1)
    cn = pub.write_mmerw_lmms(tmp_path / "MME-RealWorld-CN-Lmms-eval", pub.mmerw_rows(spec, full_width=True))
    summary, rows, server = _run(tmp_path, {"mme_rw_en": en, "mme_rw_lite": lite, "mme_rw_cn": cn})
    assert rows["mme_rw_en"]["overall"] == pytest.approx(60.0) and rows["mme_rw_en"]["n"] == 5  # micro accuracy
    assert rows["mme_rw_lite"]["overall"] == pytest.approx(100.0) and rows["mme_rw_lite"]["n"] == 2
    assert rows["mme_rw_cn"]["overall"] == pytest.approx(60.0)
    tasks = summary["details"]["mme_rw_en"]["tasks"]
    assert tasks["perception"]["accuracy"] == pytest.approx(200 / 3) and tasks["reasoning"]["accuracy"] == 50.0
    assert summary["sources"]["mme_rw_en"]["files"] == {
        "data/train-00000-of-00002.parquet": 3,
        "data/train-00001-of-00002.parquet": 2,
    }
    # the paper's (= lmms-eval's) prompt, the published option strings verbatim
    prompts = [b["messages"][0]["content"][1]["text"] for b in server.requests]
    assert (
        "Which colour is shown in picture 0? The choices are listed below:\n(A) red\n(B) green\n(C) blue\n"
        "(D) yellow\n(E) white\nSelect the best answer to the above multiple-choice question based on the image. "
        "Respond with only the letter (A, B, C, D, or E) of the correct option.\nThe best answer is: "
    ) in prompts
    cn_items = get_benchmark("mme_rw_cn").load(cn)
    assert cn_items[0].options == [R, G, B, Y, W]  # full-width （A） stripped
    assert cn_items[0].prompt.endswith("最佳答案为： ") and "选项如下所示:\n（A）red" in cn_items[0].prompt


def test_mme_realworld_original_json_with_image_root(tmp_path):
    images = tmp_path / "images" / "remote_sensing"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(pub.png(G))
    rows = [
        {
            "Question_id": "perception/remote_sensing/color/0001",
            "Question Type": "Multiple Choice",
            "Image": "remote_sensing/a.png",
            "Text": "What colour?",
            "Ground truth": "B",
            "Answer choices": ["(A) red", "(B) green", "(C) blue", "(D) yellow", "(E) white"],
            "Task": "Perception",
            "Subtask": "Remote Sensing",
            "Category": "color",
            "Dataset": "dota_v2",
        }
    ]
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "MME_RealWorld.json").write_text(json.dumps(rows))
    _, rows_out, _ = _run(tmp_path, {"mme_rw_en": tmp_path / "json"}, image_root=str(tmp_path / "images"))
    assert rows_out["mme_rw_en"]["overall"] == 100.0


def test_vstar_snapshot_reads_the_191_folders_only(tmp_path):
    root = pub.write_vstar_snapshot(
        tmp_path / "vstar_bench",
        {
            "direct_attributes": [(R, [R, G, B, Y]), (G, [G, R, B, Y]), (B, [R, B, G, Y])],  # right, right, wrong
            "relative_position": [(R, [R, G]), (G, [R, G])],  # right, wrong
            "GPT4V-hard": [(R, [R, G]), (G, [G, R])],
            "OCR": [(B, [B, R])],
        },
    )
    summary, rows, _ = _run(tmp_path, {"vstar": root})
    assert rows["vstar"]["n"] == 5 and rows["vstar"]["overall"] == pytest.approx(60.0)
    assert summary["sources"]["vstar"]["files"] == {"direct_attributes/": 3, "relative_position/": 2}
    assert (
        "GPT4V-hard/" in summary["sources"]["vstar"]["notes"][0] and "OCR/" in summary["sources"]["vstar"]["notes"][0]
    )
    keys = {it.key for it in get_benchmark("vstar").load(root)}
    assert "direct_attributes/sa_0" in keys and "relative_position/sa_0" in keys  # same stem, two keys


def test_zoombench_rows_with_null_crop(tmp_path):
    path = pub.write_zoombench(tmp_path / "ZoomBench", [(R, R, "A"), (G, None, "B"), (B, Y, "C")])
    summary, rows, _ = _run(tmp_path, {"zoombench": path.parent.parent, "zoombench_crop": path.parent.parent})
    assert rows["zoombench"]["n"] == 3 and rows["zoombench"]["overall"] == 100.0
    assert rows["zoombench_crop"]["n"] == 2 and rows["zoombench_crop"]["overall"] == 50.0  # yellow crop: says D
    assert any("1 rows without crop_image" in n for n in summary["sources"]["zoombench_crop"]["notes"])


def _pope_official(pairs):
    """POPE's evaluate.py by its definition: (truth, reply) -> accuracy, precision, recall, F1, yes-ratio."""
    tp = fp = tn = fn = 0
    for truth, reply in pairs:
        said = pope_answer(reply)
        tp += said == "yes" and truth == "yes"
        fp += said == "yes" and truth == "no"
        tn += said == "no" and truth == "no"
        fn += said == "no" and truth == "yes"
    p, r = tp / (tp + fp), tp / (tp + fn)
    return {
        "accuracy": 100 * (tp + tn) / len(pairs),
        "precision": 100 * p,
        "recall": 100 * r,
        "f1": 100 * 2 * p * r / (p + r),
        "yes_ratio": 100 * (tp + fp) / len(pairs),
    }


def test_pope_parse_follows_the_official_script():
    assert pope_answer("Yes, there is a dog.") == "yes"
    assert pope_answer("There is a dog in the image") == "yes"  # no negation word: yes
    assert pope_answer("I cannot tell") == "yes"
    assert pope_answer("No, there is not.") == "no"
    assert pope_answer("There is not a dog.") == "no"
    assert pope_answer("A dog. No cat.") == "yes"  # only the first sentence counts
    assert pope_answer("Nope") == "yes"  # whole words only, as split(' ')


def test_pope_original_json_lines_folder_single_file_and_lmms_snapshot(tmp_path):
    spec = {
        "adversarial": [(R, R, "yes"), (R, G, "no"), (B, B, "no")],
        "popular": [(G, G, "yes"), (G, R, "yes")],
        "random": [(W, R, "no")],
    }
    coco = tmp_path / "coco" / "val2014"
    root = pub.write_pope_original(tmp_path / "POPE" / "output" / "coco", spec, coco)
    summary, rows, server = _run(tmp_path, {"pope": root}, image_root=str(coco))
    replies = [oracle(b["messages"][0]["content"][1]["text"], b) for b in server.requests]
    assert len(replies) == 6
    # by hand: TP 2, FP 1 (the label-"no" blue), TN 2, FN 1 -> precision = recall = 2/3
    official = _pope_official(
        [
            ("yes", "Yes, there is."),
            ("no", "There is no green in the image."),
            ("no", "Yes, there is."),
            ("yes", "Yes, there is."),
            ("yes", "There is no red in the image."),
            ("no", "There is no red in the image."),
        ]
    )
    details = summary["details"]["pope"]
    for key, value in official.items():
        assert details[key] == pytest.approx(value), key
    assert rows["pope"]["overall"] == pytest.approx(200 / 3) and rows["pope"]["n"] == 6
    assert set(details["splits"]) == {"adversarial", "popular", "random"}
    assert summary["sources"]["pope"]["files"] == {
        "coco_pope_adversarial.json": 3,
        "coco_pope_popular.json": 2,
        "coco_pope_random.json": 1,
    }
    single = get_benchmark("pope").load(root / "coco_pope_popular.json", image_root=coco)
    assert [it.answer for it in single] == ["yes", "yes"] and single[0].category == "popular"

    lmms = pub.write_pope_lmms(tmp_path / "lmms-POPE", [("adversarial", R, R, "yes"), ("random", B, R, "no")])
    items = get_benchmark("pope").load(lmms)
    assert len(items) == 2  # Full/ is another configuration, not read
    assert any("Full/" in n for n in items.notes)


def test_mmstar_snapshot_is_not_doubled(tmp_path):
    root = pub.write_mmstar_snapshot(
        tmp_path / "MMStar",
        [(R, [R, G, B, Y], "A"), (G, [R, G, B, Y], "B"), (B, [R, G, B, Y], "C"), (Y, [R, G, B, Y], "A")],
    )
    (root / ".cache" / "huggingface").mkdir(parents=True)  # a hub download's bookkeeping is not data
    (root / ".cache" / "huggingface" / "mmstar.parquet").write_bytes((root / "mmstar.parquet").read_bytes())
    summary, rows, _ = _run(tmp_path, {"mmstar": root})
    assert rows["mmstar"]["n"] == 4 and rows["mmstar"]["overall"] == 75.0
    assert summary["sources"]["mmstar"]["files"] == {"mmstar.parquet": 4}
    assert "MMStar.tsv" in summary["sources"]["mmstar"]["notes"][0]
    assert len(get_benchmark("mmstar").load(root / "MMStar.tsv")) == 4  # the TSV alone reads too


def test_cvbench_snapshot_keys_never_collide(tmp_path):
    root = pub.write_cvbench_snapshot(
        tmp_path / "CV-Bench", spec_2d=[("ADE20K", R, R), ("ADE20K", G, R), ("COCO", B, B)], spec_3d=[(R, R), (G, B)]
    )
    summary, rows, _ = _run(tmp_path, {"cvbench": root})
    # 2D = (ADE20K 50 + COCO 100) / 2 = 75; 3D = Omni3D 50; overall = 62.5
    assert rows["cvbench"]["overall"] == pytest.approx(62.5) and rows["cvbench"]["n"] == 5
    assert summary["sources"]["cvbench"]["files"] == {"test_2d.parquet": 3, "test_3d.parquet": 2}
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len({p["id"] for p in predictions}) == 5  # idx 0 and 1 exist in both files
    jsonl = get_benchmark("cvbench").load(root / "test_2d.jsonl")  # images under img/
    assert [it.open_image().getpixel((0, 0)) for it in jsonl][2] == pub.COLOURS[B]


def _fail_blue(text, body):
    return 500 if pub.seen_colour(_image(body)) == B else oracle(text, body)


def test_failed_requests_count_as_wrong_and_the_cli_exits_non_zero(tmp_path, capsys):
    import argparse

    from vopd.evaluation.cli_args import EXIT_FAILURES, add_eval_arguments, run_eval

    root = pub.write_mmstar_snapshot(
        tmp_path / "MMStar",
        [(R, [R, G, B, Y], "A"), (G, [R, G, B, Y], "B"), (Y, [R, G, B, Y], "A"), (B, [R, G, B, Y], "C")],
    )
    parser = add_eval_arguments(argparse.ArgumentParser())
    out = tmp_path / "out"
    with FakeChatServer(_fail_blue) as server:
        argv = [
            f"mmstar={root}",
            "--out",
            str(out),
            "--backend",
            "openai",
            "--model",
            "m",
            "--url",
            server.url,
            "--retries",
            "0",
        ]
        assert run_eval(parser.parse_args(argv)) == EXIT_FAILURES
        assert "1 items failed" in capsys.readouterr().err
        assert run_eval(parser.parse_args(argv + ["--allow-failures"])) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = summary["rows"][0]
    # right, right, wrong, failed: the headline is 2 of 4 (as the official script counts), 2 of 3 beside it
    assert (row["overall"], row["judged_overall"], row["n"], row["failed"]) == (50.0, pytest.approx(200 / 3), 4, 1)
    table = (out / "summary.md").read_text()
    assert "| mmstar | 50.00 | 66.67 | 4 | 1 | 0 | 0 |" in table and "judged only" in table
    assert (out / "summary.png").stat().st_size > 0
    graded = [json.loads(line) for line in (out / "graded" / "mmstar.jsonl").read_text().splitlines()]
    assert [g["status"] for g in graded] == ["graded", "graded", "graded", "failed"]
    with FakeChatServer(oracle) as server:  # the rerun asks again for the failed item only
        assert (
            run_eval(
                parser.parse_args(
                    [f"mmstar={root}", "--out", str(out), "--backend", "openai", "--model", "m", "--url", server.url]
                )
            )
            == 0
        )
        assert len(server.requests) == 1
    assert json.loads((out / "summary.json").read_text())["rows"][0]["overall"] == 75.0


def test_pope_original_files_without_image_root_name_the_missing_images_and_the_flag(tmp_path, capsys):
    """POPE's files name COCO images that live elsewhere: without --image-root every item fails on a
    missing image, and the console line says so (not just "N items failed")."""
    import argparse

    from vopd.evaluation.cli_args import EXIT_FAILURES, add_eval_arguments, run_eval

    spec = {"adversarial": [(R, R, "yes"), (R, G, "no")], "random": [(W, R, "no")]}
    coco = tmp_path / "coco" / "val2014"
    root = pub.write_pope_original(tmp_path / "POPE" / "output" / "coco", spec, coco)
    parser = add_eval_arguments(argparse.ArgumentParser())
    with FakeChatServer(oracle) as server:
        argv = [f"pope={root}", "--out", str(tmp_path / "out"), "--backend", "openai", "--model", "m"]
        assert run_eval(parser.parse_args(argv + ["--url", server.url])) == EXIT_FAILURES
        assert server.requests == []  # nothing could be asked
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3 items failed" in err and "(3 image not found)" in err and "--image-root" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows"][0]["failure_causes"] == {"image not found": 3}


def test_failure_message_names_the_fix_for_the_largest_group():
    from vopd.evaluation.cli_args import failure_message

    rows = [
        {"failure_causes": {"request failed": 2}},
        {"failure_causes": {"judge failed": 5, "image not found": 1}},
    ]
    line = failure_message({"rows": rows, "failures": 8})
    assert "(5 judge failed, 2 request failed, 1 image not found)" in line
    assert "judge failed: rerun the same command to judge them again" in line and "--allow-failures" in line


def test_unknown_prompt_template_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="choose from paper, letters"):
        EvalConfig(benchmarks={"hrbench_4k": "x"}, out_dir=str(tmp_path), prompts={"hrbench_4k": "fancy"})
    with pytest.raises(ValueError, match="not evaluated"):
        EvalConfig(benchmarks={"vstar": "x"}, out_dir=str(tmp_path), prompts={"hrbench_4k": "paper"})


def test_hub_ids_name_the_extra_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'vision-opd\[hf\]'"):
        get_benchmark("mmstar").load("hf:Lin-Chen/MMStar:val")
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.startswith("datasets") for dep in extras["hf"])


def test_hrbench_rotations_without_cycle_category_follow_question_and_image(tmp_path):
    # two different questions share a text ("What colour is thing 0?" on two images): each keeps 4 rotations
    rows = pub.hrbench_rows([("single", R, [R, G, B, Y])]) + pub.hrbench_rows([("cross", G, [G, R, B, Y])])
    for i, row in enumerate(rows):
        row["index"] = i
        del row["cycle_category"]
    pub._parquet(rows, tmp_path / "hr_bench_4k.parquet")
    items = get_benchmark("hrbench_4k").load(tmp_path)
    assert sorted(it.meta["rotation"] for it in items) == ["0", "0", "1", "1", "2", "2", "3", "3"]
    assert "rotation inferred" in items.notes[0]
