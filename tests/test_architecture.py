"""The package's layers point one way: walk every import of every mfllm module (function-local ones too) and
fail on an import cycle or on a lower layer importing a higher one. docs/architecture.md draws the same map."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mfllm

ROOT = Path(mfllm.__file__).parent

# Lowest first. A module may import its own package and any lower layer, never a higher one.
LAYERS: list[tuple[str, ...]] = [
    ("mfllm", "mfllm.errors", "mfllm.paths", "mfllm.seeds", "mfllm.files", "mfllm.plotting"),
    ("mfllm.data", "mfllm.prompts"),
    ("mfllm.backends", "mfllm.store"),
    ("mfllm.labels",),
    ("mfllm.simulation",),
    ("mfllm.evaluation", "mfllm.training"),
    ("mfllm.whatif", "mfllm.bench"),
    ("mfllm.cli",),
    ("mfllm.api",),  # the Python API (mfllm.simulate, ...): the package root forwards to it lazily
]
# Same layer, different packages: allowed only in this direction (and never back).
SIDEWAYS = {("mfllm.data", "mfllm.prompts"), ("mfllm.whatif", "mfllm.evaluation")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (top level, in functions, under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            mods = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            # `from pkg import module` imports the module; `from pkg import symbol` imports pkg itself
            targets = mods if len(mods) == len(node.names) else mods + [base]
        for t in targets:
            while t and t not in known:  # `from pkg import name`: name may be a module or a symbol
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("mfllm"):
                out.add(t)
    return out


def package_of(module: str) -> str:
    best = ""
    for layer in LAYERS:
        for pkg in layer:
            if (module == pkg or module.startswith(pkg + ".")) and len(pkg) > len(best):
                best = pkg
    return best


def layer_of(module: str) -> int:
    pkg = package_of(module)
    return next(i for i, layer in enumerate(LAYERS) if pkg in layer)


def graph() -> dict[str, set[str]]:
    mods = all_modules()
    known = set(mods)
    return {name: {t for t in imports_of(name, path, known) if t != "mfllm"} for name, path in mods.items()}


def test_every_module_has_a_layer():
    missing = [m for m in all_modules() if not package_of(m)]
    assert not missing, f"modules outside every layer (add them to LAYERS and docs/architecture.md): {missing}"


def test_no_lower_layer_imports_a_higher_one():
    bad = []
    for mod, targets in graph().items():
        for t in targets:
            a, b = package_of(mod), package_of(t)
            if a == b:
                continue
            la, lb = layer_of(mod), layer_of(t)
            if lb > la or (lb == la and la > 0 and (a, b) not in SIDEWAYS):  # base modules may share
                bad.append(f"{mod} -> {t}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in g:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(g[nxt]))))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("g, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_the_cycle_finder_finds_known_cycles(g, expected):
    assert cycles(g) == expected


def test_the_walker_sees_function_local_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from mfllm.store import run\n    import mfllm.errors\n", encoding="utf-8")
    got = imports_of("mfllm.x.m", src, {"mfllm.store", "mfllm.store.run", "mfllm.errors"})
    assert got == {"mfllm.store.run", "mfllm.errors"}
