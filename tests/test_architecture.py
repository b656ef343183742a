"""The package's layers, enforced on its imports (read with ``ast``, nothing is imported).

Top to bottom: cli -> applications (evaluation, toyworld) -> training -> core. A module may import
its own layer and the layers below, never above; the import graph has no cycle; no module imports
another module's ``_private`` name. Every module must be placed in ``LAYER`` (a new module fails
until it is), so the layering is a decision, not an accident. See docs/architecture.md.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vopd"

ORDER = ("core", "training", "applications", "cli")

# Top-level modules, one by one. Packages: every module inside takes the package's layer.
LAYER: dict[str, str] = {
    # core: data records, views, the loss, the teacher, model adapters. Runs without the rest.
    "vopd": "core",
    "vopd.images": "core",
    "vopd.records": "core",
    "vopd.views": "core",
    "vopd.datasets": "core",  # package: readers of other dataset layouts
    "vopd.grading": "core",
    "vopd.objectives": "core",
    "vopd.fused_loss": "core",
    "vopd.models": "core",
    "vopd.processors": "core",
    "vopd.scoring": "core",  # what a model scores: ScoredBatch, shared prompts, the family table
    "vopd.teacher": "core",
    "vopd.tiny_models": "core",
    "vopd.stock_processor": "core",  # checkpoints name the stock processor class
    "vopd.random_model": "core",  # vopd model random: a real config's model with random weights
    "vopd.specs": "core",
    "vopd.knobs": "core",  # the knob machinery: declare, check, load YAML
    "vopd.jsonl": "core",  # append-only JSONL logs that survive a kill (predictions, proposals)
    "vopd.outputs": "core",  # output ownership and cache keys (what made a cache): eval, gap, proposals, data
    "vopd.config": "core",  # every knob as data (views, rollout and health import their sections)
    # training: the run, its data pipeline, sampling, checkpoints, the health probe.
    "vopd.data": "training",
    "vopd.datacheck": "training",
    "vopd.rollout": "training",
    "vopd.rollout_vllm": "training",  # rollout.engine=vllm
    "vopd.vllm_lora": "training",  # rollout.engine=vllm with lora.r > 0: adapter-only pushes
    "vopd.checkpoint": "training",
    "vopd.runfolder": "training",
    "vopd.proposals": "training",  # package: crops proposed by the model, grounding, vopd data propose
    "vopd.health": "training",
    "vopd.train_setup": "training",
    "vopd.trainer": "training",
    "vopd.parallel": "training",
    "vopd.sharded_checkpoint": "training",  # checkpoint.format=dcp and vopd export
    "vopd.sharded_snapshot": "training",  # the vLLM weight snapshot from an FSDP2-sharded student
    "vopd.lora": "training",
    # applications
    "vopd.evaluation": "applications",  # package
    "vopd.toyworld": "applications",  # package
    "vopd.databuild": "applications",  # package: vopd data build (writer and filter models over HTTP)
    # the command line
    "vopd.cli": "cli",
}

# Violations that other work in flight removes; each must still exist (so the list only shrinks).
# Remove an entry when its fix lands; the goal is an empty list.
KNOWN: dict[str, str] = {
    # kind:detail -> owner
}

# Modules that must load without torch / transformers (through their module-level imports):
# `vopd config` and `vopd --help` stay fast, and the registries stay cheap to import.
NO_MODEL_CODE = ("vopd.config", "vopd.knobs", "vopd.specs", "vopd.toyworld", "vopd.cli", "vopd.grading")
HEAVY = ("torch", "transformers", "accelerate", "vopd.models")


def _modules() -> dict[str, Path]:
    out = {}
    for file in sorted(SRC.rglob("*.py")):
        parts = ("vopd",) + file.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


MODULES = _modules()


def _layer(module: str) -> str | None:
    while module:
        if module in LAYER:
            return LAYER[module]
        module = module.rpartition(".")[0]
    return None


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str, *, top_level_only: bool = False) -> list[tuple[str, str | None]]:
    """(imported vopd module, imported name or None) for every import in ``module``."""
    tree = _parse(MODULES[module])
    nodes = list(_top_level(tree.body)) if top_level_only else list(ast.walk(tree))
    out: list[tuple[str, str | None]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None) if sub in MODULES else (base, alias.name))
    return out


@functools.cache
def _parse(file: Path) -> ast.Module:
    return ast.parse(file.read_text(), filename=str(file))


def _top_level(body: list[ast.stmt]):
    """Statements run at import time: the body, and inside top-level if/try/with (not def/class)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []) or []:
                    yield from _top_level(child.body if isinstance(child, ast.ExceptHandler) else [child])


