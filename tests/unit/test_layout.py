"""The package layout follows the data path: a package imports only the packages below it.

The rule lives here, once: ``ALLOWED`` names for each subpackage of ``orthanc_plugin`` the
subpackages it may import. Every package docstring repeats its line in words; this test keeps
the two honest and fails on any import that runs upwards, on circles between modules, and on
the product importing the local stack (``devstack``), the tests or the benchmarks.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.common import ROOT

PACKAGE = ROOT / "orthanc_plugin"

ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "jobs": {"core"},
    "imaging": {"core"},
    "inference": {"core"},
    "models": {"core"},
    "outputs": {"core", "imaging"},
    "fhir": {"core", "jobs"},
    "hl7": {"core", "jobs"},
    "orthanc_rest": {"core", "jobs", "imaging"},
    "intake": {"core", "jobs"},
    "monitoring": {"core", "jobs"},
    "review": {"core", "jobs", "imaging", "outputs", "fhir", "orthanc_rest"},
    "worker": {"core", "jobs", "imaging", "inference", "outputs", "fhir", "hl7", "orthanc_rest", "review"},
    "server": {"core", "jobs", "intake", "monitoring", "fhir", "orthanc_rest", "inference", "worker"},
    "viewer": set(),
}
#: never imported by the product
FOREIGN = ("devstack", "tests", "bench", "scripts", "triton_models")


def imported_modules(source: str, module: str) -> Iterator[str]:
    """Absolute names of the modules a source imports (relative imports resolved against ``module``)."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name
            # ``from orthanc_plugin.x import y`` may name a module y
            yield from (f"{name}.{alias.name}" for alias in node.names)


def violations(module: str, source: str) -> list[str]:
    """Imports of ``module`` that break the layout rule, in words."""
    parts = module.split(".")
    own = parts[1] if len(parts) > 2 else None  # None: a top-level module (__main__, orthanc_entry)
    found = []
    for name in imported_modules(source, module):
        top = name.split(".")[0]
        if top in FOREIGN:
            found.append(f"{module} imports {top}: the product never imports {top}/")
        if top != "orthanc_plugin" or own is None:
            continue
        target = name.split(".")[1] if name.count(".") >= 1 else None
        if target is None or target == own or target not in ALLOWED:
            continue
        if target not in ALLOWED[own]:
            found.append(
                f"{module} imports {target}: '{own}' may import only {sorted(ALLOWED[own]) or 'nothing'}"
            )
    return sorted(set(found))


def product_modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_every_subpackage_has_a_rule_and_a_docstring_that_states_it() -> None:
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(ALLOWED), (
        f"packages without a rule or rules without a package: {packages ^ set(ALLOWED)}"
    )
    for name in sorted(packages):
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        assert "Owns:" in doc and "May import:" in doc, (
            f"orthanc_plugin/{name}/__init__.py must say what it owns and may import"
        )
        stated = doc.split("May import:", 1)[1]
        for other in ALLOWED[name]:
            assert f"``{other}``" in stated, f"orthanc_plugin/{name}: docstring does not list '{other}'"
        if not ALLOWED[name]:
            assert "nothing of this product" in stated


def test_no_package_imports_one_above_it() -> None:
    found = [v for module, path in product_modules().items() for v in violations(module, path.read_text())]
    assert not found, "imports against the layout rule:\n" + "\n".join(found)


def test_no_circles_between_modules() -> None:
    modules = product_modules()
    graph = {
        m: {
            n
            for n in imported_modules(p.read_text(), m)
            if n in modules and n != m and not m.startswith(n + ".")
        }
        for m, p in modules.items()
    }
    # packages' __init__ modules hold only docstrings: an edge to one is an edge to nothing
    graph = {m: {n for n in deps if modules[n].name != "__init__.py"} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_product_module_imports() -> None:
    # Modules that need Orthanc's process (it provides the `orthanc` module), and those importing them.
    imports = {m: set(imported_modules(p.read_text(), m)) for m, p in product_modules().items()}
    inside_orthanc = {"orthanc"}
    while True:
        more = {m for m, names in imports.items() if names & inside_orthanc} - inside_orthanc
        if not more:
            break
        inside_orthanc |= more
    assert "orthanc_plugin.server.plugin" in inside_orthanc
    for module in sorted(set(imports) - inside_orthanc):
        importlib.import_module(module)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        # a lower package reaching up: jobs -> worker
        (
            "orthanc_plugin.jobs.store",
            "from orthanc_plugin.worker.loop import Worker\n",
            "'jobs' may import only ['core']",
        ),
        # the same, relative
        ("orthanc_plugin.core.config", "from ..intake import routing\n", "'core' may import only nothing"),
        # the product importing the local stack
        ("orthanc_plugin.server.plugin", "import devstack.stack\n", "never imports devstack/"),
        # a lazy import inside a function counts too
        (
            "orthanc_plugin.imaging.volume",
            "def f():\n    from orthanc_plugin.outputs import seg\n",
            "'imaging' may import only ['core']",
        ),
    ],
)
def test_the_rule_catches_an_upward_import(module: str, source: str, expected: str) -> None:
    found = violations(module, source)
    assert len(found) == 1 and expected in found[0], found


def test_the_rule_allows_imports_downwards_and_within_a_package() -> None:
    ok = "from orthanc_plugin.core.config import Settings\nfrom orthanc_plugin.worker import pipeline\nfrom . import loop\n"
    assert violations("orthanc_plugin.worker.loop", ok) == []
