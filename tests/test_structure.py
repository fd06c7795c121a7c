"""The code's shape, read from the source: no import circle inside runtime/ (TYPE_CHECKING and late imports
count: a type-level circle is still two files that must change together), and no task kind switched on
outside the registry (runtime/kinds.py) and the call shapes (runtime/calls.py)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_graph(folder: str) -> dict[str, set[str]]:
    """Module -> the modules of `folder` it imports anywhere in its source (top level, TYPE_CHECKING blocks,
    inside functions), by the ast."""
    package = ROOT / folder
    modules = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from . import x / from .x import y
                    if node.module:
                        edges.add(node.module.split(".")[0])
                    else:
                        edges.update(a.name for a in node.names if a.name in modules)
                        if any(a.name not in modules for a in node.names):
                            edges.add("__init__")
                elif node.module and node.module.startswith(f"bitfit.{folder}"):
                    rest = node.module.split(".")[2:]
                    edges.add(rest[0] if rest else "__init__")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(f"bitfit.{folder}."):
                        edges.add(a.name.split(".")[2])
        graph[path.stem] = {e for e in edges if e in modules and e != path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each once, as the path that closes it (a depth-first search)."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                loop = path[path.index(nxt):]
                turned = loop[loop.index(min(loop)):] + loop[: loop.index(min(loop))]
                if turned not in found:
                    found.append(turned)
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_no_import_circle_in_runtime():
    graph = import_graph("runtime")
    assert {"session", "decode", "kinds", "calls", "pack"} <= set(graph)  # the graph was read
    assert "decode" in graph["calls"] and "calls" in graph["kinds"]  # and its edges
    assert cycles(graph) == [], " ; ".join(" -> ".join([*c, c[0]]) for c in cycles(graph))


def test_the_cycle_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# -- kind names and call-shape switches outside the registry ------------------------------------------------
KIND_NAMES = {"classification", "regression", "token-classification", "question-answering"}
SCANNED = ("runtime", "training", "compiler", "exporters", "bitfit")
ALLOWED = {"runtime/kinds.py", "runtime/calls.py"}  # the registry and the call shapes: where kinds are named
# Hits that are not task kinds, as file: count (the test holds each file to exactly that).
KNOWN = {
    "training/extract.py": 1,  # not a kind: transformers' own config.problem_type == "regression" (stays)
}


def switches_in(source: str) -> list[int]:
    """Lines where code names a task kind (a string constant that is exactly a kind's name: docstrings and
    messages that mention one are prose) or compares something's `.call`."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in KIND_NAMES:
            hits.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(
                isinstance(side, ast.Attribute) and side.attr == "call" for side in (node.left, *node.comparators)):
            hits.append(node.lineno)
    return hits


def switches() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            source = path.read_text(encoding="utf-8")
            lines = source.splitlines()
            for n in switches_in(source):
                out.setdefault(rel, []).append(f"{rel}:{n}: {lines[n - 1].strip()}")
    return out


def test_no_kind_is_switched_on_outside_the_registry():
    found = switches()
    new = {f: hits for f, hits in found.items() if len(hits) > KNOWN.get(f, 0)}
    assert not new, ("task kinds named or `.call` compared outside runtime/kinds.py and runtime/calls.py: ask the "
                     "kind (runtime.kinds) or its call shape (runtime.calls) instead\n"
                     + "\n".join(h for hits in new.values() for h in hits))
    stale = {f: n for f, n in KNOWN.items() if len(found.get(f, [])) < n}
    assert not stale, f"fewer hits than KNOWN says in {stale}: lower or drop those entries"


@pytest.mark.parametrize("code", ['if kind == "regression": pass', "x = 'question-answering'",
                                  "if k.call == 'run': pass", 'ok = "run_tokens" != kind.call',
                                  'f(kind, "token-classification")'])
def test_the_switch_finder_sees_a_switch(code):
    assert switches_in(code) == [1]


def test_the_switch_finder_reads_prose_as_prose():
    assert switches_in('"""a question-answering task, or "regression" ones"""\nraise E(f"a {k} task")') == []
