"""Resumable evaluation: predictions stream to JSONL, reruns skip what is done.

Every answer is appended (and flushed) to one JSONL file as soon as its batch returns, keyed by
``(benchmark, view, item key)`` where the item key is the source file or configuration plus the
item's id (so ids repeated across files never collide). A rerun reads the file, asks the backend
only for items with no answer yet or whose last attempt failed, and grades everything from the
file. Grading is cheap and deterministic, so it is redone on every run; judge verdicts are cached
in their own log (see :mod:`vopd.evaluation.judge`).

Items whose request failed, or whose judge failed, count as wrong in every headline score (as
in the official scripts); the summary gives their counts and the judged-only score beside it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vopd.evaluation.backends import Backend, BackendConfig, BackendError, PartialFailure, make_backend
from vopd.evaluation.benchmarks import DEFAULT_PROMPT, get_benchmark
from vopd.evaluation.judge import JudgeConfig, LLMJudge
from vopd.evaluation.metrics import outcome_counts
from vopd.evaluation.official import OFFICIAL_READERS, OfficialReader
from vopd.evaluation.types import EvalItem, GradedItem, PromptItem
from vopd.grading import UNPARSED_METHODS, grade
from vopd.images import check_model_shape
from vopd.jsonl import append_record, end_with_newline, read_records
from vopd.outputs import claim_output, weights_fingerprint

__all__ = [
    "PARSES",
    "RULE_ONLY",
    "EVAL_OUTPUTS",
    "EvalConfig",
    "PredictionStore",
    "answer_settings",
    "evaluate_benchmark",
    "grade_items",
    "main_eval",
    "predict",
]

log = logging.getLogger(__name__)

#: ``--parse`` choices: vopd's rules, or each benchmark's official rule where it has one.
PARSES = ("vopd", "official")


#: What ``vopd eval`` writes in its output folder (``--overwrite`` removes these).
EVAL_OUTPUTS = ("predictions.jsonl", "judge.jsonl", "graded", "summary.json", "summary.md", "summary.png")


def answer_settings(backend: BackendConfig, judge: JudgeConfig | None = None) -> dict[str, Any]:
    """What determines a cached answer besides the question: the model (path and a fingerprint
    of its weights, or the served name), the token budget, the thinking switch, the
    dtype, and the judge when there is one (see `vopd.outputs.claim_output`)."""
    local = backend.kind == "hf" and bool(backend.model) and Path(backend.model).exists()
    out: dict[str, Any] = {
        "backend": backend.kind,
        "model": str(Path(backend.model).resolve()) if local else backend.model,
        "max_new_tokens": backend.max_new_tokens,
        "thinking": backend.thinking,
    }
    # A server's model is its served name: the URL is left out, so a server restarted on another
    # port still resumes (and a rerun to retry failed requests works after a restart).
    if backend.kind == "hf":
        out.update(model_weights=weights_fingerprint(backend.model) if backend.model else "", dtype=backend.dtype)
    if judge is not None:
        out["judge"] = f"{judge.model} @ {_without_credentials(judge.url)}"
    return out


class PredictionStore:
    """Append-only JSONL of answers; the last record for a key wins.

    Lines that are not complete records (a kill mid-write, ``{}``, hand edits) are skipped with
    a warning naming file and line; their items are asked again.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._records: dict[tuple[str, str, str], dict[str, Any]] = {}
        if self.path.is_file():
            end_with_newline(self.path)
            for rec in read_records(self.path, ("benchmark", "view", "id", "prediction")):
                self._records[(str(rec["benchmark"]), str(rec["view"]), str(rec["id"]))] = rec

    def get(self, benchmark: str, view: str, item_id: str) -> dict[str, Any] | None:
        return self._records.get((benchmark, view, str(item_id)))

    def answer(self, benchmark: str, view: str, item_id: str) -> str | None:
        """The stored answer, or ``None`` if missing or failed."""
        rec = self.get(benchmark, view, item_id)
        if not rec or rec.get("error") is not None or not isinstance(rec.get("prediction"), str):
            return None
        return rec["prediction"]

    def add(self, benchmark: str, view: str, item_id: str, prediction: str | None, error: str | None = None) -> None:
        rec = {
            "benchmark": benchmark,
            "view": view,
            "id": str(item_id),
            "prediction": prediction,
            "error": error,
            "time": round(time.time(), 3),
        }
        self._records[(benchmark, view, str(item_id))] = rec
        append_record(self.path, rec)


