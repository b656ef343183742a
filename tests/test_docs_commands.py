"""Every `vopd ...` command in README.md, docs/*.md and configs/*.yaml comments parses with the real CLI.

Commands are read from code blocks (fenced or indented), from inline code spans and from YAML
comments; they are parsed, never run. A command fails the test when its sub-command or a flag is
unknown, when (for full commands in code blocks) argparse rejects it, or when a `key=value`
override of `vopd train` / `vopd demo` names a key that `vopd config` does not list.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from vopd.cli import build_parser
from vopd.config import describe_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").glob("*.yaml"))]
_START = re.compile(r"^(?:\$\s+)?(?:accelerate launch(?: [^ ]+)*? -m vopd\.cli|python -m vopd\.cli|vopd)\s(.*)$")
_SPAN = re.compile(r"`(?:vopd|[^`]*? -m vopd\.cli) ([^`]+)`")  # `vopd ...` or `accelerate launch -m vopd.cli ...`


def extract(path: Path) -> list[tuple[str, str, bool]]:
    """(where, command, full) for each `vopd` command in a file; ``full`` = a whole command line
    (code block or YAML comment line), not a mention inside prose."""
    lines = path.read_text().splitlines()
    out: list[tuple[str, str, bool]] = []
    in_fence = False
    i = 0
    while i < len(lines):
        raw = lines[i]
        line_no = i + 1
        i += 1
        if path.suffix == ".md" and raw.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if path.suffix == ".yaml":
            if not raw.lstrip().startswith("#"):
                continue
            text, block = raw.lstrip()[1:].strip(), True
        else:
            block = in_fence or raw.startswith("    ")
            text = raw.strip()
        if block:
            while text.endswith("\\") and i < len(lines):  # shell continuation lines
                nxt = lines[i].strip()
                text = text[:-1] + " " + (nxt[1:].strip() if path.suffix == ".yaml" else nxt)
                i += 1
            match = _START.match(text)
            if match:
                out.append((f"{path.name}:{line_no}", "vopd " + match.group(1), True))
                continue
        for span in _SPAN.findall(raw):
            if not re.match(r"[\w-]+:", span):  # `vopd train: 10 steps ...` is output, not a command
                out.append((f"{path.name}:{line_no}", "vopd " + span, False))
    return out


def _tokens(command: str) -> list[str]:
    command = re.split(r"\s#|\s\||\s>|\s&&|;", command)[0]  # drop comments, pipes, redirects
    return [t for t in shlex.split(command)[1:] if t not in ("...", "…")]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


KNOWN_KEYS = {row.key for row in describe_config()}


def problems(command: str, *, full: bool) -> list[str]:
    """What is wrong with one `vopd ...` command (empty when it is fine)."""
    parser = build_parser()
    tokens = _tokens(command)
    found: list[str] = []
    node, path = parser, []
    for tok in tokens:  # walk down the sub-commands
        subs = _subparsers(node)
        if not subs or tok.startswith("-"):
            break
        if tok not in subs:
            if path or full or "=" not in tok:
                found.append(f"unknown sub-command {' '.join(['vopd', *path, tok])!r}")
            return found
        node, path = subs[tok], [*path, tok]
    options = _options(node) | _options(parser)
    for tok in tokens:
        flag = tok.split("=", 1)[0]
        if tok.startswith("--") and flag not in options:
            found.append(f"unknown flag {flag} for {' '.join(['vopd', *path])}")
    if path[:1] in (["train"], ["demo"]):
        for tok in tokens:
            if "=" in tok and not tok.startswith("-"):
                key = tok.split("=", 1)[0]
                if key not in KNOWN_KEYS:
                    found.append(f"unknown config key {key} (not in `vopd config`)")
    if full and not found:
        err, outp = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outp):
                parser.parse_args(tokens)
        except SystemExit as stop:
            if stop.code not in (0, None):
                found.append("argparse: " + (err.getvalue().strip().splitlines() or ["error"])[-1])
    return found


COMMANDS = [c for source in SOURCES for c in extract(source)]


def test_commands_were_found():
    """The extractor sees the commands the docs are known to contain (guards against a silent 0)."""
    texts = [c for _, c, _ in COMMANDS]
    assert len(COMMANDS) >= 30
    assert any(c.startswith("vopd train --config configs/tiny_cpu.yaml") for c in texts)
    assert any(c.startswith("vopd eval vstar=data/vstar") and "hrbench_4k=" in c for c in texts)  # continued line
    assert any(c.startswith("vopd train --config configs/paper_qwen35_4b.yaml") for c in texts)  # yaml comment
    assert any(c.startswith("vopd toyworld pretrain") for c in texts)


@pytest.mark.parametrize(("where", "command", "full"), COMMANDS, ids=[f"{w} {c[:40]}" for w, c, _ in COMMANDS])
def test_documented_command_parses(where, command, full):
    wrong = problems(command, full=full)
    assert not wrong, f"{where}: `{command}`: " + "; ".join(wrong)


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        ("vopd trian --config x.yaml", "unknown sub-command 'vopd trian'"),
        ("vopd data chek rows.jsonl", "unknown sub-command 'vopd data chek'"),
        ("vopd train --config x.yaml --resum", "unknown flag --resum"),
        ("vopd gap data --model m --out o --zooom 3", "unknown flag --zooom"),
        ("vopd train --config x.yaml optim.lrr=1e-5", "unknown config key optim.lrr"),
        ("vopd demo --out runs/d nosuch.key=1", "unknown config key nosuch.key"),
        ("vopd gap data --model m", "argparse: vopd gap: error: the following arguments are required: --out"),
    ],
)
def test_checker_catches_bad_commands(command, needle):
    assert any(needle in p for p in problems(command, full=True)), problems(command, full=True)


def test_inline_mentions_need_no_required_arguments():
    assert problems("vopd gap", full=False) == []
    assert problems("vopd config --markdown", full=False) == []
    assert problems("vopd config --markdwn", full=False) == ["unknown flag --markdwn for vopd config"]
