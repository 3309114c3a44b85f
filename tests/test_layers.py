"""The house's layering, read from the source: imports run one way (command line -> run/API
-> analysis -> engine -> optimizers, potentials -> batch, neighbours), with no cycle between
packages, and the libraries of the edges (ASE, h5py, Typer, Rich) stay out of the core."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "molopt"

#: the numerical core: pure functions over arrays, no files, no command line
CORE = {
    "molopt.batch",
    "molopt.constraints",
    "molopt.linalg3",
    "molopt.neighbors",
    "molopt.optimizers",
    "molopt.potentials",
    "molopt.engine",
    "molopt.scopes",
    "molopt.structure",
    "molopt.symmetry",
}
ABOVE_CORE = {
    "molopt.analysis",
    "molopt.training",
    "molopt.cli",
    "molopt.run",
    "molopt.api",
    "molopt.ase",
    "molopt.config",
    "molopt.io",
    "molopt.hessian_report",
    "molopt.testing",
    "molopt.cluster",
    "molopt.mdanalysis",
}

#: below both: what either may use (errors, element symbols, Ctrl-C, the JAX set-up, vesin)
SHARED = {
    "molopt",
    "molopt._jax",
    "molopt._vesin",
    "molopt.elements",
    "molopt.errors",
    "molopt.interrupt",
    "molopt.startup",
}


def imports() -> dict[str, set[str]]:
    """Module -> every name it imports (module level and inside functions)."""
    found = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found[module].update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package, up level - 1
                    here = module.split(".") if is_package else module.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([node.module] if node.module else []))
                found[module].add(base)
                found[module].update(f"{base}.{a.name}" for a in node.names)
    return found


def package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_the_core_imports_nothing_above_it_nor_the_edges_libraries():
    for module, names in imports().items():
        if package(module) not in CORE:
            continue
        above = {n for n in names if package(n) in ABOVE_CORE}
        edges = {n for n in names if n.split(".")[0] in ("ase", "h5py", "typer", "rich")}
        assert not above, f"{module} imports {sorted(above)}"
        assert not edges, f"{module} imports {sorted(edges)}"


def test_every_module_has_its_layer():
    unplaced = {package(m) for m in imports()} - CORE - ABOVE_CORE - SHARED
    assert not unplaced, f"place {sorted(unplaced)} in CORE, ABOVE_CORE or SHARED"


def test_what_both_layers_share_imports_neither():
    for module, names in imports().items():
        if package(module) in SHARED and module != "molopt":
            up = {n for n in names if package(n) in CORE | ABOVE_CORE}
            assert not up, f"{module} imports {sorted(up)}"


def test_only_the_command_line_imports_typer_and_rich():
    for module, names in imports().items():
        if package(module) != "molopt.cli":
            ui = {n for n in names if n.split(".")[0] in ("typer", "rich")}
            assert not ui, f"{module} imports {sorted(ui)}"


def test_analysis_sits_below_the_run_and_the_command_line():
    for module, names in imports().items():
        if package(module) == "molopt.analysis":
            up = {n for n in names if package(n) in ("molopt.cli", "molopt.run", "molopt.api")}
            assert not up, f"{module} imports {sorted(up)}"


def test_no_import_cycle_between_packages():
    graph = defaultdict(set)
    for module, names in imports().items():
        for name in names:
            a, b = package(module), package(name)
            if b.startswith("molopt.") and a != b and a != "molopt":
                graph[a].add(b)
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
