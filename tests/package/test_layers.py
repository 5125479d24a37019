"""The package's layers point down only (read from the source with ast; nothing is imported or run):

    bottom        _library (loading _C, kernels per device, codes, accumulation dtype), _checks, distances
    capabilities  the plain loss (ops, reference, functional, modules, naive), gradcache, mining/, indexed/
    integrations  integrations/ (one module per library replaced)
    cli           cli/ (uses everything); the package's __init__ and __main__ re-export and dispatch

A module imports only from its own layer or below, never another capability's (or package's) underscore
names, and the imports form no cycle."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "tripletloss_cuda"
NAME = PACKAGE.name
BOTTOM = {"_library", "_checks", "distances"}
CORE = {"ops", "reference", "functional", "modules", "naive"}
LEVEL = {"bottom": 0, "core": 1, "gradcache": 1, "mining": 1, "indexed": 1, "integrations": 2, "cli": 3, "top": 4}


def modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def group(module):
    """The layer group of a dotted module name: bottom, core, gradcache, mining, indexed, integrations, cli, top."""
    parts = module.split(".")[1:]
    if not parts or parts[0] == "__main__":
        return "top"
    if parts[0] in BOTTOM:
        return "bottom"
    return "core" if parts[0] in CORE else parts[0]


def imports(module, path, known):
    """[(line, imported module, imported name or None)] of a module, relative imports resolved; a name that is a
    module of the package counts as that module."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == NAME]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != NAME:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub, None) if sub in known else (node.lineno, target, a.name))
    return found


def private_attributes(path, aliases):
    """(line, alias, attribute) for every `alias._name` where alias names an imported module of the package."""
    tree = ast.parse(path.read_text())
    return [
        (node.lineno, node.value.id, node.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]


def module_aliases(path, module, known):
    """{local name: imported module} of the package's modules bound in a file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == NAME:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else NAME
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in known:
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    return aliases


def test_imports_point_down_without_private_cross_imports():
    known = modules()
    problems = []
    for module, path in known.items():
        for line, target, name in imports(module, path, known):
            here, there = group(module), group(target)
            if target == NAME and here in ("cli", "top"):  # the public API, as users import it
                continue
            if LEVEL[there] > LEVEL[here]:
                problems.append(f"{path.name}:{line} {module} ({here}) imports {target} ({there}): upward")
            if name and name.startswith("_") and not name.startswith("__") and there not in (here, "bottom"):
                problems.append(f"{path.name}:{line} {module} imports {target}.{name}: another package's private name")
        aliases = module_aliases(path, module, known)
        for line, alias, attr in private_attributes(path, aliases):
            target = aliases[alias]
            if group(target) not in (group(module), "bottom") and f"{target}.{attr}" not in known:
                problems.append(f"{path.name}:{line} {module} uses {target}.{attr}: another package's private name")
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    known = modules()
    graph = {m: {t for _, t, _ in imports(m, p, known) if t in known and t != m} for m, p in known.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_layer_map_covers_every_module():
    for module in modules():
        assert group(module) in LEVEL, module
