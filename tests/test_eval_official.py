"""`--parse official`: each benchmark's own rule-based reader, quirks included, and the summary naming it."""

import base64
import io
import json
import re

import pytest
from PIL import Image
from support import published as pub
from support.fake_server import FakeChatServer

from vopd.evaluation import BackendConfig, EvalConfig, main_eval
from vopd.evaluation.official import OFFICIAL_READERS, cambrian_answer, mme_rw_answer, mmstar_match
from vopd.evaluation.types import EvalItem

CHOICES = ["(A) red", "(B) green", "(C) blue", "(D) yellow", "(E) white"]


@pytest.mark.parametrize(
    "reply, read",
    [
        ("C", "C"),
        ("The answer is C.", "C"),  # the phrase is stripped
        ("", "A"),  # quirk: an empty reply is contained in every choice, the first one wins
        ("e", "A"),  # quirk: "e" is contained in "(a) red"
        ("Based on the image, the answer is C.", "B"),  # quirk: the first capital A-E anywhere
        ("Best answer: C", "B"),  # quirk: the script's missing comma never strips "Best answer:"
        ("答案是D", "D"),
        ("blue", "C"),  # no capital: the choice containing the reply
        ("Ｄ", ""),  # a full-width letter is no [ABCDE]
        ("<think>Maybe A.</think> C", "A"),  # nothing is stripped
        ("the colour of this square is clearly a kind of blue to me", ""),  # > 10 words, no capital A-E
        ("Not C, it is D.", "C"),
    ],
)
def test_mme_realworld_reader(reply, read):
    assert mme_rw_answer(reply, CHOICES) == read


@pytest.mark.parametrize(
    "reply, right, read",
    [
        ("B", True, "B"),
        ("b", True, "B"),
        ("(B) green", True, "B"),
        ("Option B", True, "B"),
        ("The answer is B", True, "B"),
        ("\n b. green", True, "B"),
        ("Based on the image, C", True, "B"),  # quirk: the first character is compared
        ("the answer is (B)", False, "("),  # the character after the prefix is "("
        ("Answer: B", False, "A"),
        ("", False, None),
        ("(", False, None),
        ("I think B", False, "I"),
    ],
)
def test_mmstar_reader(reply, right, read):
    assert mmstar_match(reply, "B") == (right, read)


@pytest.mark.parametrize(
    "reply, first, whole",
    [
        ("(B) green", "b", "b) green"),
        ("B.", "b", "b"),
        ("Blue", "b", "blue"),  # quirk: CV-Bench keeps the first character only
        ("The answer is (C).", "c", "c"),
        ("Answer: (a)", "a", "a"),
        ("I think it is C", "i", "i think it is c"),
    ],
)
def test_cambrian_reader(reply, first, whole):
    assert cambrian_answer(reply) == first
    assert cambrian_answer(reply, first_char=False) == whole


def _item(benchmark, answer, options, **meta):
    return EvalItem(benchmark, "1", b"", "q", answer, options=options, meta=meta)


def test_cvbench_and_mmvp_readers_follow_cambrian():
    cv = OFFICIAL_READERS["cvbench"]
    assert cv("(B) 3", _item("cvbench", "B", ["2", "3"], source="COCO")).correct
    assert cv("Blue", _item("cvbench", "B", ["red", "blue"], source="ADE20K")).correct  # "b" of "Blue"
    assert not cv("3", _item("cvbench", "B", ["2", "3"], source="COCO")).correct  # letter only
    assert cv("3", _item("cvbench", "B", ["2", "3"], source="Omni3D")).correct  # Omni3D: the option text too
    mmvp = OFFICIAL_READERS["mmvp"]
    assert mmvp("Open", _item("mmvp", "A", ["Open", "Closed"])).correct
    assert mmvp("The answer is (a).", _item("mmvp", "A", ["Open", "Closed"])).correct
    assert not mmvp("a) Open", _item("mmvp", "A", ["Open", "Closed"])).correct  # quirk: the whole reply


def test_pope_reader_reads_the_raw_reply():
    pope = OFFICIAL_READERS["pope"]
    thinking = "<think>I do not see one at first. Looking again, there is.</think> Yes"
    assert pope(thinking, _item("pope", "yes", [])).extracted == "no"  # the first sentence of the reasoning
    assert pope("\nNo", _item("pope", "no", [])).extracted == "yes"  # split on spaces only: "\nNo" is no word
    assert pope("No, there is not.", _item("pope", "no", [])).extracted == "no"


# --- end to end: vopd eval --parse official -------------------------------------------------------

MME_REPLIES = ["A", "Based on the image, the answer is B.", "", "答案是D", "blue"]  # truths: A B A D C
MMSTAR_REPLIES = {"red": "A", "green": "Based on it, the answer is B.", "blue": "(C)", "yellow": "Answer: A"}
POPE_REPLIES = {
    ("red", "red"): "<think>I do not see it at first. Now I do.</think> Yes",
    ("red", "green"): "No.",
    ("blue", "blue"): "Yes",
}