def _graph() -> dict[str, set[str]]:
    return {m: {dep for dep, _ in _imports(m) if dep in MODULES and dep != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _violations() -> dict[str, str]:
    """kind:detail -> explanation, for every broken rule."""
    out: dict[str, str] = {}
    graph = _graph()
    for component in _cycles(graph):
        out["cycle:" + " -> ".join(component)] = "import cycle"
    for module in MODULES:
        here = _layer(module)
        for dep, name in _imports(module):
            if dep not in MODULES:
                continue
            there = _layer(dep)
            if here and there and ORDER.index(there) > ORDER.index(here):
                out[f"upward:{module} -> {dep}"] = f"{here} module imports the {there} layer"
            if name is not None and name.startswith("_") and not name.startswith("__") and dep != module:
                out[f"private:{module} imports {dep}.{name}"] = "import of another module's private name"
            private_module = dep.rpartition(".")[2].startswith("_") and not dep.endswith("__init__")
            if private_module and not module.startswith(dep.rpartition(".")[0] + "."):
                out[f"private:{module} imports {dep}"] = "import of a private module from outside its package"
    for module in NO_MODEL_CODE:
        heavy = _loads_heavy(module)
        if heavy:
            out[f"model-code:{module}"] = f"imports {heavy} when imported"
    return out


def _loads_heavy(start: str) -> str | None:
    """The first heavy import reachable from ``start`` through import-time imports, as a path."""
    seen, todo = {start}, [(start, start)]
    while todo:
        module, path = todo.pop()
        for dep, _ in _imports(module, top_level_only=True):
            if dep.split(".")[0] in HEAVY or dep in HEAVY:
                return f"{path} -> {dep}"
            targets = [dep] + [p for p in _parents(dep)]  # importing a.b.c runs a/__init__, a/b/__init__
            for target in targets:
                if target in MODULES and target not in seen:
                    seen.add(target)
                    todo.append((target, f"{path} -> {target}"))
    return None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if _layer(m) is None)
    assert not unplaced, f"place these modules in LAYER (tests/test_architecture.py): {unplaced}"
    stale = sorted(m for m in LAYER if m not in MODULES)
    assert not stale, f"LAYER names modules that no longer exist: {stale}"


def test_no_cycle_no_upward_import_no_private_name():
    found = _violations()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, "architecture violations:\n" + "\n".join(f"  {k}  ({v})" for k, v in sorted(new.items()))


def test_known_violations_still_exist():
    # Fixed ones must leave KNOWN, so the list can only shrink.
    fixed = sorted(k for k in KNOWN if k not in _violations())
    assert not fixed, f"these known violations are gone: delete them from KNOWN: {fixed}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_cycle_finder(source, expected):
    assert _cycles(source) == expected


def test_checker_sees_a_planted_violation(monkeypatch):
    # The rules must be able to fail: plant an upward import and a private-name import.
    fake = {**MODULES}
    monkeypatch.setitem(LAYER, "vopd.zz_planted", "core")
    planted = SRC / "objectives.py"
    fake["vopd.zz_planted"] = planted
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    real_imports = _imports

    def planted_imports(module: str, *, top_level_only: bool = False):
        if module == "vopd.zz_planted":
            return [("vopd.trainer", None), ("vopd.trainer", "_private_helper")]
        return real_imports(module, top_level_only=top_level_only)

    monkeypatch.setattr(sys.modules[__name__], "_imports", planted_imports)
    found = _violations()
    assert "upward:vopd.zz_planted -> vopd.trainer" in found
    assert "private:vopd.zz_planted imports vopd.trainer._private_helper" in found


# ------------------------------------------------------------------ the module tree of the docs

DOC = SRC.parents[1] / "docs" / "architecture.md"


def documented_modules(text: str) -> set[str]:
    """The module paths (relative to ``src/vopd``) of the ``src/vopd/`` tree in ``text``.

    An entry line is indented two spaces per level and starts with ``name.py`` or ``name/``; a
    folder line may list more modules after its description only as ``name.py`` words (the
    benchmark loaders). Deeper-indented lines are descriptions.
    """
    block = text.split("```\nsrc/vopd/\n", 1)[1].split("```", 1)[0]
    found: set[str] = set()
    folders: list[str] = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        words = line.split()
        if not words or indent % 2 or indent // 2 - 1 > len(folders):
            continue
        depth = indent // 2 - 1
        if not (words[0].endswith(".py") or words[0].endswith("/")):
            continue
        folders = folders[:depth]
        if words[0].endswith("/"):
            folders.append(words[0].rstrip("/"))
        found.update("/".join([*folders, w]) for w in words if w.endswith(".py"))
    return found


def test_architecture_doc_names_every_module():
    """docs/architecture.md's module tree lists exactly the package's modules."""
    actual = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")}
    documented = documented_modules(DOC.read_text())
    assert not actual - documented, f"modules missing from docs/architecture.md: {sorted(actual - documented)}"
    assert not documented - actual, (
        f"docs/architecture.md names modules that do not exist: {sorted(documented - actual)}"
    )


def test_documented_modules_reads_nesting():
    text = "```\nsrc/vopd/\n  a.py  x\n        b.py is a description\n  pkg/  y\n    c.py  z\n"
    text += "    sub/  d.py e.py\n  f.py\n```\n"
    assert documented_modules(text) == {"a.py", "pkg/c.py", "pkg/sub/d.py", "pkg/sub/e.py", "f.py"}
