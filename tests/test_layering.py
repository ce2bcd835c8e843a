"""The package's import graph, read from the source with ``ast`` (function-level imports included):
no import cycle, and no arrow from a lower layer to a higher one. A new module must be given a layer
here, so the picture in README's "How it fits together" stays true."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# Bottom-up. A module may import from its own layer (if that makes no cycle) and from layers below.
LAYERS: list[set[str]] = [
    {"device", "metrics", "losses", "mcloss", "augment", "tracking", "hooks", "budget"},  # no pipeline imports
    {"models"},  # the registry (a leaf) and the architectures; the PCA head module
    {"pca", "data", "config"},  # fitting a PCA; shards and streams; typed configuration
    {"objectives", "evaluate", "plots", "export", "cluster", "protocols", "keypoints"},
    {"checkpoint"},
    {"train"},
    {"tune"},
    {"registry"},
    {"workflow", "submit"},
    {"cli", "pipeline"},  # the command, and the package's load_descriptor
]
RANK = {component: i for i, layer in enumerate(LAYERS) for component in layer}


def component(module: str) -> str:
    """``pipeline.models.hardnet`` -> ``models``; ``pipeline.data.stream`` -> ``data``; ``pipeline`` -> ``pipeline``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source. ``from pkg import sub``
    is an import of the submodule ``pkg.sub`` (like ``import pkg.sub``, whose parent packages are
    not counted either)."""
    name = root.name
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    pkg = module.split(".") if is_package else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
                targets |= subs if len(subs) == len(node.names) else subs | {base}
        graph[module] = {t for t in targets if t in modules and t != module and (t == name or t.startswith(name + "."))}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    scc.append(top)
                    if top == node:
                        break
                if len(scc) > 1:
                    found.append(sorted(scc))
    return found


def layering_problems(graph: dict[str, set[str]]) -> list[str]:
    """One line per module without a layer, per upward arrow and per import cycle."""
    problems = [f"{m}: no layer for {component(m)!r}; add it to LAYERS in tests/test_layering.py"
                for m in sorted(graph) if component(m) not in RANK]
    for module in sorted(graph):
        for target in sorted(graph[module]):
            src, dst = component(module), component(target)
            if src in RANK and dst in RANK and RANK[dst] > RANK[src]:
                problems.append(f"{module} -> {target}: {src} (layer {RANK[src]}) must not import {dst} (layer {RANK[dst]})")
    problems += [f"import cycle: {' <-> '.join(scc)}" for scc in _cycles(graph)]
    return problems


def test_the_package_has_no_cycle_and_no_upward_arrow():
    graph = import_graph()
    assert {"pipeline.models.registry", "pipeline.workflow", "pipeline.checkpoint"} <= set(graph)  # it read the tree
    assert "pipeline.models.registry" in graph["pipeline.models.hardnet"]
    assert layering_problems(graph) == []


def test_the_checker_fires_on_the_old_cycle_and_its_upward_arrows():
    # Before the redesign: config -> models -> models/sift (SiftBaseline) -> evaluate -> objectives -> config,
    # held together by function-level imports; and registry took METRIC / model_from_checkpoint from train.
    old = {
        "pipeline.config": {"pipeline.models"},
        "pipeline.models": {"pipeline.models.sift"},
        "pipeline.models.sift": {"pipeline.evaluate"},
        "pipeline.evaluate": {"pipeline.objectives"},
        "pipeline.objectives": {"pipeline.config"},
        "pipeline.models.hardnet8": {"pipeline.pca"},
    }
    problems = layering_problems(old)
    assert "import cycle: pipeline.config <-> pipeline.evaluate <-> pipeline.models <-> pipeline.models.sift <-> pipeline.objectives" in problems
    assert "pipeline.models.sift -> pipeline.evaluate: models (layer 1) must not import evaluate (layer 3)" in problems
    assert "pipeline.models.hardnet8 -> pipeline.pca: models (layer 1) must not import pca (layer 2)" in problems
    assert len(problems) == 3


def test_the_checker_fires_on_a_cycle_within_a_layer_and_on_a_module_without_a_layer():
    assert layering_problems({"pipeline.evaluate": {"pipeline.objectives"}, "pipeline.objectives": {"pipeline.evaluate"}}) == [
        "import cycle: pipeline.evaluate <-> pipeline.objectives"]
    assert layering_problems({"pipeline.newthing": set()}) == [
        "pipeline.newthing: no layer for 'newthing'; add it to LAYERS in tests/test_layering.py"]
    assert layering_problems({"pipeline.registry": {"pipeline.train"}, "pipeline.train": set()}) == []  # downward is fine


def test_the_graph_counts_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("from . import sift\n")
    (pkg / "models" / "sift.py").write_text(textwrap.dedent("""
        import torch

        def late():
            from pipeline import train  # hidden in a function: still an arrow
            return train
    """))
    graph = import_graph(pkg)
    assert graph == {"pipeline": set(), "pipeline.train": set(), "pipeline.models": {"pipeline.models.sift"},
                     "pipeline.models.sift": {"pipeline.train"}}
    assert layering_problems(graph) == ["pipeline.models.sift -> pipeline.train: models (layer 1) must not import train (layer 5)"]


@pytest.mark.parametrize("low", ["models", "losses", "metrics", "pca", "data"])
def test_the_low_layers_import_nothing_from_the_top(low):
    """The issue's rule, spelled out: models, losses, metrics, pca and data import nothing from
    train, tune, registry or cli (implied by the layers; checked here by name)."""
    graph = import_graph()
    for module, targets in graph.items():
        if component(module) == low:
            assert not {component(t) for t in targets} & {"train", "tune", "registry", "cli", "workflow"}, module