def _colour(body) -> str:
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    return pub.seen_colour(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def scripted(text, body):
    picture = re.search(r"picture (\d+)", text)
    if picture:
        return MME_REPLIES[int(picture.group(1))]
    asked = re.search(r"Is there a (\w+) thing", text)
    if asked:
        return POPE_REPLIES[(_colour(body), asked.group(1))]
    return MMSTAR_REPLIES[_colour(body)]


def _eval(tmp_path, benches, parse):  # POPE's images in tmp_path/coco; the others embed theirs
    with FakeChatServer(scripted) as server:
        backend = BackendConfig(kind="openai", model="m", url=server.url, retries=0, concurrency=2, timeout_s=10)
        out = tmp_path / f"out-{parse}"
        cfg = EvalConfig(
            benchmarks=benches, out_dir=str(out), backend=backend, parse=parse, image_root=str(tmp_path / "coco")
        )
        main_eval(cfg)
    summary = json.loads((out / "summary.json").read_text())
    return summary, {r["benchmark"]: r for r in summary["rows"]}, (out / "summary.md").read_text()


def test_parse_official_reproduces_the_official_rules_end_to_end(tmp_path):
    pytest.importorskip("pyarrow")
    W, R, G, B, Y = "white", "red", "green", "blue", "yellow"
    mme = pub.write_mmerw_lmms(
        tmp_path / "MME-RealWorld-Lmms-eval",
        pub.mmerw_rows([("Perception/Monitoring", W, [R, G, B, Y, W], t) for t in "ABADC"]),
    )
    mmstar = pub.write_mmstar_snapshot(
        tmp_path / "MMStar",
        [(R, [R, G, B, Y], "A"), (G, [R, G, B, Y], "C"), (B, [R, G, B, Y], "C"), (Y, [R, G, B, Y], "D")],
    )
    coco = tmp_path / "coco"
    pope = pub.write_pope_original(
        tmp_path / "POPE", {"adversarial": [(R, R, "yes"), (R, G, "no"), (B, B, "yes")]}, coco
    )
    benches = {"mme_rw_en": str(mme), "mmstar": str(mmstar), "pope": str(pope)}

    summary, rows, table = _eval(tmp_path, benches, "official")
    # MME-RW by eval_your_results.py: A right; "Based ..." reads B (the "B" of "Based"), right by luck;
    # "" reads A, right by the quirk; "答案是D" right; "blue" reads C (the choice containing it) -> 5 of 5
    assert rows["mme_rw_en"]["overall"] == pytest.approx(100.0)
    # MMStar by its exact match: "A" right; "Based ..." compares "b" (truth C): wrong; "(C)" right;
    # "Answer: A" compares "a" (truth D): wrong -> 2 of 4
    assert rows["mmstar"]["overall"] == pytest.approx(50.0)
    # POPE by evaluate.py: the thinking reply reads "no" (its first sentence) -> TP 1, FN 1, TN 1: F1 2/3
    assert rows["pope"]["overall"] == pytest.approx(200 / 3)
    assert summary["settings"]["parse"] == "official"
    assert rows["mmstar"]["parse"].startswith("official: rule (MMStar")
    assert rows["mme_rw_en"]["parse"].startswith("official: rule (MME-RealWorld eval_your_results.py")
    assert "Replies read by (--parse official)" in table
    graded = [
        json.loads(x) for x in (tmp_path / "out-official" / "graded" / "mme_rw_en.jsonl").read_text().splitlines()
    ]
    assert [g["extracted"] for g in graded] == ["A", "B", "A", "D", "C"]
    assert {g["method"] for g in graded} == {"official:mme_rw"}

    # the same replies under vopd's rules: an empty reply is no answer (unparsed); thinking is stripped
    summary, rows, _ = _eval(tmp_path, benches, "vopd")
    assert summary["settings"]["parse"] == "vopd" and rows["mmstar"]["parse"] == "vopd"
    assert rows["mme_rw_en"]["overall"] == pytest.approx(80.0) and rows["mme_rw_en"]["unparsed"] == 1
    assert rows["mmstar"]["overall"] == pytest.approx(50.0)  # A, B (truth C), C, A (truth D)
    assert rows["pope"]["overall"] == pytest.approx(100.0)


def test_parse_official_keeps_vopd_rules_where_there_is_no_official_rule(tmp_path):
    from vopd.evaluation.runner import parse_used

    assert parse_used("vstar", "official").startswith("vopd (no official rule-based scorer: option likelihood")
    assert parse_used("zoombench", "official") == "vopd (no official rule-based scorer: LLM judge)"
    assert parse_used("hrbench_4k", "official").startswith("vopd (no official rule-based scorer: LLM judge")
    assert parse_used("pope", "vopd") == "vopd"
    with pytest.raises(ValueError, match="parse must be one of vopd, official"):
        EvalConfig(benchmarks={"vstar": "x"}, out_dir=str(tmp_path), parse="lenient")


def test_no_judge_zoombench_and_visualprobe_headlines_are_marked_rule_only(tmp_path):
    from support.synthetic import oracle_answer, write_synthetic

    def oracle(text, body):
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        return oracle_answer(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))), text)

    benches = {n: str(write_synthetic(n, tmp_path / n, n=4)) for n in ("zoombench", "visualprobe", "mmstar")}
    with FakeChatServer(oracle) as server:
        backend = BackendConfig(kind="openai", model="m", url=server.url, retries=0, timeout_s=10)
        summary = main_eval(EvalConfig(benchmarks=benches, out_dir=str(tmp_path / "out"), backend=backend))
    rows = {r["benchmark"]: r for r in summary["rows"]}
    for name in ("zoombench", "visualprobe"):
        assert rows[name]["rule_only"] == "rule-only, not comparable to the official judge score"
        assert 0.0 <= rows[name]["rule_settled"] <= 100.0
    assert rows["mmstar"]["rule_only"] is None  # its official scorer is a rule
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| zoombench | " in table and "\\* zoombench: rule-only, not comparable to the official judge score" in table
    assert "\\* visualprobe: rule-only" in table and "\\* mmstar" not in table
