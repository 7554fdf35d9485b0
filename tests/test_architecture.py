"""The import structure of hf_cim (docs/architecture.md): no circle, and the lower floors never import the upper ones.

Read from the source (every import, at module level or inside a function), not from what Python happened to load.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_cim"

#: Integrations and user-facing rooms: nothing below them may import them.
UPPER = {
    "hf_cim.alignment",
    "hf_cim.callbacks",
    "hf_cim.chip",
    "hf_cim.evaluation",
    "hf_cim.hub",
    "hf_cim.memory",
    "hf_cim.model_card",
    "hf_cim.peft_utils",
    "hf_cim.quantizer",
    "hf_cim.resume",
}
#: The core: config and presets, the layers and the patcher, the simulation below them.
LOWER_PREFIXES = (
    "hf_cim.config",
    "hf_cim.presets",
    "hf_cim.validation",
    "hf_cim.patch",
    "hf_cim.layers",
    "hf_cim.moe",
    "hf_cim.ste",
    "hf_cim.tile",
    "hf_cim.converters",
    "hf_cim.kernels",
    "hf_cim.native",
    "hf_cim.rng",
    "hf_cim.noise",
)
#: Leaf helpers: they import nothing of hf_cim.
LEAVES = {"hf_cim.validation", "hf_cim.redact", "hf_cim.distributed", "hf_cim.peft_names"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
    base = PACKAGE.parent / name.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] == "hf_cim":
                    for alias in node.names:
                        full = f"{target}.{alias.name}"
                        deps.add(full if _exists(full) else target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "hf_cim"}
        deps.discard(name)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is not a way back up
            if node != "hf_cim" and dep == "hf_cim":
                return [*stack, dep]
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_reader_sees_the_package():
    graph = _graph()
    assert {"hf_cim", "hf_cim.config", "hf_cim.presets", "hf_cim.hub", "hf_cim.callbacks"} <= set(graph)
    assert "hf_cim.presets" in graph["hf_cim.config"]  # presets are data below the config


def test_no_import_circle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_lower_floors_never_import_the_upper_ones():
    graph = _graph()
    lower = [m for m in graph if m.startswith(LOWER_PREFIXES)]
    assert lower
    bad = {m: sorted(graph[m] & UPPER) for m in lower if graph[m] & UPPER}
    assert not bad, bad
    assert not [d for d in graph["hf_cim.presets"] if d == "hf_cim.config"]


def test_leaf_helpers_import_nothing_of_hf_cim():
    graph = _graph()
    assert {m: sorted(graph[m]) for m in LEAVES if graph[m]} == {}


def test_seeds_are_derived_in_rng_only():
    """One place derives seeds and reads the rank (issue 14): every other module asks hf_cim.rng for its streams."""
    offenders = {
        _module(path): [s for s in ("manual_seed(", "def derive_seed", "def process_rank") if s in text]
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "rng.py" and (text := path.read_text())
    }
    assert {m: found for m, found in offenders.items() if found} == {}
    assert "hf_cim.layers" not in _graph()["hf_cim.memory"]  # the memory tracker needs the rank, not the layers
