"""The layout is a rule, not a wish: wings import only the wings below them, no import circles,
no hidden imports between the package's own modules, and the library never imports Streamlit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "sams_core"

# Floors from the bottom up; a module may import its own wing and any wing on a lower floor.
# Wings on the same floor never import each other.
FLOORS: list[set[str]] = [
    {"errors", "settings"},
    {"labels"},
    {"models", "simulate", "plots"},
    {"io"},
    {"data"},
    {"evaluation"},
    {"training"},
    {"interpret"},
    {"pipeline"},
    {"demo"},
    {"cli"},
    {"__main__", "__init__"},
]
# Function-level imports of the package's own modules are allowed only in the command line and the
# demo builder (their docstrings say so): `--help`, `simulate` and the dashboard's demo catalogue
# start without loading PyTorch.
LAZY_ALLOWED = {"cli", "demo"}


def wing_of(module: str) -> str:
    """`sams_core.data.screen` -> `data`; `sams_core.plots` -> `plots`; `sams_core` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor_of(wing: str) -> int:
    for i, floor in enumerate(FLOORS):
        if wing in floor:
            return i
    raise AssertionError(f"wing {wing!r} has no floor in tests/test_architecture.py: add it to FLOORS")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports(path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, source line) for every import in ``path``."""
    text = path.read_text()
    src = text.splitlines()
    tree = ast.parse(text)
    skip = _type_checking_lines(tree)
    func_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: use absolute imports"
            mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        if node.lineno in skip:
            continue
        for n in names:
            out.append((n, node.lineno, node.lineno in func_lines, src[node.lineno - 1]))
    return out


def own_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def own_imports() -> dict[str, set[str]]:
    """Module -> the package's own modules it imports (module level and in functions)."""
    mods = own_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for name, *_ in imports(p):
            # `from sams_core.data import screen` names a module; `from sams_core.data.screen import X` does not
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != m and name.startswith("sams_core"):
                graph[m].add(name)
    return graph


def test_every_module_has_a_floor():
    for m in own_modules():
        floor_of(wing_of(m))


def test_wings_import_only_wings_below_them():
    bad = []
    for m, deps in own_imports().items():
        w = wing_of(m)
        for d in deps:
            dw = wing_of(d)
            if d == "sams_core" or dw == w:
                continue
            if floor_of(dw) >= floor_of(w):
                bad.append(f"{m} imports {d} ({dw} is not below {w})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circles():
    graph = own_imports()
    for m in graph:  # a package's __init__ importing its own modules is not a circle
        graph[m] = {d for d in graph[m] if not (d == m.rpartition(".")[0] or m.startswith(d + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_no_hidden_imports_between_own_modules():
    bad = []
    for m, p in own_modules().items():
        for name, line, in_func, src in imports(p):
            if not (in_func and name.startswith("sams_core")):
                continue
            if wing_of(m) in LAZY_ALLOWED:
                continue
            bad.append(f"{p.relative_to(ROOT)}:{line}: {src.strip()}")
    assert not bad, "imports inside functions (move them to the top of the module):\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("forbidden", ["streamlit", "explorer"])
def test_library_never_imports_the_dashboard(forbidden):
    bad = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in PKG.rglob("*.py")
        for name, line, _, _ in imports(p)
        if name == forbidden or name.startswith(forbidden + ".")
    ]
    assert not bad, bad


def test_pages_lay_out_widgets_and_call_the_library():
    pages = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {src.strip()}"
        for p in pages
        for name, line, _, src in imports(p)
        if name.split(".")[0] in ("torch", "sklearn", "scipy")
    ]
    assert not bad, "pages import compute libraries:\n" + "\n".join(bad)


def test_every_wing_says_what_it_holds_and_may_import():
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc or "imports only" in doc, f"{init.relative_to(ROOT)}: docstring must say what the wing may import"
