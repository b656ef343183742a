"""Rule-based grading and judge-reply parsing."""

import pytest

from vopd.evaluation.grading import answer_span, extract_choice, extract_yes_no, grade, grade_open
from vopd.evaluation.judge import parse_judge_reply

OPTIONS = ["white", "black", "green", "red"]


@pytest.mark.parametrize(
    "response, letter",
    [
        ("B", "B"),
        ("(b)", "B"),
        ("**C**", "C"),
        ("B. black", "B"),
        ("(D) red", "D"),
        ("C) green", "C"),
        ("The answer is C.", "C"),
        ("Answer: (D)", "D"),
        ("Final answer: A", "A"),
        ("<think>maybe A or B</think>\n<answer>C</answer>", "C"),
        ("<think>It could be (A)</think> The colour is red, so (D).", "D"),
        ("A cat sits there; I pick option B", "B"),  # the article "A" is not a choice
        ("It is red.", "D"),  # unique option text
        ("\\boxed{B}", "B"),
        ("E", None),  # out of range for four options
        ("I am not sure.", None),
    ],
)
def test_extract_choice_common_forms(response, letter):
    assert extract_choice(response, OPTIONS) == letter


def test_answer_span_prefers_tags_then_markers():
    assert answer_span("blah <answer> 42 </answer>") == "42"
    assert answer_span("Reasoning... Answer: the red one") == "the red one"
    assert answer_span("<think>x</think>plain") == "plain"


@pytest.mark.parametrize(
    "text, word",
    [("Yes.", "yes"), ("yes", "yes"), ("**No**, it is not", "no"), ("Answer: YES", "yes"), ("maybe", None)],
)
def test_extract_yes_no(text, word):
    assert extract_yes_no(text) == word


def test_grade_choice_unsettled_when_no_letter():
    v = grade("I cannot decide", "B", "choice", OPTIONS)
    assert (v.correct, v.settled, v.method) == (False, False, "no_choice")
    v = grade("(b)", "(B)", "choice", OPTIONS)
    assert (v.correct, v.settled, v.extracted) == (True, True, "B")


def test_grade_open_rules():
    assert grade_open("The Red.", "red").settled and grade_open("The Red.", "red").correct
    v = grade_open("There are 3 cars", "3")
    assert (v.correct, v.settled, v.extracted) == (True, True, "3")
    assert grade_open("There are 4 cars", "3").correct is False
    v = grade_open("It looks red to me", "red")  # contained: unsettled, fallback right
    assert (v.correct, v.settled) == (True, False)
    v = grade_open("blue", "red")
    assert (v.correct, v.settled) == (False, False)


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Yes", True),
        ("yes.", True),
        ("**Yes**", True),
        (" YES, because", True),
        ("No.", False),
        ("Answer: no", False),
        ("I think yes", None),
        ("", None),
        ("Yesterday", None),
    ],
)
def test_parse_judge_reply(reply, verdict):
    assert parse_judge_reply(reply) is verdict


@pytest.mark.parametrize("reference", ["B", "(B)", "B.", " b ", "B)", "**B**"])
def test_choice_reference_written_with_punctuation_still_matches(reference):
    verdict = grade("The answer is B.", reference, "choice", OPTIONS)
    assert verdict.settled and verdict.correct
    assert not grade("A", reference, "choice", OPTIONS).correct
