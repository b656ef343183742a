"""Evaluation: the regional-to-global gap (`vopd gap`) and benchmarks (`vopd eval`).

- :mod:`.gap`: :func:`measure_gap`, :func:`main_gap` (views, paired CI, McNemar, plots)
- :mod:`.runner`: resumable predictions, grading, :func:`main_eval`
- :mod:`.benchmarks`: loaders and scorers for the published formats
- :mod:`.grading` / :mod:`.judge`: rules first, then an optional LLM judge
- :mod:`.backends`: a local HF model or an OpenAI-compatible server
- :mod:`.stats` / :mod:`.metrics` / :mod:`.report`: arithmetic, tables and pictures
"""

from vopd.evaluation.backends import Backend, BackendConfig, HFBackend, OpenAIBackend, make_backend
from vopd.evaluation.judge import JudgeConfig, LLMJudge
from vopd.evaluation.runner import EvalConfig, PredictionStore, grade_items, main_eval, predict
from vopd.evaluation.types import EvalItem, GradedItem, PromptItem
from vopd.grading import Verdict, grade

__all__ = [
    "Backend",
    "BackendConfig",
    "EvalConfig",
    "EvalItem",
    "GradedItem",
    "HFBackend",
    "JudgeConfig",
    "LLMJudge",
    "OpenAIBackend",
    "PredictionStore",
    "PromptItem",
    "Verdict",
    "grade",
    "grade_items",
    "main_eval",
    "make_backend",
    "predict",
]
