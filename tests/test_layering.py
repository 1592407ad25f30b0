"""The house's shape, checked: no module shadows a standard-library or dependency module (a `tools/profile.py`
once broke `python tools/convert.py`), no import cycle between the project's modules, and no lower layer importing
a higher one (entry points > tools > engine, evaluation > methods > models, pipelines)."""
from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "models", "methods", "engine", "evaluation", "tools")
LAYER = {"pipelines": 0, "models": 0, "methods": 1, "engine": 2, "evaluation": 2, "tools": 3}
DEPENDENCIES = {"torch", "torchvision", "numpy", "rich", "yaml", "scipy", "PIL", "timm", "matplotlib", "ffcv",
                "nvidia", "skimage", "pytest", "tensorboard", "triton", "numba", "cv2"}


def parse(path: Path) -> ast.Module:
    """ast.parse, in a fresh interpreter when this one's parser state is broken: CPython 3.11.7 raises a spurious
    SystemError ('AST constructor recursion depth mismatch', gh-106905) once an earlier AST conversion failed."""
    try:
        return ast.parse(path.read_text())
    except SystemError:
        code = "import ast, pickle, sys; sys.stdout.buffer.write(pickle.dumps(ast.parse(open(sys.argv[1]).read())))"
        return pickle.loads(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                                           check=True).stdout)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules imported at module level (imports inside functions are deferred and cannot cycle at
    import time, but still must respect the layers: they are returned too, see below)."""
    found = set()
    for node in ast.walk(parse(path)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def top_level_imports(path: Path, known: set[str]) -> set[str]:
    tree = parse(path)
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {n for n in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if n in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    return found


def test_no_module_shadows_the_standard_library_or_a_dependency():
    bad = [str(f.relative_to(ROOT)) for name, f in modules().items()
           if name.split(".")[-1] in sys.stdlib_module_names | DEPENDENCIES]
    bad += [str(f.relative_to(ROOT)) for f in ROOT.glob("*.py") if f.stem in sys.stdlib_module_names | DEPENDENCIES]
    assert not bad, f"these shadow a standard-library or dependency module when their folder is on sys.path: {bad}"


def test_no_import_cycles():
    mods = modules()
    graph = {m: {i for i in top_level_imports(f, set(mods)) if i != m} for m, f in mods.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_lower_layer_imports_a_higher_one():
    mods = modules()
    wrong = []
    for m, f in mods.items():
        for i in imports_of(f, set(mods)):
            if LAYER[i.split(".")[0]] > LAYER[m.split(".")[0]]:
                wrong.append(f"{m} imports {i}")
    assert not wrong, wrong
