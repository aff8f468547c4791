"""Imports run one way: a module imports only from its own layer or the layers below it,
and no group of modules imports itself round in a circle. Read from the source (every
``import`` statement, at module level or inside a function), not from what a run loads."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where the package's modules live in the checkout (pyproject's package-dir).
PACKAGE_DIRS = {
    "addertrain": "addertrain",
    "kernels": "addertrain.kernels",
    "launch": "addertrain.launch",
}

# Lowest first. A name covers the module and, for a subpackage, everything in it; the root
# package "addertrain" covers only its own __init__, so a new module must be placed here.
LAYERS = [
    ("base", ["addertrain", "addertrain.errors"]),
    ("config", ["addertrain.config"]),
    (
        "services",
        [
            "addertrain.console",
            "addertrain.storage",
            "addertrain.preempt",
            "addertrain.runlock",
            "addertrain.metrics",
            "addertrain.distributed",
            "addertrain.watchdog",
            "addertrain.phases",
        ],
    ),
    ("adder ops", ["addertrain.ops", "addertrain.kernels"]),
    ("layers", ["addertrain.nn"]),
    ("models", ["addertrain.models"]),
    (
        "training parts",
        [
            "addertrain.alr",
            "addertrain.schedule",
            "addertrain.engine",
            "addertrain.checkpoint",
            "addertrain.data",
            "addertrain.model_io",
            "addertrain.evaluate",
            "addertrain.distill",
        ],
    ),
    ("trainer", ["addertrain.trainer"]),
    ("worker", ["addertrain.worker", "addertrain.warmup", "addertrain.smoke"]),
    ("launch", ["addertrain.launch"]),
    (
        "commands",
        [
            "addertrain.cli",
            "addertrain.export",
            "addertrain.report",
            "addertrain.opcount",
            "addertrain.sweep",
            "addertrain.bench",
        ],
    ),
]


def source_files() -> dict[str, Path]:
    """{installed module name: file} of every module of the package in the checkout."""
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [*package.split("."), *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import statement in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            # `from a import b` imports the module a.b when there is one, else names of a
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        found += [(t, node.lineno) for t in targets if t in known and t != name]
    return sorted(set(found), key=lambda hit: (hit[1], hit[0]))


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), i)
        for i, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or ("." in prefix and module.startswith(prefix + "."))
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return max(matches)[1]


def graph() -> dict[str, list[tuple[str, int]]]:
    files = source_files()
    return {name: imports(name, path, set(files)) for name, path in files.items()}


def test_no_module_imports_a_higher_layer():
    files = source_files()
    upward = []
    for name, targets in graph().items():
        for target, line in targets:
            if layer_of(target) > layer_of(name):
                upward.append(
                    f"{files[name].relative_to(ROOT)}:{line}: {name} "
                    f"({LAYERS[layer_of(name)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def cycles(edges: dict[str, list[str]]) -> list[str]:
    """Each cycle a depth-first search meets, as "a -> b -> a"."""
    state: dict[str, str] = {}  # "open" while on the search path, then "done"
    found = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                found.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    return found


def test_no_import_cycles():
    edges = {name: sorted({t for t, _ in targets}) for name, targets in graph().items()}
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_checker_sees_upward_and_circular_imports(tmp_path):
    """The walk finds function-level and relative imports, and a cycle of two modules."""
    mod = tmp_path / "m.py"
    mod.write_text("from .common import x\n\ndef f():\n    from addertrain import trainer\n")
    known = {"addertrain.kernels.common", "addertrain.trainer", "addertrain.kernels.m"}
    assert imports("addertrain.kernels.m", mod, known) == [
        ("addertrain.kernels.common", 1),
        ("addertrain.trainer", 4),
    ]
    assert layer_of("addertrain.trainer") > layer_of("addertrain.kernels.m")
    with pytest.raises(AssertionError, match="addertrain.new is in no layer"):
        layer_of("addertrain.new")
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a -> b -> c -> a"]
    assert cycles({"a": ["b"], "b": [], "c": ["b"]}) == []
