"""Rule-based grading and judge-reply parsing."""

import pytest

from vopd.evaluation.judge import parse_judge_reply
from vopd.grading import answer_span, extract_choice, extract_yes_no, grade, grade_open, read_choice, strip_think

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


# --- Replies the rules used to misread (each case failed before the fix) ------------------------

FIVE = ["white", "black", "green", "red", "blue"]


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("答案是D", "D"),
        ("选E", "E"),
        ("根据图像，正确选项是E。", "E"),
        ("我选择B选项", "B"),
        ("选项B正确", "B"),
        ("正确答案为C，因为颜色是绿色。", "C"),
    ],
)
def test_letter_next_to_chinese_text_is_read(reply, letter):
    """CJK characters are word characters to Python's regex, so a letter glued to them was missed."""
    assert extract_choice(reply, FIVE) == letter
    assert grade(reply, letter, "choice", FIVE).correct


@pytest.mark.parametrize(
    "reply, why",
    [
        ("Not C, it is D.", "several_options"),
        ("不是C，是D", "several_options"),
        ("Not C.", "negated"),
        ("It isn't (C).", "negated"),
        ("C is wrong.", "negated"),
        ("It is not red.", "negated"),  # option text negated
        ("C, D", "several_options"),
        ("C or D", "several_options"),
        ("Both D and C", "several_options"),
        ("either A or B", "several_options"),
        ("Neither A nor B", "several_options"),
        ("A and B are both wrong", "several_options"),
        ("A和B都不对", "several_options"),
        ("It is red or blue.", "several_options"),  # two options' texts
    ],
)
def test_negated_or_hedged_reply_is_no_answer(reply, why):
    """A reply naming two options, or negating the one it names, is not an answer: unsettled, so it
    goes to the judge when there is one and is wrong (unparsed) otherwise."""
    assert read_choice(reply, FIVE) == (None, why)
    verdict = grade(reply, "D", "choice", FIVE)
    assert (verdict.correct, verdict.settled, verdict.method) == (False, False, why)


@pytest.mark.parametrize(
    "reply",
    [
        "B is correct",
        "The answer is B, not because of the size.",
        "B. It is black.",
        # a reply that leads with its answer may discuss the other options
        "The correct answer is (B) black. The other options, (A) white, (C) green and (D) red, do not match.",
        "(B) because A is white",
        "The answer is B. Option A is wrong.",
    ],
)
def test_one_option_named_plainly_still_reads(reply):
    assert read_choice(reply, FIVE) == ("B", "choice")


@pytest.mark.parametrize("reply", ["B, but maybe C", "B. Or D.", "B, D", "B is wrong, D is right"])
def test_a_leading_letter_that_is_hedged_or_negated_is_no_answer(reply):
    assert read_choice(reply, FIVE)[0] is None


def test_unclosed_think_holds_no_answer():
    """Reasoning cut off before </think> names letters while thinking; none of them is the answer."""
    assert answer_span("<think>It might be B, let me look again at") == ""
    assert extract_choice("<think>It might be B, let me look again at", FIVE) is None
    assert extract_choice("<think>It might be B</think>\nD", FIVE) == "D"
    assert strip_think("B <think>hmm") == "B "


def test_open_number_rule_settles_only_one_number():
    """'Between 6 and 8, so 7.' named three numbers: it was settled wrong on the first one, so a
    judge never saw it; now it is unsettled, and the no-judge fallback does not credit it."""
    v = grade_open("Between 6 and 8, so 7.", "7")
    assert (v.correct, v.settled) == (False, False)
    assert grade_open("So 7, from 7 rows.", "7").settled  # one number, named twice
    assert grade_open("7 or 8", "7").correct is False


@pytest.mark.parametrize(
    "reply", ["not red but blue", "It is red or blue", "Not red.", "It isn't red", "不是red", "red, maybe blue"]
)
def test_open_fallback_never_credits_negation_or_alternative(reply):
    v = grade_open(reply, "red")
    assert (v.correct, v.settled, v.method) == (False, False, "contains_hedged")


def test_open_fallback_never_credits_another_option():
    v = grade_open("the red one, next to the blue one", "red", ["red", "blue"])
    assert (v.correct, v.settled) == (False, False)
    assert grade_open("the red one", "red", ["red", "blue"]).correct


@pytest.mark.parametrize(
    "reply, said",
    [
        ("<think>I do not see one at first. Looking again, there is a dog.</think> Yes", "yes"),
        ("<think>Yes, a cat? No.</think>\n\nNo, there is none.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is not a dog.", "no"),
    ],
)
def test_pope_reads_the_reply_after_the_reasoning(reply, said):
    """POPE's first-sentence rule read the first sentence of the reasoning under --thinking."""
    v = grade(reply, said, "pope")
    assert (v.correct, v.settled, v.extracted) == (True, True, said)


def test_pope_reply_cut_off_in_reasoning_is_unparsed():
    v = grade("<think>I do not see a dog in the", "no", "pope")
    assert (v.correct, v.settled, v.method) == (False, False, "no_yes_no")