def default_prompt(item: EvalItem) -> PromptItem:
    """The item's own image and prompt."""
    return PromptItem(id=item.key, image=item.open_image(), text=item.prompt)


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
    """Answer every item not answered yet; returns ``item.key -> answer`` (``None`` if it failed).

    Images are opened batch by batch. Failed items are recorded with their error (and retried
    on the next run): an unreadable image or one failed request fails its item only; after
    ``max_failed_batches`` consecutive wholly failed batches the backend
    is considered down and :class:`BackendError` is raised.
    """
    _check_unique(items)
    pending = [it for it in items if store.answer(it.benchmark, view, it.key) is None]
    failed_in_a_row = 0
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        answers, errors, asked = _answer_chunk(chunk, backend, to_prompt)
        for it, ans, err_text in zip(chunk, answers, errors):
            store.add(it.benchmark, view, it.key, ans, None if ans is not None else (err_text or "no answer"))
        if asked:  # only batches the backend saw say whether it is down
            failed_in_a_row = failed_in_a_row + 1 if all(a is None for a in answers) else 0
        if failed_in_a_row >= max_failed_batches:
            raise BackendError(f"{failed_in_a_row} batches in a row failed; last error: {errors[0]}")
    return {it.key: store.answer(it.benchmark, view, it.key) for it in items}


def _answer_chunk(
    chunk: Sequence[EvalItem],
    backend: Backend,
    to_prompt: Callable[[EvalItem], PromptItem],
) -> tuple[list[str | None], list[str | None], int]:
    """Answers, errors and the number of prompts sent, for one batch. An item whose prompt cannot
    be built (an unreadable image) fails alone; a backend error fails only the items it names."""
    answers: list[str | None] = [None] * len(chunk)
    errors: list[str | None] = [None] * len(chunk)
    prompts, positions = [], []
    for i, it in enumerate(chunk):
        try:
            prompt = to_prompt(it)
            if isinstance(prompt.image, Image.Image):  # one unusable image fails its item, not the batch
                check_model_shape(prompt.image.size, where=f"{it.benchmark} item {it.id}")
            prompts.append(prompt)
            positions.append(i)
        except Exception as err:  # noqa: BLE001 - recorded per item, retried next run
            errors[i] = f"{type(err).__name__}: {err}"
    if not prompts:
        return answers, errors, 0
    try:
        got: list[str | None] = list(backend.generate(prompts))
        got_errors: list[str | None] = [None] * len(prompts)
    except PartialFailure as err:
        got, got_errors = list(err.results), list(err.errors)
    except Exception as err:  # a batch must not lose the answers already stored
        got, got_errors = [None] * len(prompts), [f"{type(err).__name__}: {err}"] * len(prompts)
    if len(got) != len(prompts):
        raise BackendError(f"backend returned {len(got)} answers for {len(prompts)} prompts")
    for pos, ans, err_text in zip(positions, got, got_errors):
        answers[pos], errors[pos] = ans, err_text
    return answers, errors, len(prompts)


def _check_unique(items: Sequence[EvalItem]) -> None:
    """Two items with one key would share one stored answer: refuse, naming them."""
    counts = Counter((it.benchmark, it.key) for it in items)
    dupes = [f"{b}:{k}" for (b, k), c in counts.items() if c > 1]
    if dupes:
        raise ValueError(
            f"{len(dupes)} item keys occur twice (first: {dupes[:3]}); each item needs its own "
            "(source, id): check that the folder does not hold the same table twice"
        )


