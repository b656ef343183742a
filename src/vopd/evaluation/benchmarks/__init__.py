"""Benchmark registry: a name -> how to load its published files and how to score them.

Every loader takes a local file or folder as published (or ``hf:<dataset id>[:split]`` with
the ``hf`` extra and internet) and returns an :class:`ItemList` of :class:`EvalItem` with the
benchmark's prompt applied (the paper's eval prompt unless another template is named), plus
the files it read and what it left out. Every scorer maps graded items to a dict whose
``overall`` entry is the headline number (a percentage, items without a verdict counted
wrong) and ``judged_overall`` the same over judged items only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vopd.evaluation.benchmarks import cvbench, hrbench, mmerw, mmstar, mmvp, pope, visualprobe, vstar, zoombench
from vopd.evaluation.benchmarks.files import DEFAULT_PROMPT, HUB_EXTRA, BenchmarkFormatError
from vopd.evaluation.types import EvalItem, GradedItem, ItemList  # noqa: F401 (documented above)

__all__ = [
    "BENCHMARKS",
    "DEFAULT_PROMPT",
    "HUB_EXTRA",
    "PAPER_AVERAGE",
    "Benchmark",
    "BenchmarkFormatError",
    "get_benchmark",
]


@dataclass(frozen=True)
class Benchmark:
    """How to read and score one benchmark.

    Attributes:
        name: registry key, also the key of predictions in the JSONL store.
        load: ``load(source, *, seed, prompt, image_root) -> ItemList``.
        score: ``score(graded) -> dict`` with an ``overall`` percentage.
        description: one line for ``--help`` and reports (what the headline number means).
        hub_id: where the published files live, for users with internet.
        prompts: the prompt templates ``load`` accepts; the first (``paper``) is the default.
        scorer: the benchmark's own scorer, in words (what ``--parse official`` follows, or why
            it cannot: an LLM judge, option likelihoods).
        judge_scored: the official score is an LLM judge's: a run without ``--judge`` is marked
            rule-only in the summary (not comparable to the official number).
    """

    name: str
    load: Callable[..., list[EvalItem]]
    score: Callable[[list[GradedItem]], dict[str, Any]]
    description: str
    hub_id: str | None = None
    prompts: tuple[str, ...] = ("paper",)
    scorer: str = ""
    judge_scored: bool = False


MME_RW_SCORER = "rule (MME-RealWorld eval_your_results.py: first capital A-E, else the choice containing the reply)"

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            "vstar",
            vstar.load,
            vstar.score,
            "V* Bench accuracy (direct attributes, relative position)",
            "lmms-lab/vstar-bench",
            vstar.PROMPTS,
            scorer="option likelihood (V*'s vstar_bench_eval.py; no rule on a generated reply)",
        ),
        Benchmark(
            "zoombench",
            zoombench.make_load("zoombench", "full"),
            zoombench.score,
            "ZoomBench accuracy, full image",
            "inclusionAI/ZoomBench",
            zoombench.PROMPTS,
            scorer="LLM judge",
            judge_scored=True,
        ),
        Benchmark(
            "zoombench_crop",
            zoombench.make_load("zoombench_crop", "crop"),
            zoombench.score,
            "ZoomBench accuracy, evidence crop",
            "inclusionAI/ZoomBench",
            zoombench.PROMPTS,
            scorer="LLM judge",
            judge_scored=True,
        ),
        Benchmark(
            "hrbench_4k",
            hrbench.make_load("hrbench_4k"),
            hrbench.score,
            "HR-Bench 4K, mean over 4 option rotations",
            "DreamMr/HR-Bench",
            hrbench.PROMPTS,
            scorer="LLM judge on every reply (HR-Bench's VLMEvalKit fork)",
        ),
        Benchmark(
            "hrbench_8k",
            hrbench.make_load("hrbench_8k"),
            hrbench.score,
            "HR-Bench 8K, mean over 4 option rotations",
            "DreamMr/HR-Bench",
            hrbench.PROMPTS,
            scorer="LLM judge on every reply (HR-Bench's VLMEvalKit fork)",
        ),
        Benchmark(
            "mme_rw_en",
            mmerw.make_load("mme_rw_en", "en"),
            mmerw.score,
            "MME-RealWorld EN (full), accuracy",
            "yifanzhang114/MME-RealWorld-Lmms-eval",
            mmerw.PROMPTS,
            scorer=MME_RW_SCORER,
        ),
        Benchmark(
            "mme_rw_cn",
            mmerw.make_load("mme_rw_cn", "cn"),
            mmerw.score,
            "MME-RealWorld CN (full), accuracy",
            "yifanzhang114/MME-RealWorld-CN-Lmms-eval",
            mmerw.PROMPTS,
            scorer=MME_RW_SCORER,
        ),
        Benchmark(
            "mme_rw_lite",
            mmerw.make_load("mme_rw_lite", "en"),
            mmerw.score,
            "MME-RealWorld Lite, accuracy",
            "yifanzhang114/MME-RealWorld-lite-lmms-eval",
            mmerw.PROMPTS,
            scorer=MME_RW_SCORER,
        ),
        Benchmark(
            "visualprobe",
            visualprobe.load,
            visualprobe.score,
            "VisualProbe, mean over Easy/Medium/Hard (open answers)",
            None,
            visualprobe.PROMPTS,
            scorer="LLM judge",
            judge_scored=True,
        ),
        Benchmark(
            "mmvp",
            mmvp.load,
            mmvp.score,
            "MMVP pair accuracy (both questions of a pair right)",
            "MMVP/MMVP",
            mmvp.PROMPTS,
            scorer="rule (Cambrian-1 mmvp_test.py; the MMVP paper used a GPT-4 grader)",
        ),
        Benchmark(
            "cvbench",
            cvbench.load,
            cvbench.score,
            "CV-Bench, mean of 2D and 3D",
            "nyu-visionx/CV-Bench",
            cvbench.PROMPTS,
            scorer="rule (Cambrian-1 CV-Bench scorers, coco_test.py / omni_test.py)",
        ),
        Benchmark(
            "mmstar",
            mmstar.load,
            mmstar.score,
            "MMStar accuracy",
            "Lin-Chen/MMStar",
            mmstar.PROMPTS,
            scorer="rule (MMStar's exact match: the first character after '(', 'option ' or 'the answer is ')",
        ),
        Benchmark(
            "pope",
            pope.load,
            pope.score,
            "POPE F1 (accuracy, precision, recall, yes-ratio in the details)",
            "lmms-lab/POPE",
            pope.PROMPTS,
            scorer="rule (POPE evaluate.py: first sentence, no/not)",
        ),
    ]
}

#: The paper's 6-benchmark average (Table 1). MME-RW EN and CN are the full splits.
PAPER_AVERAGE = ("vstar", "zoombench", "hrbench_4k", "hrbench_8k", "mme_rw_en", "mme_rw_cn")


class UnknownBenchmarkError(KeyError, ValueError):
    """A benchmark name not in `BENCHMARKS`: a lookup miss (KeyError) that is the user's input (ValueError)."""

    def __str__(self) -> str:  # KeyError's str() quotes the message; this is a sentence
        return str(self.args[0]) if self.args else ""


def get_benchmark(name: str) -> Benchmark:
    """Look up a benchmark, with the list of valid names in the error."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UnknownBenchmarkError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}") from None
