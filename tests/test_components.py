"""Each component owns its concern: GPT-2's names live in the GPT-2 family (and llm.c's
format, which is GPT-2's by definition), the families import nothing from workers/
or launch/, which optimizer runs is known only to the optimizers' registry, and
whether LoRA trains only to LoRA's modules.
The checks walk the syntax tree: string constants (not docstrings) and the names of
variables, attributes, arguments, functions and classes."""
import ast
import re

from test_layers import module_imports, python_modules

GPT2_MODULES = ("trainer.models.gpt2", "trainer.llmc")
# Hugging Face GPT-2's parameter names, and its blocks' prefix h.{l}.
GPT2_NAMES = re.compile(r"(^|[^a-z])(wte|wpe|c_attn|c_proj|c_fc|ln_f|ln_1|ln_2)([^a-z0-9]|$)|^h\.")
OPTIMIZER_MODULES = ("trainer.optimizers", "trainer.adamw8bit")
OPTIMIZER_NAMES = ("adamw", "adamw8bit")


def docstrings(tree):
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def words(tree):
    """-> [(line, text)] of the string constants (docstrings aside) and identifiers of a tree."""
    skip, found = docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found.append((node.lineno, node.value))
        elif isinstance(node, (ast.Name, ast.Attribute, ast.arg, ast.FunctionDef, ast.ClassDef)):
            text = {ast.Name: "id", ast.Attribute: "attr", ast.arg: "arg"}.get(type(node), "name")
            found.append((node.lineno, getattr(node, text)))
    return found


def trees_outside(allowed, repo=None):
    """-> (module, syntax tree) of every module outside `allowed`, in name order."""
    for module, path in sorted(python_modules(*([repo] if repo else [])).items()):
        if not module.startswith(allowed):
            with open(path) as f:
                yield module, ast.parse(f.read())


def outside(allowed, match, repo=None):
    """-> ['module:line: text'] of every word that `match` accepts in a module outside `allowed`."""
    return [f"{module}:{line}: {text!r}" for module, tree in trees_outside(allowed, repo)
            for line, text in words(tree) if match(text)]


def gpt2_names(repo=None):
    return outside(GPT2_MODULES, GPT2_NAMES.search, repo)


def optimizer_names(repo=None):
    return outside(OPTIMIZER_MODULES, lambda text: text in OPTIMIZER_NAMES, repo)


def test_no_gpt2_name_outside_the_gpt2_family():
    assert gpt2_names() == []


def test_the_families_import_nothing_from_workers_or_launch():
    graph = module_imports()
    assert sorted(f"{module} imports {target}" for module, targets in graph.items()
                  if module.startswith("trainer.models") for target in targets
                  if not target.startswith("trainer.")) == []


def test_no_optimizer_named_outside_the_optimizers():
    assert optimizer_names() == []


# LoRA's what-trains component: its math, layout and model sites; peft's files; its
# frozen base; where its weights come from; and the one place the choice is made
LORA_MODULES = ("trainer.lora", "trainer.lora_training", "trainer.peft", "trainer.base", "launch.adapters",
                "trainer.trainable")


def branch_tests(tree):
    """Every expression a tree branches on: if / while / conditional-expression
    tests, each operand of `and` / `or`, comprehension filters, match subjects."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            yield node.test
        elif isinstance(node, ast.BoolOp):
            yield from node.values
        elif isinstance(node, ast.comprehension):
            yield from node.ifs
        elif isinstance(node, ast.Match):
            yield node.subject


def lora_branches(repo=None):
    """-> ['module:line: text'] of every branch outside LoRA's modules whose test names
    LoRA (an identifier or string containing "lora")."""
    found = []
    for module, tree in trees_outside(LORA_MODULES, repo):
        for test in branch_tests(tree):
            found += [f"{module}:{line}: {text!r}" for line, text in words(test) if "lora" in text.lower()]
    return sorted(set(found))


def test_no_lora_branch_outside_its_component():
    """Full training or LoRA is chosen once (trainer/trainable.py); everything else
    asks the chosen component and never branches on which it is."""
    assert lora_branches() == []


def module_state(repo=None):
    """-> ['module:line'] of every `global` statement and every module-level name bound
    to an empty dict, list or set (a cache to be filled) in trainer/."""
    found = []
    for module, path in sorted(python_modules(*([repo] if repo else [])).items()):
        if not module.startswith("trainer"):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        found += [f"{module}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Global)]
        for node in tree.body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            empty = (isinstance(value, (ast.Dict, ast.List, ast.Set)) and not getattr(value, "keys", None)
                     and not getattr(value, "elts", None)) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                and value.func.id in ("dict", "list", "set") and not value.args and not value.keywords)
            if empty:
                found.append(f"{module}:{node.lineno}")
    return sorted(found, key=lambda where: (where.rsplit(":", 1)[0], int(where.rsplit(":", 1)[1])))


def test_no_engine_or_cache_in_module_state():
    """The GEMM engine is passed to what multiplies, and buffers belong to an object
    (attention's Workspace): no module of trainer/ holds state of its own."""
    assert module_state() == []


def test_the_checks_see_names_in_strings_and_identifiers(tmp_path):
    """The checkers, on a small tree: a GPT-2 name as a string, an f-string prefix and
    an argument, and an optimizer's name compared, are found; a docstring and the
    family's own module are not."""
    for package in ("trainer", "workers", "launch"):
        (tmp_path / package).mkdir()
    (tmp_path / "trainer" / "models").mkdir()
    (tmp_path / "trainer" / "models" / "gpt2.py").write_text("x = 'wte.weight'\n")  # the family's own: allowed
    (tmp_path / "trainer" / "head.py").write_text('"""ties wte"""\ndef f(wte):\n    return f"h.{1}.ln_1"\n')
    (tmp_path / "workers" / "pool.py").write_text("y = 1\nif kind == 'adamw8bit':\n    pass\n")
    assert gpt2_names(str(tmp_path)) == ["trainer.head:2: 'wte'", "trainer.head:3: 'h.'",
                                         "trainer.head:3: '.ln_1'"]
    assert optimizer_names(str(tmp_path)) == ["workers.pool:2: 'adamw8bit'"]
    (tmp_path / "workers" / "worker.py").write_text(
        "a = b if s.lora_rank else c\nif x and 'lora' in kind:\n    pass\n"
        "names = [n for n in t if n.endswith('.lora_A')]\nlora = make()\nrun(lora)\n")
    assert lora_branches(str(tmp_path)) == ["workers.worker:1: 'lora_rank'", "workers.worker:2: 'lora'",
                                            "workers.worker:4: '.lora_A'"]
    (tmp_path / "trainer" / "gemm.py").write_text("_engine = None\n_cache = {}\nTABLE = {'a': 1}\nSEEN = set()\n"
                                                  "def install(e):\n    global _engine\n    _engine = e\n")
    assert module_state(str(tmp_path)) == ["trainer.gemm:2", "trainer.gemm:4", "trainer.gemm:6"]
