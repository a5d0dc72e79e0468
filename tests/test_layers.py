"""The layering of the README's "How it works" table, checked on the source with ``ast``: no upward import, no cycle.

Layers, lowest first: ``synth`` (foundation) < ``render``, ``pretext`` (libraries) < ``adapt`` < ``apps``. A package
imports only packages of lower layers (and itself); ``bench`` and ``tests`` sit outside. Every import counts,
including those inside functions, so a lazy import cannot hide a cycle.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"synth": 1, "render": 2, "pretext": 2, "adapt": 3, "apps": 4}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in LAYER for p in (ROOT / package).rglob("*.py")}


def _imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(path, name, known) for name, path in known.items()}


def test_no_package_imports_one_above_or_beside_it():
    upward = []
    for module, targets in _graph().items():
        own = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != own and LAYER[other] >= LAYER[own]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_files():
    graph = _graph()
    # Package __init__ re-exports point down into their own package: a cycle through them is not a real one.
    edges = {m: {t for t in ts if not (graph.get(t) is not None and t.split(".")[0] == m.split(".")[0]
                                        and m.startswith(t + "."))} for m, ts in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph is built from real imports: a known edge of the app layer is found."""
    graph = _graph()
    assert "synth.engine" in graph["apps.pretrain"]
    assert all(not t.startswith("apps") for m, ts in graph.items() if not m.startswith("apps") for t in ts)
