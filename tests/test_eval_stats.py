"""Paired statistics and metric arithmetic against hand-computed values."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from vopd.evaluation.benchmarks import cvbench, hrbench, mmvp, pope
from vopd.evaluation.metrics import accuracy, pair_accuracy
from vopd.evaluation.stats import mcnemar_exact, paired_bootstrap_ci, paired_table, wilson_interval
from vopd.evaluation.types import EvalItem, GradedItem


def _g(correct, *, answer="A", category=None, extracted=None, **meta):
    item = EvalItem("b", str(id(meta)), b"", "", answer, category=category, meta=meta)
    return GradedItem(
        item,
        "x" if correct is not None else None,
        correct,
        "test",
        extracted,
        status="graded" if correct is not None else "failed",
    )


@pytest.mark.parametrize("b, c", [(0, 0), (3, 0), (5, 2), (10, 10), (1, 12)])
def test_mcnemar_exact_matches_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_by_hand():
    # 0 vs 3 discordant: p = 2 * (1/2)^3 = 0.25
    assert mcnemar_exact(0, 3) == pytest.approx(0.25)


def test_paired_table_and_bootstrap():
    a = [1, 1, 0, 0, 1, 0, 0, 0]
    b = [1, 1, 1, 1, 0, 1, 0, 1]
    t = paired_table(a, b)
    assert (t.both_right, t.only_a_right, t.only_b_right, t.both_wrong) == (2, 1, 4, 1)
    diff, lo, hi = paired_bootstrap_ci(a, b, n_boot=4000, seed=1)
    assert diff == pytest.approx((6 - 3) / 8)
    assert lo <= diff <= hi
    # bootstrap standard error of a mean of d in {-1,0,1}: sd(d)/sqrt(n); the 95% interval is ~ +-1.96 se
    d = np.array(b) - np.array(a)
    se = d.std() / math.sqrt(len(d))
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert paired_bootstrap_ci(a, b, n_boot=4000, seed=1) == (diff, lo, hi)  # seeded


def test_bootstrap_identical_views_has_zero_width():
    a = [1, 0, 1, 1, 0]
    assert paired_bootstrap_ci(a, a, n_boot=500) == (0.0, 0.0, 0.0)


def test_wilson_by_hand():
    lo, hi = wilson_interval(8, 10)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))


def test_accuracy_counts_failed_as_wrong_and_reports_judged_only():
    # the official scripts count a missing answer as wrong: 2 right of 4, not of the 3 answered
    acc = accuracy([_g(True), _g(False), _g(None), _g(True)])
    assert acc == {
        "accuracy": pytest.approx(50.0),
        "judged_accuracy": pytest.approx(200 / 3),
        "n": 4,
        "judged": 3,
        "correct": 2,
        "unjudged": 1,
        "failed": 1,
        "judge_failed": 0,
        "unparsed": 0,
    }


def test_hrbench_mean_over_rotations_by_hand():
    # rotation 0: single 2/2, cross 0/2 -> 50 ; rotation 1: single 1/2, cross 1/2 -> 50
    # rotation 2: single 2/2, cross 2/2 -> 100 ; rotation 3: single 0/2, cross 1/2 -> 25
    table = {"0": ([1, 1], [0, 0]), "1": ([1, 0], [1, 0]), "2": ([1, 1], [1, 1]), "3": ([0, 0], [1, 0])}
    graded = [
        _g(bool(v), category=cat, rotation=r)
        for r, (s, c) in table.items()
        for cat, vals in (("single", s), ("cross", c))
        for v in vals
    ]
    out = hrbench.score(graded)
    assert out["overall"] == pytest.approx((50 + 50 + 100 + 25) / 4)
    assert out["groups"]["FSP (single)"] == pytest.approx((100 + 50 + 100 + 0) / 4)
    assert out["groups"]["FCP (cross)"] == pytest.approx((0 + 50 + 100 + 50) / 4)


def test_mmvp_pairs_by_hand():
    # pairs: (T, T) right, (T, F) wrong, (F, F) wrong, (T, None) unjudged -> wrong in the headline
    vals = [True, True, True, False, False, False, True, None]
    graded = [_g(v, pair=i // 2) for i, v in enumerate(vals)]
    out = mmvp.score(graded)
    assert out["overall"] == pytest.approx(100 / 4)
    assert out["judged_overall"] == pytest.approx(100 / 3)
    assert out["pairs"]["unjudged"] == 1 and out["pairs"]["n"] == 4
    assert out["questions"]["accuracy"] == pytest.approx(400 / 8)
    assert out["questions"]["judged_accuracy"] == pytest.approx(400 / 7)
    with pytest.raises(ValueError, match="single question"):
        pair_accuracy(graded[:3], lambda g: g.item.meta["pair"])


def test_pope_by_hand():
    # truth/prediction: TP=3, FP=1, TN=2, FN=2, plus one failed request whose truth is yes:
    # a missing answer is wrong, so it is one more false negative in the headline
    rows = [("yes", "yes")] * 3 + [("no", "yes")] + [("no", "no")] * 2 + [("yes", "no")] * 2
    graded = [_g(t == p, answer=t, extracted=p, category="random") for t, p in rows]
    graded.append(_g(None, answer="yes", extracted=None, category="random"))
    out = pope.score(graded)
    precision, recall = 3 / 4, 3 / 6
    assert out["accuracy"] == pytest.approx(100 * 5 / 9)
    assert out["precision"] == pytest.approx(100 * precision)
    assert out["recall"] == pytest.approx(100 * recall)
    assert out["f1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    assert out["overall"] == out["f1"]
    judged_p, judged_r = 3 / 4, 3 / 5  # the answered items only
    assert out["judged_f1"] == pytest.approx(100 * 2 * judged_p * judged_r / (judged_p + judged_r))
    assert out["judged_accuracy"] == pytest.approx(100 * 5 / 8)
    assert out["yes_ratio"] == pytest.approx(100 * 4 / 8)  # predicted yes among replies, not ground truth (5/8)
    assert out["unjudged"] == 1 and out["failed"] == 1 and out["splits"]["random"]["f1"] == out["f1"]


def test_cvbench_2d_is_mean_over_sources():
    graded = (
        [_g(True, category="2D", source="ADE20K")] * 1
        + [_g(False, category="2D", source="ADE20K")] * 3
        + [_g(True, category="2D", source="COCO")] * 1
        + [_g(True, category="3D", source="Omni3D")] * 3
        + [_g(False, category="3D", source="Omni3D")]
    )
    out = cvbench.score(graded)
    assert out["2D"] == pytest.approx((25 + 100) / 2)
    assert out["3D"] == pytest.approx(75)
    assert out["overall"] == pytest.approx((62.5 + 75) / 2)
