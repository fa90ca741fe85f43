"""The shape of the code: imports flow one way, device code stays in backends/, registries agree
with the spec, --help and README. Each rule reads the source, so a change that breaks it fails."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "batchprobe"

# Layers, bottom first: a module may import its own layer and those below, never above.
LAYERS: list[list[str]] = [
    ["errors", "units", "launcher", "gpus", "backends.hostmem", "schedstat"],
    ["search", "planning"],
    ["backends"],  # the registry alone (no torch)
    ["spec"],
    ["results"],
    ["report.*"],  # rendering: results in, text out; no torch
    ["memory", "examples", "sources.*", "step"],
    ["backends.base", "backends.cpu", "backends.cuda", "backends.cudadriver", "backends.simcuda.*"],
    ["probe", "timing", "noise", "estimate"],
    ["isolate", "ranks"],
    ["session"],
    ["flows", "flows.*"],
    ["cli", "cli.*"],
    ["", "__main__"],  # the package's public API
]
TORCH_FREE = [
    "batchprobe.spec",
    "batchprobe.search",
    "batchprobe.planning",
    "batchprobe.results",
    "batchprobe.backends",
    "batchprobe.backends.hostmem",
    "batchprobe.report.json",
    "batchprobe.report.find_max",
    "batchprobe.report.plan",
    "batchprobe.report.estimate",
    "batchprobe.report.check",
    "batchprobe.report.noise",
    "batchprobe.cli",  # --help costs no torch import
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runtime_imports(path: Path, module: str) -> set[str]:
    """batchprobe modules `module` imports at run time (not under `if TYPE_CHECKING:`). A
    package's own parents are imported before it anyway: no edge to them."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("batchprobe")
        ):
            base = node.module.removeprefix("batchprobe").lstrip(".")
            if base and not module.startswith(f"{base}."):
                found.add(base)
            for alias in node.names:  # `from batchprobe.report import json`: a module
                sub = f"{base}.{alias.name}" if base else alias.name
                if (PACKAGE / Path(*sub.split("."))).with_suffix(".py").exists():
                    found.add(sub)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("batchprobe"):
                    found.add(alias.name.removeprefix("batchprobe").lstrip("."))
    return found


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        for pattern in layer:
            if pattern.endswith(".*") and (
                module == pattern[:-2] or module.startswith(pattern[:-1])
            ):
                return i
            if module == pattern:
                return i
    raise AssertionError(f"batchprobe.{module} is in no layer: add it to LAYERS")


def test_every_import_points_down_or_sideways() -> None:
    upward = []
    for module, path in _modules().items():
        for imported in _runtime_imports(path, module):
            if _layer(imported) > _layer(module):
                upward.append(f"{module or 'batchprobe'} -> {imported}")
    assert not upward, upward


def test_there_are_no_import_cycles() -> None:
    graph = {m: _runtime_imports(p, m) - {m} for m, p in _modules().items()}
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in done or node not in graph:
            return
        assert node not in visiting, f"import cycle: {' -> '.join([*trail, node])}"
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, [*trail, node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


@pytest.mark.parametrize("module", TORCH_FREE)
def test_modules_that_never_touch_a_device_do_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", f"{module} imports torch"


def _device_code(tree: ast.AST) -> list[int]:
    """Lines that test a device type (`x.type == "cuda"`) or call into torch.cuda."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            typed = any(isinstance(s, ast.Attribute) and s.attr == "type" for s in sides)
            named = any(isinstance(s, ast.Constant) and s.value in ("cuda", "cpu") for s in sides)
            if typed and named:
                found.append(node.lineno)
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("torch.cuda."):
            found.append(node.lineno)
    return found


def test_device_types_are_tested_only_in_backends() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in PACKAGE.rglob("*.py")
        if "backends" not in path.parts
        for line in _device_code(ast.parse(path.read_text()))
    ]
    assert not found, found
    # the rule can fail
    assert _device_code(ast.parse('if x.device.type == "cuda": torch.cuda.synchronize()'))


def test_nothing_cites_documents_outside_the_repository() -> None:
    pattern = re.compile(r"DESIGN\.md|REFERENCE\.md|STYLE\.md|\.\./shared")
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), ROOT / "README.md"]
    files += [*(ROOT / "docs").rglob("*.md")] if (ROOT / "docs").exists() else []
    cited = [
        str(f.relative_to(ROOT))
        for f in files
        if f != Path(__file__) and pattern.search(f.read_text())
    ]
    assert not cited, cited


def test_no_class_over_200_lines_and_thin_views() -> None:
    big = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno >= 200:  # type: ignore[operator]
                big.append(f"{path.name}:{node.name}")
    assert not big, big
    for path in [*(PACKAGE / "cli").glob("*.py"), *(PACKAGE / "report").glob("*.py")]:
        assert len(path.read_text().splitlines()) < 450, path.name


def test_strategies_agree_with_the_spec_help_and_readme() -> None:
    from typer.testing import CliRunner

    from batchprobe.cli import app
    from batchprobe.search import STRATEGIES
    from batchprobe.spec import Strategy

    assert set(typing.get_args(Strategy)) == {"auto", *STRATEGIES}
    help_text = " ".join(CliRunner().invoke(app, ["find-max", "--help"]).stdout.split())
    readme = (ROOT / "README.md").read_text()
    for name in STRATEGIES:
        assert name in help_text, name
        assert f"`{name}`" in readme, name


def test_backends_agree_with_the_spec_and_help() -> None:
    from typer.testing import CliRunner

    from batchprobe.backends import REGISTRY
    from batchprobe.cli import app
    from batchprobe.spec import key_doc

    help_text = " ".join(CliRunner().invoke(app, ["find-max", "--help"]).stdout.split())
    for entry in REGISTRY:
        assert entry.type in key_doc("probe.device")
        assert entry.type in help_text
        assert (PACKAGE / Path(*entry.module.split(".")[1:])).with_suffix(".py").exists()
