"""The package's import structure (docs/architecture.md): imports run one way.

Read from the source (ast), counting the imports inside functions too, and the run and check
functions paddlerec/registry.py names (paddlerec/mode.py imports them when a run needs them).
"""

import ast
import os

from paddlerec.registry import RUNNER_CLASSES
from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "paddlerec")


def package_modules():
    return sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py") and name != "__init__.py")


def imported_modules(module):
    """The paddlerec modules `module` imports anywhere in its source (top level or lazily)."""
    with open(os.path.join(PACKAGE, module + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "paddlerec":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "paddlerec" and len(parts) > 1:
                    found.add(parts[1])
    return found & set(package_modules())


def import_graph():
    graph = {module: imported_modules(module) for module in package_modules()}
    for runner_class in RUNNER_CLASSES.values():
        for reference in (runner_class.run, runner_class.check):
            if reference:
                graph["mode"].add(reference.partition(":")[0].split(".")[-1])
    return graph


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_reader_of_this_test_finds_imports_of_every_form():
    # the parser above must see lazy imports and `from . import x`, or the next test proves nothing
    assert "export" in imported_modules("runners")  # from . import checkpoint, curves, export
    assert "runners" in imported_modules("worker")  # imported inside a function
    assert "logs" in imported_modules("serve")  # imported inside main()


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    circles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if a in reachable(graph, b))
    assert not circles, "import circles: " + "; ".join(circles)


def test_config_validation_imports_no_runner_code():
    graph = import_graph()
    runner_code = {"loops", "mode", "runners", "launch", "worker", "serve", "checkpoint", "export"}
    assert not (reachable(graph, "config") | {"config"}) & runner_code
    assert not reachable(graph, "registry") & runner_code


def test_every_runner_class_names_functions_that_exist():
    for name, runner_class in RUNNER_CLASSES.items():
        assert callable(runner_class.run_function()), name
        if runner_class.check:
            assert callable(runner_class.check_function()), name


CALLS = []


def record_the_call(ctx, runner_name):
    """The run function of the runner class the next test declares."""
    CALLS.append((runner_name, ctx.config.runners[runner_name]["greeting"]))


def test_a_new_runner_class_is_one_registry_entry_and_its_run_function(tmp_path, monkeypatch):
    from paddlerec.config import load_config
    from paddlerec.loops import RunContext
    from paddlerec.mode import run
    from paddlerec.params import Param
    from paddlerec.registry import RUNNER_COMMON, RunnerClass
    from tests.helpers import base_config, make_workspace

    params = RUNNER_COMMON + (Param("greeting", "str", "hello", help="what it says"),)
    monkeypatch.setitem(RUNNER_CLASSES, "greet", RunnerClass("greet", params, f"{__name__}:record_the_call"))
    config = base_config()
    config["runner"].append({"name": "hi", "class": "greet", "phases": ["phase_test"], "greeting": "hej"})
    config["mode"] = ["hi"]
    CALLS.clear()
    run(RunContext(load_config(make_workspace(tmp_path, config)), show_progress=False))
    assert CALLS == [("hi", "hej")]


def test_one_train_loop_and_one_evaluation_loop():
    """Only paddlerec/loops.py steps a model: every runner class trains and evaluates through it."""
    callers = {}
    for module in package_modules():
        with open(os.path.join(PACKAGE, module + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("train_step", "eval_step", "begin_epoch"):
                callers.setdefault(node.func.attr, set()).add(module)
    assert callers == {"train_step": {"loops"}, "eval_step": {"loops"}, "begin_epoch": {"loops"}}
