"""The packages import one way, launch -> workers -> trainer, and no module imports
itself back through others.  Every import statement counts, also one inside a function:
it runs as surely, only later."""
import ast
import os

from conftest import REPO

PACKAGES = ("trainer", "workers", "launch")  # bottom to top
LAYER = {package: rank for rank, package in enumerate(PACKAGES)}


def python_modules(repo=REPO):
    """-> {module: path} of every .py file of the three packages and their subpackages
    (a package's __init__.py is the package: trainer.models)."""
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(repo, package)):
            prefix = os.path.relpath(folder, repo).replace(os.sep, ".")
            for name in files:
                if name.endswith(".py"):
                    module = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    modules[module] = os.path.join(folder, name)
    return modules


def module_imports(repo=REPO):
    """-> {module: {our modules it imports}} for every .py file of the three packages."""
    modules = python_modules(repo)
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    here = module.split(".") + (["__init__"] if modules[module].endswith("__init__.py") else [])
                    base = ".".join(here[:-node.level] + ([base] if base else []))
                # `from trainer import gemm` imports the module trainer.gemm
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names]
            else:
                continue
            targets.update(name for name in names if name.split(".")[0] in LAYER and name in modules)
        graph[module] = targets - {module}
    return graph


def upward_imports(graph):
    return sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                  if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]])


def cycles(graph):
    """Every import cycle, each as the list of modules around it (found by depth-first search)."""
    found, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_imports_run_launch_workers_trainer():
    assert upward_imports(module_imports()) == []


def test_no_import_cycles():
    assert cycles(module_imports()) == []


def test_the_checks_see_function_level_and_relative_imports(tmp_path):
    """The checker itself, on a small tree: a function-level upward import and a
    cycle closed by a relative import are both found."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "trainer" / "model.py").write_text("def f():\n    from launch import cli\n")
    (tmp_path / "launch" / "cli.py").write_text("from . import sweep\n")
    (tmp_path / "launch" / "sweep.py").write_text("def g():\n    from launch.cli import main\n")
    graph = module_imports(str(tmp_path))
    assert upward_imports(graph) == ["trainer.model imports launch.cli"]
    assert cycles(graph) == [["launch.cli", "launch.sweep", "launch.cli"]]


# the modules that may know which strategy they are: the strategies themselves
STRATEGY_MODULES = ("workers.strategy", "workers.strategies", "workers.hybrid", "workers.data_parallel")
STRATEGY_NAMES = ("hybrid", "data")


def strategy_branches(repo=REPO):
    """-> ['module:line'] of every test of which strategy runs outside the strategy
    modules: `==`/`!=` against a strategy's name or a `parallel` setting, or an `if`
    on a flag named after one (`if self.data:`)."""
    flags = ("parallel",) + STRATEGY_NAMES
    found = []
    for module, path in python_modules(repo).items():
        if module in STRATEGY_MODULES:
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                sides = [node.left] + node.comparators
                if any(isinstance(side, ast.Constant) and side.value in STRATEGY_NAMES for side in sides) or any(
                        isinstance(side, ast.Attribute) and side.attr == "parallel" for side in sides):
                    found.append(f"{module}:{node.lineno}")
            tests = [node.test] if isinstance(node, (ast.If, ast.IfExp)) else (
                node.ifs if isinstance(node, ast.comprehension) else [])
            for test in tests:
                names = [n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(test)
                         if isinstance(n, (ast.Attribute, ast.Name))]
                if any(n in flags for n in names) and not isinstance(test, ast.Compare):
                    found.append(f"{module}:{test.lineno}")
    return sorted(set(found))


def test_no_strategy_branch_outside_the_strategies():
    assert strategy_branches() == []


def test_the_branch_check_sees_a_strategy_test(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "launch" / "train.py").write_text("def f(s):\n    if s.parallel == 'data':\n        pass\n")
    (tmp_path / "workers" / "pool.py").write_text("x = 1\nif 'hybrid' != x:\n    pass\n")
    (tmp_path / "workers" / "worker.py").write_text("y = 2 if self.data and z else 3\n"
                                                    "b = [r for r in x if self.data]\n")
    (tmp_path / "workers" / "hybrid.py").write_text("if name == 'hybrid':\n    pass\n")  # its own name: allowed
    (tmp_path / "launch" / "config.py").write_text("ok = s.parallel in STRATEGIES\n")  # validation: allowed
    assert strategy_branches(str(tmp_path)) == ["launch.train:2", "workers.pool:2", "workers.worker:1",
                                                  "workers.worker:2"]
