"""The package's shape, checked on its source: imports never form a cycle, and no module outside a
method's own compares that method's name (everything else asks the method table, lmpipeline/methods).

Imports are read with ast, function-level ones included: an import moved into a function to dodge a
cycle is still an edge here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from lmpipeline.methods import METHODS

PACKAGE = Path(__file__).resolve().parents[3] / "lmpipeline"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the lmpipeline modules it imports (`from pkg import sub` counts as importing pkg.sub)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            deps.update(t for t in (_resolve(t, modules) for t in targets if t.startswith("lmpipeline")) if t)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 50  # the walk really read the package
    assert cycles(graph) == []


def test_lower_layers_never_import_the_methods_or_the_pipeline():
    """config, data, models and train sit below the methods (the method table fills the config layer's
    stage registry, never the other way round)."""
    above = ("lmpipeline.methods", "lmpipeline.pipeline", "lmpipeline.commands", "lmpipeline.cli")
    lower = ("lmpipeline.config", "lmpipeline.data", "lmpipeline.models", "lmpipeline.train", "lmpipeline.plan")
    wrong = {(m, d) for m, deps in import_graph().items() if m.startswith(lower)
             for d in deps if d.startswith(above)}
    assert wrong == set()


# The benchmark harness names its workloads after the method they measure (TRL's and Unsloth's
# trainers differ per method), so it may compare them.
NAME_COMPARISON_EXEMPT = ("lmpipeline/bench/", "lmpipeline/commands/bench_cmd.py")


def test_no_method_name_is_compared_outside_its_module():
    names = sorted({n for m in METHODS for n in m.names})
    quoted = "|".join(re.escape(n) for n in names)
    # `x == "dpo"`, `x != "dpo"`, `x in ("sft", ...)`, `"dpo" == x`, `"dpo" in x`
    compare = re.compile(rf"""(==|!=|\bin)\s*[(\[{{]?\s*["']({quoted})["']|["']({quoted})["']\s*(==|!=|\bin\b)""")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if rel.startswith(NAME_COMPARISON_EXEMPT):
            continue
        own = {n for m in METHODS if Path(m.stage.__module__.replace(".", "/") + ".py").as_posix() == rel for n in m.names}
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for match in compare.finditer(code):
                name = match.group(2) or match.group(3)
                if name not in own:
                    offenders.append(f"{rel}:{i}: {line.strip()}")
    assert offenders == []
