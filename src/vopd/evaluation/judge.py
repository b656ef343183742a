"""An optional LLM judge for answers the rules cannot settle.

The judge is asked one yes/no question: does the response express the same meaning as the
reference answer? Its reply must start with yes or no (case, markdown and punctuation are
ignored). A judge that fails (network, HTTP error) or answers out of format leaves the item
*unjudged* (``correct=None``), never silently wrong. Every prompt and reply is appended to a
JSONL log, which doubles as a cache: rerunning does not ask again about the same response.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vopd.evaluation.backends import chat_completion, check_env_name, redact
from vopd.jsonl import append_record, end_with_newline, read_records

__all__ = ["JudgeConfig", "JudgeVerdict", "LLMJudge", "judge_prompt", "parse_judge_reply"]

_PROMPT = (
    "You are grading an answer to a question about an image.\n"
    "Question: {question}\n"
    "Reference answer: {answer}\n"
    "Model response: {response}\n"
    "Does the model response express the same meaning as the reference answer? "
    "Reply with a single word: Yes or No."
)


@dataclass
class JudgeConfig:
    """An OpenAI-compatible endpoint to judge open answers.

    Attributes:
        url: base URL, e.g. ``http://127.0.0.1:8001/v1``.
        model: the served judge model name.
        api_key_env: environment variable holding the key (never the key itself).
        timeout_s: per-request timeout.
        retries: extra attempts on transport errors.
        concurrency: parallel judge requests.
        max_tokens: reply budget (a verdict is one word; some models add a sentence).
        backoff_s: first retry delay (doubles each retry).
    """

    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    retries: int = 2
    concurrency: int = 8
    max_tokens: int = 16
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        check_env_name(self.api_key_env, "judge api_key_env")


@dataclass(frozen=True)
class JudgeVerdict:
    """``correct`` is ``None`` when unjudged; ``error`` says why."""

    correct: bool | None
    prompt: str
    reply: str | None
    error: str | None = None


def judge_prompt(question: str, answer: str, response: str) -> str:
    """The text sent to the judge."""
    return _PROMPT.format(question=question.strip(), answer=answer.strip(), response=response.strip())


def parse_judge_reply(reply: str) -> bool | None:
    """``True`` for yes, ``False`` for no, ``None`` when the reply does not start with either.

    Accepts "Yes", "yes.", "**Yes**", " YES, because ...", "No." and the same after an
    "Answer:" prefix; rejects replies that start elsewhere ("I think yes" is out of format).
    """
    text = reply.strip().lstrip("*_`\"'#> ").lower()
    for prefix in ("answer:", "verdict:", "judgement:", "judgment:"):
        if text.startswith(prefix):
            text = text[len(prefix) :].strip().lstrip("*_`\"' ")
    word = "".join(ch for ch in text.split()[0] if ch.isalpha()) if text.split() else ""
    if word == "yes":
        return True
    if word == "no":
        return False
    return None


def _key(question: str, answer: str, response: str) -> str:
    return hashlib.sha256(json.dumps([question, answer, response]).encode("utf-8")).hexdigest()[:24]


class LLMJudge:
    """Ask a judge model, caching verdicts in (and logging to) ``log_path``."""

    def __init__(self, cfg: JudgeConfig, log_path: str | Path | None = None):
        self.cfg = cfg
        self.api_key = os.environ.get(cfg.api_key_env) or None
        self.log_path = Path(log_path) if log_path else None
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, Any]] = {}
        if self.log_path and self.log_path.is_file():
            end_with_newline(self.log_path)
            for rec in read_records(self.log_path, ("key", "correct", "reply")):
                if isinstance(rec["correct"], bool):  # unjudged ones are asked again
                    self._cache[rec["key"]] = rec

    def _log(self, record: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        with self._lock:
            append_record(self.log_path, record, fsync=False)

    def judge(self, question: str, answer: str, response: str, *, item_id: str = "") -> JudgeVerdict:
        """One verdict; cached verdicts are returned without a request."""
        key = _key(question, answer, response)
        prompt = judge_prompt(question, answer, response)
        if key in self._cache:
            rec = self._cache[key]
            return JudgeVerdict(rec["correct"], prompt, rec["reply"])
        body = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
            "max_tokens": self.cfg.max_tokens,
        }
        try:
            reply: str | None = chat_completion(
                self.cfg.url,
                body,
                api_key=self.api_key,
                timeout_s=self.cfg.timeout_s,
                retries=self.cfg.retries,
                backoff_s=self.cfg.backoff_s,
            )
            correct = parse_judge_reply(reply or "")
            error = None if correct is not None else "reply out of format (expected Yes or No first)"
        except Exception as err:  # one failed verdict must not sink the others; it stays unjudged
            reply, correct, error = None, None, redact(f"{type(err).__name__}: {err}", [self.api_key])
        record = {"key": key, "id": item_id, "prompt": prompt, "reply": reply, "correct": correct, "error": error}
        self._log(record)
        if correct is not None:
            with self._lock:
                self._cache[key] = record
        return JudgeVerdict(correct, prompt, reply, error)

    def judge_many(self, requests: list[tuple[str, str, str, str]]) -> list[JudgeVerdict]:
        """Judge ``(item_id, question, answer, response)`` tuples concurrently, in order."""
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(lambda r: self.judge(r[1], r[2], r[3], item_id=r[0]), requests))
