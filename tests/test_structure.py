"""How the package is put together: the rules that keep it readable, checked on its source."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mailrelayd"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The mailrelayd modules `path` imports anywhere (functions too), but under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
               and ast.unparse(stmt.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING") for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:  # `from package import submodule` imports the submodule
                target = f"{node.module}.{alias.name}"
                found.add(target if target in MODULES else node.module)
    return {name for name in found if name in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_no_import_cycles():
    """No module of mailrelayd imports, however indirectly, one that imports it back."""
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        for target in sorted(GRAPH[name]):
            if target in trail:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in done:
                visit(target, trail + [target])
        done.add(name)

    done: set[str] = set()
    for module in sorted(GRAPH):
        if module not in done:
            visit(module, [module])
    assert cycles == []


def test_nothing_imports_the_command_line():
    """Only the command line package itself (and __main__) imports mailrelayd.cli."""
    importers = [name for name, targets in GRAPH.items()
                 if any(t == "mailrelayd.cli" or t.startswith("mailrelayd.cli.") for t in targets)
                 and not name.startswith("mailrelayd.cli") and name != "mailrelayd.__main__"]
    assert importers == []


def test_queues_and_transports_know_nothing_of_each_other():
    """Queues import no transport, transports import no queue, and neither imports the relay."""
    for name, targets in GRAPH.items():
        if name.startswith("mailrelayd.queues"):
            assert not any(t.startswith(("mailrelayd.transports", "mailrelayd.relay")) for t in targets), name
        if name.startswith("mailrelayd.transports"):
            assert not any(t.startswith(("mailrelayd.queues", "mailrelayd.relay")) for t in targets), name


def test_the_injector_needs_only_the_standard_library():
    """mailrelayd/inject.py can be copied alone into a jail: it imports nothing of mailrelayd."""
    assert GRAPH["mailrelayd.inject"] == set()


def test_no_module_is_over_400_lines():
    """Every module stays under 400 lines (one job each)."""
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
