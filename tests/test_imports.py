"""Imports go one way: the model files at the bottom, on the model side of common/; the run side
of common/ above them; data.py, eval.py and train.py on top, and nothing imports train.py.
Read from the source (every import statement, also those inside functions), not by importing.
Tests drive train.main as its command line would; they are not part of the library."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL_FILES = {"mail", "mmnet", "m3dec", "maris"}
SCRIPTS = {"data", "eval", "train"}
# command-line tools under common/ (python -m common.NAME): they may import data.py; nothing
# of the library imports them (common.cache_error borrows the benchmark's synthetic batch)
TOOLS = {"common.benchmark", "common.ablations", "common.detector", "common.cache_error"}
# what a model file may import from common/: layers, losses, encoders, tokenizers, the contract
MODEL_SIDE = {"common", "common.blocks", "common.layers", "common.losses", "common.masks",
              "common.model", "common.optim", "common.tokenizers", "common.encoders"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, pathlib.Path]:
    files = [ROOT / f"{m}.py" for m in MODEL_FILES | SCRIPTS] + sorted(ROOT.glob("common/**/*.py"))
    return {module_name(p): p for p in files}


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (`from common import optim` counts as common.optim)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # common.encoders.sam -> common.encoders ...
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, set(modules)) - {m} for m, p in modules.items()}


def test_the_graph_is_read():
    """The checks below would pass on an empty graph: it must hold the edges we know."""
    g = graph()
    assert "common.layers" in g["maris"] and "data" in g["train"] and "eval" in g["train"]
    assert "common.encoders.loading" in g["common.encoders.sam"]


def test_nothing_imports_train():
    assert [m for m, deps in graph().items() if "train" in deps] == []


def test_common_imports_no_script_except_its_tools():
    bad = {m: deps & SCRIPTS for m, deps in graph().items()
           if m.startswith("common") and m not in TOOLS and deps & SCRIPTS}
    assert bad == {}


def test_nothing_imports_a_tool():
    importers = {m: deps & TOOLS for m, deps in graph().items()
                 if deps & TOOLS and m != "common.cache_error"}
    assert importers == {}


def test_model_files_import_only_the_model_side_of_common():
    g = graph()
    for name in MODEL_FILES:
        others = {d for d in g[name] if not d.startswith("common.encoders")} - MODEL_SIDE
        assert others == set(), f"{name} imports {others}"


def test_the_model_side_of_common_stays_below_the_run_side():
    g = graph()
    for name in MODEL_SIDE | {m for m in g if m.startswith("common.encoders")}:
        for dep in g.get(name, set()):
            assert dep in MODEL_SIDE or dep.startswith("common.encoders"), f"{name} -> {dep}"


def test_no_cycles():
    g, state = graph(), {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", " -> ".join(path + [node])
        state[node] = "open"
        for dep in sorted(g[node]):
            visit(dep, path + [node])
        state[node] = "done"

    for node in sorted(g):
        visit(node, [])
