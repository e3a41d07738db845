"""The package's modules form layers without import cycles (errors/settings, models, compat, hosts,
odedit, benchmark, cli): checked statically over every import statement, module-level and
function-level alike, and at run time by importing every module in fresh interpreters."""
import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "easyedit_odedit"
# Intra-package imports allowed to close a cycle, (importer, imported) -> why. None today; an entry
# here must say why the import cannot move to where it belongs.
ALLOWED_CYCLE_EDGES = {}


def package_modules() -> dict:
    """Dotted module name -> source path, for every module of the package (found on disk)."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, name)
    return out


def import_edges(modules: dict) -> dict:
    """importer -> {imported: line}: every import statement of the package that names one of its
    modules, wherever it stands. ``from pkg import name`` is an edge to ``pkg.name`` when that is a
    module, else to ``pkg`` (its ``__init__``). A package's own ``__init__`` running before its
    submodules is Python's import order, not an edge."""
    edges = {}
    for name, path in modules.items():
        is_package = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    edges.setdefault(name, {}).setdefault(target, node.lineno)
    return edges


def cycles(edges: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if (v, w) in ALLOWED_CYCLE_EDGES:
                continue
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_even_through_function_level_imports():
    modules = package_modules()
    edges = import_edges(modules)
    assert len(modules) > 30 and edges, "the walk found the package"
    found = cycles(edges)
    detail = ["; ".join(f"{a} -> {b} (line {edges[a][b]})" for a in comp for b in edges.get(a, {}) if b in comp)
              for comp in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b": 1}, "b": {"c": 3}, "c": {"a": 7}, "d": {"a": 2}}
    assert cycles(graph) == [["a", "b", "c"]]


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _import_in_order(order) -> str:
    out = _python("import importlib\nfor name in %r:\n    importlib.import_module(name)\nprint('imported')" % (order,))
    return "" if out.stdout.strip().endswith("imported") else f"{order[0]} first: {out.stderr[-1500:]}"


def test_every_module_imports_in_a_fresh_interpreter_in_several_orders():
    """Importing any module runs the package's ``__init__`` first, and with it every module that
    ``__init__`` reaches, always in the same order. So the orders that differ are: the package
    alone, each module ``__init__`` does not reach imported first, and all modules forwards and
    backwards. Each order runs in its own interpreter."""
    names = sorted(n for n in package_modules() if not n.endswith("__main__"))
    out = _python(f"import sys, {PACKAGE}\nprint(sorted(m for m in sys.modules if m.startswith('{PACKAGE}')))")
    assert out.returncode == 0, out.stderr[-2000:]
    reached = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    orders = [names, names[::-1]] + [[n] + [m for m in names if m != n] for n in names if n not in reached]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        failures = [f for f in pool.map(_import_in_order, orders) if f]
    assert len(orders) > 3
    assert not failures, "\n\n".join(failures)
