"""The package's shape: imports point down `tlkit/LAYERS.txt`, with no cycle, and modules use
each other's public names only (STYLE.md, rule 9).

Every module's imports are read with `ast`, at module level and inside functions:
`import tlkit.x`, `from tlkit.x import y`, `from tlkit import x` and relative imports. A
module may import modules on lower lines of the layer list only; modules on one line are
peers and do not import each other. Keras's internals (`keras.src`, `_inbound_nodes`) are
off limits too: they change between Keras releases without notice.
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tlkit"
KERAS_PRIVATE_ATTRIBUTES = ("_inbound_nodes", "_outbound_nodes")


def read_layers(text):
    """The layer list, top first: one list of module names per line (`#` starts a comment)."""
    layers = []
    for line in text.splitlines():
        names = line.split("#", 1)[0].split()
        if names:
            layers.append(names)
    return layers


def package_sources(root=PACKAGE):
    """`{module name: source}` for every module under `root`; `tlkit` is the package itself,
    the others are named relative to it (`serve.model`)."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        sources[".".join(parts) or "tlkit"] = path.read_text()
    return sources


def _is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(module, is_package):
    parts = [] if module == "tlkit" else module.split(".")
    return parts if is_package else parts[:-1]


class _Imports(ast.NodeVisitor):
    """Collects one module's uses of other tlkit modules and of Keras's internals."""

    def __init__(self, module, modules, is_package):
        self.module, self.modules = module, modules
        self.package = _package_of(module, is_package)
        self.targets = []  # (line, imported module)
        self.problems = []  # (line, what is wrong)
        self.aliases = {}  # local name -> tlkit module it is bound to

    def _module(self, parts):
        """The tlkit module named by `parts` (relative to tlkit), or None."""
        name = ".".join(parts) or "tlkit"
        return name if name in self.modules else None

    def _use(self, line, target):
        if target is not None and target != self.module:
            self.targets.append((line, target))

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.startswith("keras.src"):
                self.problems.append((node.lineno, f"imports Keras internals {alias.name}"))
            parts = alias.name.split(".")
            if parts[0] != "tlkit":
                continue
            self._use(node.lineno, self._module(parts[1:]))
            if alias.asname:
                self.aliases[alias.asname] = self._module(parts[1:])
            else:
                self.aliases["tlkit"] = "tlkit"

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.package[:len(self.package) - node.level + 1]
            parts = base + (node.module.split(".") if node.module else [])
        elif node.module and node.module.split(".")[0] == "tlkit":
            parts = node.module.split(".")[1:]
        else:
            if node.module and node.module.startswith("keras.src"):
                self.problems.append((node.lineno, f"imports Keras internals {node.module}"))
            return
        for alias in node.names:
            submodule = self._module([*parts, alias.name])
            if submodule is not None:
                self._use(node.lineno, submodule)
                self.aliases[alias.asname or alias.name] = submodule
                continue
            source = self._module(parts)
            self._use(node.lineno, source)
            if _is_private(alias.name) and source != self.module:
                self.problems.append(
                    (node.lineno, f"imports the private name {alias.name} of {source}"))

    def visit_Attribute(self, node):
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.insert(0, value.attr)
            value = value.value
        self.problems += [(node.lineno, f"uses Keras's private {name}") for name in chain
                          if name in KERAS_PRIVATE_ATTRIBUTES]
        if not isinstance(value, ast.Name):
            self.visit(value)
        elif value.id == "keras" and chain[0] == "src":
            self.problems.append((node.lineno, "uses Keras internals keras.src"))
        elif self.aliases.get(value.id):
            self._attributes(node.lineno, self.aliases[value.id], chain)

    def _attributes(self, line, module, chain):
        """Follows `module.a.b...` through submodules to the first name that is not one."""
        parts = [] if module == "tlkit" else module.split(".")
        for name in chain:
            inner = self._module([*parts, name])
            if inner is None:
                if _is_private(name) and module != self.module:
                    self.problems.append((line, f"uses the private name {name} of {module}"))
                return
            module, parts = inner, [*parts, name]
            self._use(line, module)


