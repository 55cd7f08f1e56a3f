"""Imports go one way: no module of posttrain or data_prep imports, even inside a function, a module that imports it
back (directly or around a loop), and data_prep may import posttrain but never the reverse. Modules and functions
stay as short as the house style says (library modules <= 400 lines, stage scripts <= 150, functions <= 60)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("posttrain", "data_prep")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its body (a `from x import y` counts `x.y` when that is a
    module, else `x`); a package's `__init__` and its own submodules are not counted against each other."""
    hits = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + ".") and not target.startswith(name + "."):
                hits.add(target)
    return hits


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import loop, as the path that closes it (depth-first search; the graph has ~60 nodes)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles_and_one_way_packages():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert graph["posttrain.pipeline"] and graph["data_prep.build"], "the walk found no imports: the check is broken"
    assert cycles(graph) == []
    edges = {(a.split(".")[0], b.split(".")[0]) for a, targets in graph.items() for b in targets}
    assert {(a, b) for a, b in edges if a != b and (b, a) in edges} == set()
    assert ("posttrain", "data_prep") not in edges, sorted(
        f"{a} -> {b}" for a, targets in graph.items() for b in targets
        if a.startswith("posttrain") and b.startswith("data_prep"))


def test_the_check_sees_a_cycle_and_a_function_local_import(tmp_path):
    """The same walk over a made-up pair of modules that import each other, one of them inside a function."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    known = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


MODULE_LINES, STAGE_LINES, FUNCTION_LINES = 400, 150, 60
LONGER_MODULES = {"posttrain.trainers.upo_trainer"}  # the UPO trainer may be longer, each method short
STAGE_SCRIPTS = {f"posttrain.stages.{stage}" for stage in ("sft", "dpo", "upo")}  # one screen around the trainer


def too_long(known: dict[str, Path]) -> list[str]:
    found = []
    for name, path in known.items():
        source = path.read_text(encoding="utf-8")
        limit = STAGE_LINES if name in STAGE_SCRIPTS else MODULE_LINES
        if len(source.splitlines()) > limit and name not in LONGER_MODULES:
            found.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LINES:
                    found.append(f"{name}.{node.name} (line {node.lineno}): {length} lines")
    return found


def test_modules_and_functions_stay_short(tmp_path):
    assert too_long(modules()) == []
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * FUNCTION_LINES + "x = 2\n" * MODULE_LINES)
    assert too_long({"pkg.long": tmp_path / "long.py"}) == [f"pkg.long: {1 + FUNCTION_LINES + MODULE_LINES} lines",
                                                            f"pkg.long.f (line 1): {1 + FUNCTION_LINES} lines"]
    (tmp_path / "stage.py").write_text("x = 1\n" * (STAGE_LINES + 1))
    assert too_long({"posttrain.stages.sft": tmp_path / "stage.py"}) == [
        f"posttrain.stages.sft: {STAGE_LINES + 1} lines"]
