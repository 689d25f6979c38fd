"""The house rules, read from the source: data flows one way through the layers, and no module of `pipeline/`
imports (directly or around a loop) a module that imports it. Every import counts, also those made inside
functions: a lazy import hides a dependency, it does not remove it."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1] / "pipeline"
# Lower layers never import higher ones (rank = position; modules of equal rank may import each other's
# modules only without cycles). eval and serve are siblings above memory; the CLI and the demo are on top.
LAYERS = [
    ("base", ["pipeline", "pipeline.errors", "pipeline.storage", "pipeline.config", "pipeline.runtime",
              "pipeline.figures"]),
    ("data", ["pipeline.data"]),
    ("embed", ["pipeline.embed"]),
    ("index", ["pipeline.index"]),
    ("memory", ["pipeline.memory"]),
    ("eval", ["pipeline.eval"]),
    ("serve", ["pipeline.serve"]),
    ("top", ["pipeline.commands", "pipeline.cli", "pipeline.demo"]),
]
SIBLINGS = {("eval", "serve"), ("serve", "eval")}  # neither may import the other


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} belongs to no layer: add it to LAYERS"
    return rank


def imports_of(path: Path, modules: set) -> set:
    """The pipeline modules `path` imports (`from pipeline.x import y` counts y when y is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.startswith("pipeline"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            out |= subs or {node.module}
    return {m for m in out if m in modules}


def graph() -> nx.DiGraph:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for mod, path in files.items():
        for dep in imports_of(path, set(files)):
            if dep != mod and not mod.startswith(dep + ".") and dep != "pipeline":
                g.add_edge(mod, dep)
    return g


def test_lower_layers_never_import_higher_ones():
    bad = []
    for mod, dep in graph().edges:
        a, b = layer_of(mod), layer_of(dep)
        if b > a or (LAYERS[a][0], LAYERS[b][0]) in SIBLINGS:
            bad.append(f"{mod} ({LAYERS[a][0]}) imports {dep} ({LAYERS[b][0]})")
    assert not bad, "imports against the flow of data:\n" + "\n".join(sorted(bad))


def test_no_import_cycles_in_the_package():
    cycles = list(nx.simple_cycles(graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles[:20])


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pipeline.memory import snapshot\n    import pipeline.index.router\n")
    assert imports_of(f, {"pipeline.memory.snapshot", "pipeline.index.router", "pipeline.memory"}) == \
        {"pipeline.memory.snapshot", "pipeline.index.router"}