def check_structure(sources, layers, packages=()):
    """The structure's violations, one sentence each (none: the structure holds).

    Args:
        sources: `{module name: source}` as `package_sources` returns.
        layers: the layer list as `read_layers` returns, top first.
        packages: names in `sources` that are packages (`__init__.py`); "tlkit" always is.
    """
    problems = []
    level = {}
    for index, names in enumerate(layers):
        for name in names:
            if name in level:
                problems.append(f"LAYERS.txt lists {name} twice")
            level[name] = index
    for name in sorted(set(level) - set(sources)):
        problems.append(f"LAYERS.txt lists {name}, which is not a module")
    graph = {}
    for module, source in sorted(sources.items()):
        if module not in level:
            problems.append(f"{module} is not in LAYERS.txt")
        visitor = _Imports(module, sources, module == "tlkit" or module in packages)
        visitor.visit(ast.parse(source))
        problems += [f"{module}:{line} {what}" for line, what in visitor.problems]
        graph[module] = {target for _, target in visitor.targets}
        for line, target in visitor.targets:
            if module not in level or target not in level:
                continue
            if level[target] < level[module]:
                problems.append(f"{module}:{line} imports {target}, a higher layer")
            elif level[target] == level[module]:
                problems.append(f"{module}:{line} imports {target}, a peer on its line")
    problems += _cycles(graph)
    return list(dict.fromkeys(problems))


def _cycles(graph):
    """One sentence per group of modules that import each other, directly or not (Tarjan's
    strongly connected components), showing one cycle through the group."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    problems = []
    for group in groups:
        cycle = _cycle_in(graph, group)
        problems.append(f"import cycle: {' -> '.join(cycle)}" if len(cycle) > len(group) else
                        f"import cycle: {' -> '.join(cycle)} (in a group of {', '.join(group)})")
    return problems


def _cycle_in(graph, group):
    """A path through `group` that returns to its first module."""
    start, members = group[0], set(group)
    paths = [[start]]
    while paths:
        path = paths.pop(0)
        for target in sorted(graph[path[-1]] & members):
            if target == start:
                return [*path, start]
            if target not in path:
                paths.append([*path, target])
    return group


def _packages():
    return {".".join(p.parent.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("__init__.py")}


def test_imports_point_down_the_layer_list():
    layers = read_layers((PACKAGE / "LAYERS.txt").read_text())
    problems = check_structure(package_sources(), layers, _packages())
    assert problems == [], "\n".join(problems)


BAD_PACKAGE = {
    "tlkit": "from tlkit.low import helper\n",
    "top": "from tlkit import low\nlow._hidden()\n",
    "low": textwrap.dedent("""
        import keras
        from keras.src.backend import config

        def helper():
            from tlkit.top import main
            return keras.src.utils, layer._inbound_nodes
    """),
    "peer_a": "from . import peer_b\n",
    "peer_b": "from tlkit.errors import _secret\n",
    "errors": "import tlkit.peer_a\n",
    "stray": "",
}


def test_the_check_reports_each_kind_of_violation():
    layers = read_layers("tlkit\ntop  # comment\npeer_a peer_b\nlow\nerrors\ngone\n")
    problems = check_structure(BAD_PACKAGE, layers)
    expected = [
        "LAYERS.txt lists gone, which is not a module",
        "errors:1 imports peer_a, a higher layer",
        "low:3 imports Keras internals keras.src.backend",
        "low:7 uses Keras internals keras.src",
        "low:7 uses Keras's private _inbound_nodes",
        "low:6 imports top, a higher layer",
        "peer_a:1 imports peer_b, a peer on its line",
        "peer_b:1 imports the private name _secret of errors",
        "stray is not in LAYERS.txt",
        "top:2 uses the private name _hidden of low",
        "import cycle: errors -> peer_a -> peer_b -> errors",
        "import cycle: low -> top -> low",
    ]
    assert sorted(problems) == sorted(expected), "\n".join(problems)


def test_a_train_config_with_stages_does_not_import_tensorflow():
    code = ("import sys; import tlkit.config as c; c.TrainConfig(stages='head:1@1e-3'); "
            "c.build_config(data_dir='x', stages='head:2@1e-3,all:1@1e-4'); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
