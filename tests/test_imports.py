"""The packages' imports run one way: from a module to modules of lower layers, as ``docs/architecture.md`` lists
them, never upwards, sideways or in a circle; the tools import packages, never each other, and nothing in
``tools/`` or ``tests/`` edits ``sys.path``."""

import ast
import os
import re

import pytest

import hybridmim_components
import hybridmim_studies

PACKAGES = {"hybridmim_components": os.path.dirname(hybridmim_components.__file__),
            "hybridmim_studies": os.path.dirname(hybridmim_studies.__file__)}
REPO = os.path.dirname(PACKAGES["hybridmim_components"])
ARCHITECTURE = os.path.join(REPO, "docs", "architecture.md")


def section(page: str, package: str) -> str:
    """The part of the page under the heading that names ``package`` (``## ... `package` ...``)."""
    parts = re.split(r"^## ", page, flags=re.M)
    return next(part for part in parts if part.splitlines()[0].find(f"`{package}`") >= 0)


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


def package_imports(source: str, package: str = "hybridmim_components") -> set[str]:
    """The package's modules that ``source`` imports, at any depth (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == package:
                found |= {alias.name for alias in node.names}
            elif node.module.startswith(package + "."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")}
    return found


def modules(package: str = "hybridmim_components") -> dict[str, str]:
    folder = PACKAGES[package]
    return {name[:-3]: open(os.path.join(folder, name)).read()
            for name in sorted(os.listdir(folder)) if name.endswith(".py") and name != "__init__.py"}


def violations(layers: dict[str, int], sources: dict[str, str], package: str = "hybridmim_components") -> list[str]:
    found = []
    for module, source in sources.items():
        if module not in layers:
            found.append(f"{module} is in no layer of docs/architecture.md")
            continue
        for imported in sorted(package_imports(source, package)):
            if layers.get(imported, 99) >= layers[module]:
                found.append(f"{module} (layer {layers[module]}) imports {imported} "
                             f"(layer {layers.get(imported, 'none')})")
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_import_runs_downwards(package):
    layers = declared_layers(section(open(ARCHITECTURE).read(), package))
    assert set(layers) == set(modules(package)), "the page's layers and the package's modules differ"
    assert violations(layers, modules(package), package) == []


@pytest.mark.parametrize("module,line", [
    ("geometry", "from hybridmim_components.networks import HybridMIMUNet"),  # upwards
    ("losses", "    from hybridmim_components.engines import LOSS_TERMS"),  # sideways, inside a function
    ("transforms", "import hybridmim_components.transforms"),  # onto itself: a circle
])
def test_an_import_upwards_sideways_or_in_a_circle_is_found(module, line):
    sources = modules()
    sources[module] += f"\n\ndef _late():\n{line if line.startswith(' ') else '    ' + line}\n"
    layers = declared_layers(section(open(ARCHITECTURE).read(), "hybridmim_components"))
    assert len(violations(layers, sources)) == 1


def tool_problems(sources: dict[str, str]) -> list[str]:
    """A tool that imports another tool (``tools/`` is no package: such an import works only through an edited
    ``sys.path``), and any code that changes ``sys.path``, in ``sources`` (``{path: source}``)."""
    tools = {os.path.basename(p)[:-3] for p in os.listdir(os.path.join(REPO, "tools")) if p.endswith(".py")}
    found = []
    for path, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path} imports the tool {name}" for name in names if name.split(".")[0] in tools]
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            if target is not None and ast.unparse(target) == "sys.path":
                found.append(f"{path}:{node.lineno} calls sys.path.{node.func.attr}")
    return found


def scripts() -> dict[str, str]:
    found = {}
    for folder in ("tools", "tests"):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if name.endswith(".py"):
                found[f"{folder}/{name}"] = open(os.path.join(REPO, folder, name)).read()
    return found


def test_tools_and_tests_import_packages_and_leave_sys_path_alone():
    assert tool_problems(scripts()) == []


@pytest.mark.parametrize("line", ["from benchmark_step import main", "import verify_bundles",
                                  "sys.path.insert(0, 'tools')"])
def test_a_tool_importing_a_tool_or_a_sys_path_edit_is_found(line):
    sources = scripts()
    sources["tools/gpu_check.py"] += f"\n\ndef _late():\n    {line}\n"
    assert len(tool_problems(sources)) == 1
