"""Resumable evaluation: predictions stream to JSONL, reruns skip what is done.

Every answer is appended (and flushed) to one JSONL file as soon as its batch returns, keyed by
``(benchmark, view, item id)``. A rerun reads the file, asks the backend only for items with
no answer yet or whose last attempt failed, and grades everything from the file. Grading is
cheap and deterministic, so it is redone on every run; judge verdicts are cached in their own
log (see :mod:`vopd.evaluation.judge`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vopd.evaluation.backends import Backend, BackendConfig, BackendError, PartialFailure, make_backend
from vopd.evaluation.benchmarks import get_benchmark
from vopd.evaluation.grading import grade
from vopd.evaluation.judge import JudgeConfig, LLMJudge
from vopd.evaluation.types import EvalItem, GradedItem, PromptItem

__all__ = [
    "EvalConfig",
    "PredictionStore",
    "evaluate_benchmark",
    "grade_items",
    "main_eval",
    "predict",
]

log = logging.getLogger(__name__)


class PredictionStore:
    """Append-only JSONL of answers; the last record for a key wins."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records: dict[tuple[str, str, str], dict[str, Any]] = {}
        if self.path.is_file():
            _end_with_newline(self.path)
            for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    # A run killed mid-write leaves a partial last line: drop it, redo that item.
                    log.warning("%s:%d: unreadable line skipped (interrupted write?)", self.path, n)
                    continue
                self._records[(rec["benchmark"], rec["view"], str(rec["id"]))] = rec

    def get(self, benchmark: str, view: str, item_id: str) -> dict[str, Any] | None:
        return self._records.get((benchmark, view, str(item_id)))

    def answer(self, benchmark: str, view: str, item_id: str) -> str | None:
        """The stored answer, or ``None`` if missing or failed."""
        rec = self.get(benchmark, view, item_id)
        return rec["prediction"] if rec and rec.get("error") is None else None

    def add(self, benchmark: str, view: str, item_id: str, prediction: str | None, error: str | None = None) -> None:
        rec = {"benchmark": benchmark, "view": view, "id": str(item_id), "prediction": prediction,
               "error": error, "time": round(time.time(), 3)}
        self._records[(benchmark, view, str(item_id))] = rec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _end_with_newline(path: Path) -> None:
    """A run killed mid-write leaves a last line without newline; close it so appends stay separate."""
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def default_prompt(item: EvalItem) -> PromptItem:
    """The item's own image and prompt."""
    return PromptItem(id=item.id, image=item.open_image(), text=item.prompt)


def predict(
    items: Sequence[EvalItem],
    backend: Backend,
    store: PredictionStore,
    *,
    view: str = "default",
    batch_size: int = 8,
    to_prompt: Callable[[EvalItem], PromptItem] = default_prompt,
    max_failed_batches: int = 3,
) -> dict[str, str | None]:
    """Answer every item not answered yet; returns ``id -> answer`` (``None`` if it failed).

    Images are opened batch by batch. A batch that raises is recorded as failed (and retried on
    the next run); after ``max_failed_batches`` consecutive wholly failed batches the backend
    is considered down and :class:`BackendError` is raised.
    """
    pending = [it for it in items if store.answer(it.benchmark, view, it.id) is None]
    failed_in_a_row = 0
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        try:
            answers: list[str | None] = list(backend.generate([to_prompt(it) for it in chunk]))
            errors: list[str | None] = [None] * len(chunk)
        except PartialFailure as err:
            answers, errors = err.results, err.errors
        except Exception as err:  # a batch must not lose the answers already stored
            answers, errors = [None] * len(chunk), [f"{type(err).__name__}: {err}"] * len(chunk)
        if len(answers) != len(chunk):
            raise BackendError(f"backend returned {len(answers)} answers for {len(chunk)} prompts")
        for it, ans, err_text in zip(chunk, answers, errors):
            store.add(it.benchmark, view, it.id, ans, None if ans is not None else (err_text or "no answer"))
        failed_in_a_row = failed_in_a_row + 1 if all(a is None for a in answers) else 0
        if failed_in_a_row >= max_failed_batches:
            raise BackendError(f"{failed_in_a_row} batches in a row failed; last error: {errors[0]}")
    return {it.id: store.answer(it.benchmark, view, it.id) for it in items}


