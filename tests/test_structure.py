"""The package's import graph has no cycles: every `llamba.*` import, module-level or inside a function, of every
module of the five folders (pyproject's package-dir mapping), as a directed graph; Tarjan's strongly connected
components must all be single modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "llamba": "llamba",
    "llamba.distill": "distill",
    "llamba.export": "export",
    "llamba.icrl": "icrl",
    "llamba.envs": "envs",
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in (ROOT / folder).glob("*.py"):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (package __init__ files left out: importing a submodule runs its
    package's __init__ by design)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llamba"):
                deps |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in mods and d not in PACKAGES and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_on_a_hand_built_graph():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "llamba.model" in graph and "llamba.distill.run" in graph  # the walk sees the package
    assert cycles(graph) == []


MAX_PARAMETERS = 8  # more settings than this travel in a config (distill/config.py, icrl/config.py)


def parameter_counts(folder: str, root: Path = ROOT) -> dict[str, int]:
    """'file.py:function' -> its parameter count (self / cls not counted; *args and **kwargs count one each)."""
    out = {}
    for path in sorted((root / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                n = len(names) + (a.vararg is not None) + (a.kwarg is not None)
                out[f"{folder}/{path.name}:{node.name}"] = n - (names[:1] in (["self"], ["cls"]))
    return out


def test_parameter_counter_on_a_hand_built_function(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "def f(a, b, *c, d=1, **e): pass\nclass K:\n    def g(self, x): pass\n", encoding="utf-8"
    )
    assert parameter_counts("pkg", tmp_path) == {"pkg/m.py:f": 5, "pkg/m.py:g": 1}


def test_no_function_of_distill_or_icrl_takes_more_than_eight_parameters():
    counts = {**parameter_counts("distill"), **parameter_counts("icrl")}
    assert "distill/run.py:distill_all" in counts
    assert {k: n for k, n in counts.items() if n > MAX_PARAMETERS} == {}


def test_the_icrl_cli_offers_every_env_family():
    from llamba.envs import FAMILIES
    from llamba.icrl.cli import ENVS

    assert ENVS == tuple(FAMILIES)
