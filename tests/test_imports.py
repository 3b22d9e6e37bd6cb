"""The package's imports run one way: from a module to modules of lower layers, as ``docs/architecture.md`` lists
them, never upwards, sideways or in a circle."""

import ast
import os
import re

import pytest

import hybridmim_components

PACKAGE = os.path.dirname(hybridmim_components.__file__)
ARCHITECTURE = os.path.join(os.path.dirname(PACKAGE), "docs", "architecture.md")


def declared_layers(page: str) -> dict[str, int]:
    """``{module: layer}`` from the numbered list of the page (``1. `a` (...), `b`;``)."""
    layers, current = {}, None
    for line in page.splitlines():
        numbered = re.match(r"(\d+)\. ", line)
        if numbered:
            current = int(numbered.group(1))
        elif not line.startswith("   "):
            current = None
        if current is not None:
            for name in re.findall(r"(?<![`\w])`([a-z_]+)`(?!`)", line):
                layers[name] = current
    return layers


def package_imports(source: str) -> set[str]:
    """The package's modules that ``source`` imports, at any depth (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "hybridmim_components":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("hybridmim_components."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hybridmim_components.")}
    return found


def modules() -> dict[str, str]:
    return {name[:-3]: open(os.path.join(PACKAGE, name)).read()
            for name in sorted(os.listdir(PACKAGE)) if name.endswith(".py") and name != "__init__.py"}


def violations(layers: dict[str, int], sources: dict[str, str]) -> list[str]:
    found = []
    for module, source in sources.items():
        if module not in layers:
            found.append(f"{module} is in no layer of docs/architecture.md")
            continue
        for imported in sorted(package_imports(source)):
            if layers.get(imported, 99) >= layers[module]:
                found.append(f"{module} (layer {layers[module]}) imports {imported} "
                             f"(layer {layers.get(imported, 'none')})")
    return found


def test_every_import_runs_downwards():
    layers = declared_layers(open(ARCHITECTURE).read())
    assert set(layers) == set(modules()), "the page's layers and the package's modules differ"
    assert violations(layers, modules()) == []


@pytest.mark.parametrize("module,line", [
    ("geometry", "from hybridmim_components.networks import HybridMIMUNet"),  # upwards
    ("losses", "    from hybridmim_components.engines import LOSS_TERMS"),  # sideways, inside a function
    ("transforms", "import hybridmim_components.transforms"),  # onto itself: a circle
])
def test_an_import_upwards_sideways_or_in_a_circle_is_found(module, line):
    sources = modules()
    sources[module] += f"\n\ndef _late():\n{line if line.startswith(' ') else '    ' + line}\n"
    layers = declared_layers(open(ARCHITECTURE).read())
    assert len(violations(layers, sources)) == 1