def grade_items(
    items: Sequence[EvalItem],
    predictions: dict[str, str | None],
    *,
    judge: LLMJudge | None = None,
) -> list[GradedItem]:
    """Rules first; unsettled items go to the judge if there is one, else the rule's fallback.

    Items without a prediction and items the judge could not decide are unjudged (``None``).
    """
    graded: list[GradedItem | None] = []
    to_judge: list[tuple[int, EvalItem, str]] = []
    for it in items:
        pred = predictions.get(it.id)
        if pred is None:
            graded.append(GradedItem(it, None, None, "no_prediction"))
            continue
        verdict = grade(pred, it.answer, it.kind, it.options)
        if verdict.settled or judge is None:
            method = verdict.method if verdict.settled else f"rule_fallback:{verdict.method}"
            graded.append(GradedItem(it, pred, verdict.correct, method, verdict.extracted))
        else:
            to_judge.append((len(graded), it, pred))
            graded.append(None)
    if to_judge and judge is not None:
        requests = [(it.id, it.question or it.prompt, _reference(it), pred) for _, it, pred in to_judge]
        for (pos, it, pred), v in zip(to_judge, judge.judge_many(requests)):
            graded[pos] = GradedItem(it, pred, v.correct, "judge" if v.correct is not None else "unjudged", None)
    return [g for g in graded if g is not None]


def _reference(item: EvalItem) -> str:
    """The answer as the judge should read it: for choices, the letter and its option text."""
    if item.kind == "choice" and item.options:
        idx = "ABCDEFGH".find(item.answer)
        if 0 <= idx < len(item.options):
            return f"({item.answer}) {item.options[idx]}"
    return item.answer


@dataclass
class EvalConfig:
    """What ``vopd eval`` runs.

    Attributes:
        benchmarks: benchmark name -> local file/folder (or ``hf:<id>[:split]``).
        out_dir: predictions.jsonl, graded/*.jsonl, judge.jsonl and the summary land here.
        backend: the model that answers.
        judge: optional judge for open answers the rules cannot settle.
        limit: evaluate only the first N items of each benchmark (smoke tests).
        seed: seed for option shuffles (V* original layout).
        label: model name shown in tables and plots.
    """

    benchmarks: dict[str, str]
    out_dir: str
    backend: BackendConfig = field(default_factory=BackendConfig)
    judge: JudgeConfig | None = None
    limit: int | None = None
    seed: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ValueError("no benchmarks given; pass at least one name=path")
        for name in self.benchmarks:
            get_benchmark(name)  # raises with the valid names
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class BenchmarkResult:
    """Scores of one benchmark plus the graded items behind them."""

    name: str
    scores: dict[str, Any]
    graded: list[GradedItem]


def evaluate_benchmark(
    name: str,
    source: str,
    backend: Backend,
    store: PredictionStore,
    *,
    batch_size: int = 8,
    judge: LLMJudge | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> BenchmarkResult:
    """Load, answer (resuming), grade and score one benchmark."""
    bench = get_benchmark(name)
    items = bench.load(source, seed=seed)
    if limit is not None:
        items = items[:limit]
    predictions = predict(items, backend, store, view="default", batch_size=batch_size)
    graded = grade_items(items, predictions, judge=judge)
    return BenchmarkResult(name, bench.score(graded), graded)


def write_graded(result: BenchmarkResult, path: Path) -> None:
    """One line per item: id, answer, prediction, extracted, correct, method."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for g in result.graded:
            f.write(json.dumps({"id": g.item.id, "answer": g.item.answer, "prediction": g.prediction,
                                "extracted": g.extracted, "correct": g.correct, "method": g.method,
                                "category": g.item.category}, ensure_ascii=False) + "\n")


def main_eval(cfg: EvalConfig, *, backend: Backend | None = None) -> dict[str, Any]:
    """Run every benchmark in ``cfg`` and write the summary (Markdown, JSON, PNG).

    ``backend`` overrides ``cfg.backend`` (an already loaded model). Returns the summary dict.
    """
    from vopd.evaluation.report import summarize, write_summary

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = backend or make_backend(cfg.backend)
    store = PredictionStore(out / "predictions.jsonl")
    judge = LLMJudge(cfg.judge, out / "judge.jsonl") if cfg.judge else None
    results = {}
    for name, source in cfg.benchmarks.items():
        result = evaluate_benchmark(name, source, backend, store, batch_size=cfg.backend.batch_size,
                                    judge=judge, limit=cfg.limit, seed=cfg.seed)
        write_graded(result, out / "graded" / f"{name}.jsonl")
        results[name] = result.scores
        log.info("%s: %s", name, result.scores.get("overall"))
    summary = summarize(results, label=cfg.label or cfg.backend.model,
                        settings={"backend": asdict(cfg.backend), "judge": cfg.judge.model if cfg.judge else None,
                                  "limit": cfg.limit, "seed": cfg.seed})
    write_summary(summary, out)
    return summary