def grade_items(
    items: Sequence[EvalItem],
    predictions: dict[str, str | None],
    *,
    judge: LLMJudge | None = None,
    reader: OfficialReader | None = None,
) -> list[GradedItem]:
    """Rules first; unsettled items go to the judge if there is one, else the rule's fallback.

    ``predictions`` maps ``item.key`` to the answer. Items without a prediction get status
    ``failed``, items the judge could not decide ``judge_failed`` (both ``correct=None``);
    replies from which no answer could be read, without a judge, are wrong with status
    ``unparsed``. With ``reader`` (a benchmark's official rule, :mod:`vopd.evaluation.official`)
    every reply is read by it instead, and no judge is asked: the official rule settles all.
    """
    graded: list[GradedItem | None] = []
    to_judge: list[tuple[int, EvalItem, str]] = []
    for it in items:
        pred = predictions.get(it.key)
        if pred is None:
            graded.append(GradedItem(it, None, None, "no_prediction", status="failed"))
            continue
        verdict = reader(pred, it) if reader is not None else grade(pred, it.answer, it.kind, it.options)
        if reader is not None and not verdict.extracted:  # the official rule read nothing: wrong, as there
            graded.append(GradedItem(it, pred, verdict.correct, verdict.method, None, status="unparsed"))
        elif verdict.settled or judge is None:
            method = verdict.method if verdict.settled else f"rule_fallback:{verdict.method}"
            # no single option / yes-no word could be read (an open answer that does not match is just wrong)
            unparsed = not verdict.settled and verdict.method in UNPARSED_METHODS
            graded.append(
                GradedItem(
                    it, pred, verdict.correct, method, verdict.extracted, status="unparsed" if unparsed else "graded"
                )
            )
        else:
            to_judge.append((len(graded), it, pred))
            graded.append(None)
    if to_judge and judge is not None:
        requests = [(it.key, it.question or it.prompt, _reference(it), pred) for _, it, pred in to_judge]
        for (pos, it, pred), v in zip(to_judge, judge.judge_many(requests)):
            ok = v.correct is not None
            graded[pos] = GradedItem(
                it, pred, v.correct, "judge" if ok else "unjudged", None, status="graded" if ok else "judge_failed"
            )
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
        prompts: benchmark name -> prompt template; unnamed benchmarks use ``paper`` (the
            paper's eval prompt). The templates of each are in ``BENCHMARKS[name].prompts``.
        image_root: folder that relative image paths start from (MME-RW JSON, POPE original
            files, CV-Bench JSONL, ...), instead of each data file's own folder.
        parse: ``vopd`` (default): vopd's rules read every reply (:mod:`vopd.grading`);
            ``official``: each benchmark with an official rule-based scorer reads its replies
            with that rule, quirks included (:mod:`vopd.evaluation.official`); the others keep
            vopd's rules. The summary names the parse behind every number.
        overwrite: remove the earlier ``vopd eval`` output in ``out_dir`` first; without it a
            rerun resumes only when every setting that determines an answer matches.
    """

    benchmarks: dict[str, str]
    out_dir: str
    backend: BackendConfig = field(default_factory=BackendConfig)
    judge: JudgeConfig | None = None
    limit: int | None = None
    seed: int = 0
    label: str = ""
    prompts: dict[str, str] = field(default_factory=dict)
    image_root: str | None = None
    parse: str = "vopd"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not str(self.out_dir).strip():  # Path("") is ".": results would land in the current folder
            raise ValueError("out_dir is empty: name an output folder, e.g. --out runs/eval1")
        if self.parse not in PARSES:
            raise ValueError(f"parse must be one of {', '.join(PARSES)}, got {self.parse!r}")
        if not self.benchmarks:
            raise ValueError("no benchmarks given; pass at least one name=path")
        for name in self.benchmarks:
            get_benchmark(name)  # raises with the valid names
        for name, template in self.prompts.items():
            if name not in self.benchmarks:
                raise ValueError(f"prompt template given for {name!r}, which is not evaluated")
            choices = get_benchmark(name).prompts
            if template not in choices:
                raise ValueError(f"{name}: unknown prompt template {template!r}; choose from {', '.join(choices)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class BenchmarkResult:
    """Scores of one benchmark, the graded items behind them, and what was read."""

    name: str
    scores: dict[str, Any]
    graded: list[GradedItem]
    files: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


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
    prompt: str = DEFAULT_PROMPT,
    image_root: str | None = None,
    parse: str = "vopd",
) -> BenchmarkResult:
    """Load, answer (resuming), grade and score one benchmark.

    The scores carry, beside the benchmark's own numbers, ``n_items``, the counts of
    ``failed``, ``judge_failed`` and ``unparsed`` items, their ``failure_causes``, the
    ``parse`` that read the replies, and for a judge-scored benchmark graded without a judge
    ``rule_only`` with the share of items a rule settled (``rule_settled``, percent).
    """
    bench = get_benchmark(name)
    loaded = bench.load(source, seed=seed, prompt=prompt, image_root=image_root)
    files = dict(getattr(loaded, "files", {}))
    notes = list(getattr(loaded, "notes", []))
    items = list(loaded)
    if limit is not None and limit < len(items):
        notes.append(f"--limit {limit}: {limit} of {len(items)} items evaluated")
        items = items[:limit]
    predictions = predict(items, backend, store, view="default", batch_size=batch_size)
    reader = OFFICIAL_READERS.get(name) if parse == "official" else None
    graded = grade_items(items, predictions, judge=judge, reader=reader)
    scores = dict(bench.score(graded))
    causes = failure_causes(graded, store)
    scores.update({"n_items": len(graded), **outcome_counts(graded), "prompt": prompt, "failure_causes": causes})
    scores["parse"] = parse_used(name, parse)
    if bench.judge_scored and judge is None:
        settled = sum(g.status == "graded" and not g.method.startswith("rule_fallback") for g in graded)
        scores["rule_only"] = RULE_ONLY
        scores["rule_settled"] = 100.0 * settled / len(graded) if graded else None
    return BenchmarkResult(name, scores, graded, files, notes)


#: The mark on a judge-scored benchmark's headline when no judge was used.
RULE_ONLY = "rule-only, not comparable to the official judge score"


def parse_used(name: str, parse: str) -> str:
    """What read the replies of benchmark ``name`` under ``--parse parse``, in words."""
    scorer = get_benchmark(name).scorer
    if parse != "official":
        return "vopd"
    if name in OFFICIAL_READERS:
        return f"official: {scorer}"
    return f"vopd (no official rule-based scorer: {scorer})"


#: Why items got no verdict, and what fixes the cause (the console names it for the largest group).
FAILURE_FIXES = {
    "image not found": "pass --image-root (the folder the relative image paths start from, e.g. COCO's "
    "val2014/ for POPE's original files); without it they are looked up beside the data file",
    "image unreadable": "the image files are damaged or not images; the errors in predictions.jsonl name them",
    "request failed": "rerun the same command to retry them (check --url, --timeout and the server's log)",
    "judge failed": "rerun the same command to judge them again (check --judge-url and --judge-model)",
}


def classify_failure(error: str | None) -> str:
    """The cause of a failed item from its stored error: image not found / unreadable, or the request."""
    text = error or ""
    if text.startswith("ImageError"):
        return "image not found" if "no such file" in text else "image unreadable"
    return "request failed"


def failure_causes(graded: Sequence[GradedItem], store: PredictionStore) -> dict[str, int]:
    """Items without a verdict counted by cause (only causes that occurred, largest first)."""
    counts: Counter[str] = Counter()
    for g in graded:
        if g.status == "failed":
            rec = store.get(g.item.benchmark, "default", g.item.key) or {}
            counts[classify_failure(rec.get("error"))] += 1
        elif g.status == "judge_failed":
            counts["judge failed"] += 1
    return dict(counts.most_common())


def write_graded(result: BenchmarkResult, path: Path) -> None:
    """One line per item: id, answer, prediction, extracted, correct, method."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for g in result.graded:
            f.write(
                json.dumps(
                    {
                        "key": g.item.key,
                        "source": g.item.source,
                        "id": g.item.id,
                        "answer": g.item.answer,
                        "prediction": g.prediction,
                        "extracted": g.extracted,
                        "correct": g.correct,
                        "status": g.status,
                        "method": g.method,
                        "category": g.item.category,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )


def main_eval(cfg: EvalConfig, *, backend: Backend | None = None) -> dict[str, Any]:
    """Run every benchmark in ``cfg`` and write the summary (Markdown, JSON, PNG).

    ``backend`` overrides ``cfg.backend`` (an already loaded model). Returns the summary dict;
    its ``failures`` entry counts the items without a verdict (failed requests and failed
    judgements), which the headline scores count as wrong.
    """
    from vopd.evaluation.report import summarize, write_summary

    out = Path(cfg.out_dir)
    settings = answer_settings(cfg.backend, cfg.judge)
    for name in cfg.benchmarks:  # the prompt template, option shuffle and image folder change the answers
        settings.update(
            {
                f"{name}.prompt": cfg.prompts.get(name, DEFAULT_PROMPT),
                f"{name}.seed": cfg.seed,
                f"{name}.image_root": cfg.image_root,
            }
        )
    claim_output(out, command="vopd eval", owned=EVAL_OUTPUTS, overwrite=cfg.overwrite, settings=settings)
    backend = backend or make_backend(cfg.backend)
    store = PredictionStore(out / "predictions.jsonl")
    judge = LLMJudge(cfg.judge, out / "judge.jsonl") if cfg.judge else None
    results, sources = {}, {}
    for name, source in cfg.benchmarks.items():
        result = evaluate_benchmark(
            name,
            source,
            backend,
            store,
            batch_size=cfg.backend.batch_size,
            judge=judge,
            limit=cfg.limit,
            seed=cfg.seed,
            prompt=cfg.prompts.get(name, DEFAULT_PROMPT),
            image_root=cfg.image_root,
            parse=cfg.parse,
        )
        write_graded(result, out / "graded" / f"{name}.jsonl")
        results[name] = result.scores
        sources[name] = {"path": source, "files": result.files, "notes": result.notes}
        for note in result.notes:
            log.info("%s: %s", name, note)  # also listed in summary.md and summary.json
        log.info("%s: %s", name, result.scores.get("overall"))
    summary = summarize(results, label=cfg.label or cfg.backend.model, settings=_settings(cfg))
    summary["sources"] = sources
    write_summary(summary, out)
    return summary


def _settings(cfg: EvalConfig) -> dict[str, Any]:
    """What ran, for the summary: never a key, and not the key variable's name either.

    The name is left out because ``--api-key-env`` is where a hurried user pastes the key
    itself; whether a key was set is recorded instead. Credentials in a URL are dropped.
    """
    backend = asdict(cfg.backend)
    env = backend.pop("api_key_env")
    backend["url"] = _without_credentials(backend["url"])
    backend["api_key"] = "set" if os.environ.get(env) else "not set"
    judge = None
    if cfg.judge:
        judge = {"model": cfg.judge.model, "url": _without_credentials(cfg.judge.url)}
    return {
        "backend": backend,
        "judge": judge,
        "limit": cfg.limit,
        "seed": cfg.seed,
        "prompts": {n: cfg.prompts.get(n, DEFAULT_PROMPT) for n in cfg.benchmarks},
        "image_root": cfg.image_root,
        "parse": cfg.parse,
    }


def _without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url
