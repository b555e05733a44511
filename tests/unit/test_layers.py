"""Imports point one way: down the layer order below, with no cycles.

Every module of smtpd_agent is read with `ast` (not imported), and every import
counts: top-level, function-local and under `if TYPE_CHECKING:`. A function-local
import that dodges a cycle at run time is still a cycle in the design.

The order (docs/architecture.md says the same and a test below keeps the two equal):

    values -> standards -> stages -> features -> app -> cli

A module may import its own layer or any layer before it, never a later one. A new
module must be added to LAYERS (and to the table in docs/architecture.md); until it is,
the test fails and says so.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "smtpd_agent"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# Module names are dotted paths inside smtpd_agent ("auth.spf"); a package's
# __init__.py is the package's name ("auth"), the top-level package is "smtpd_agent".
LAYERS: dict[str, tuple[str, ...]] = {
    # Typed values and settings: import nothing of ours from a later layer.
    "values": (
        "smtpd_agent", "addresses", "config", "logs", "message", "metrics", "record",
        "relay_url", "systemd", "acl",
    ),
    # One module per standard, pure, the resolver passed in; no SMTP session, no store.
    "standards": (
        "dns", "auth.adapters", "auth.arc", "auth.dkim", "auth.dmarc", "auth.dnsbl", "auth.iprev",
        "auth.results", "auth.runner", "auth.spf",
        "outbound.dsn", "outbound.verp", "http.sns",
        "extract", "extract.attachment", "extract.html_text", "extract.pdf", "extract.reply",
    ),
    # The inbound stages, the store they write to, and the runtime they form.
    "stages": (
        "auth", "routing", "ingress", "scan", "spam", "pipeline",
        "store", "store.apikeys", "store.changes", "store.database", "store.directory",
        "store.deployment", "store.domains", "store.inbox", "store.lease", "store.mailbox",
        "store.messages", "store.rows", "store.acl", "store.quarantine", "store.events",
        "store.hooks", "store.retention", "store.search",
        "runtime", "periodic",
    ),
    # Listeners and features: each receives the Runtime and calls stages and store.
    "features": (
        "smtp", "smtp.edge", "smtp.handler", "smtp.limits", "smtp.replies", "smtp.server",
        "smtp.session",
        "http", "http.api", "http.health", "http.limits", "http.openapi", "http.responses",
        "http.mailbox", "http.server", "http.webhooks",
        "mailbox", "mailbox.send", "mailbox.indexer",
        "agent", "agent.caps", "agent.compose", "agent.recipients", "agent.jobs", "agent.llm",
        "agent.policy", "agent.prompt",
        "agent.worker",
        "outbound", "outbound.bounces", "outbound.decisions", "outbound.queue",
        "outbound.signing", "outbound.transports", "outbound.worker",
        "domains", "domains.check", "domains.hosts", "domains.keys", "domains.mta_sts",
        "domains.records", "domains.service",
        "dnsserver", "dnsserver.server", "dnsserver.zone",
        "mcpserver", "mcpserver.tools", "mcpserver.server", "mcpserver.http",
        "hooks", "hooks.decisions", "hooks.payloads", "hooks.service", "hooks.signing",
        "hooks.targets", "hooks.worker", "http.endpoints",
        "events", "events.retention", "events.stream",
    ),
    # Wiring: builds the runtime and every service once, runs them.
    "app": ("app",),
    # The command: shared helpers, each group's subcommands, the composition.
    "cli": (
        "cli_common", "agent.cli", "acl.cli", "domains.cli", "http.cli", "mailbox.cli",
        "mcpserver.cli", "outbound.cli", "cli",
        "__main__",
    ),
}
ORDER = list(LAYERS)
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "smtpd_agent"


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _absolute(name: str) -> str:
    """"smtpd_agent.auth.spf" -> "auth.spf"; "" for anything not ours."""
    if name == "smtpd_agent":
        return "smtpd_agent"
    return name.removeprefix("smtpd_agent.") if name.startswith("smtpd_agent.") else ""


def imports_of(source: str, module: str, is_package: bool,
               known: set[str]) -> list[tuple[str, int]]:
    """(imported module of ours, line) for every import statement anywhere in `source`."""
    found: list[tuple[str, int]] = []
    here = [] if module == "smtpd_agent" else module.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [_absolute(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here if is_package else here[:-1]
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = _absolute(node.module or "")
                if not base:
                    continue
                base = "" if base == "smtpd_agent" else base
            # `from .store import domains` imports the module store.domains
            names = [f"{base}.{a.name}".lstrip(".") if f"{base}.{a.name}".lstrip(".") in known
                     else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "":
                name = "smtpd_agent"
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known and name != module:
                found.append((name, node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = package_modules()
    known = set(modules)
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py", known)
            for name, path in modules.items()}


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _ in graph.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    modules = package_modules()
    unknown = sorted(set(modules) - set(LAYER_OF))
    assert not unknown, (
        "modules without a layer: " + ", ".join(f"smtpd_agent/{modules[m].relative_to(PACKAGE)}"
                                                for m in unknown)
        + ". Add each to LAYERS in tests/unit/test_layers.py and to the layer table in "
          "docs/architecture.md (values, standards, stages, features, app, cli).")
    stale = sorted(set(LAYER_OF) - set(modules))
    assert not stale, f"LAYERS names modules that no longer exist: {stale}; remove them"
    twice = sorted(m for m in LAYER_OF if sum(m in ms for ms in LAYERS.values()) > 1)
    assert not twice, f"modules in more than one layer: {twice}"


def test_no_import_points_up() -> None:
    graph = import_graph()
    upward = []
    for module, imported in sorted(graph.items()):
        if module not in LAYER_OF:
            continue  # reported by test_every_module_has_a_layer
        for target, line in imported:
            if target in LAYER_OF and ORDER.index(LAYER_OF[target]) > ORDER.index(LAYER_OF[module]):
                upward.append(f"{module} ({LAYER_OF[module]}) imports {target} "
                              f"({LAYER_OF[target]}) at line {line}")
    assert not upward, "imports pointing up the layer order:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (function-local and TYPE_CHECKING imports count):\n" + \
        "\n".join(" <-> ".join(component) for component in found)


def test_the_reader_sees_hidden_imports() -> None:
    """The checks above are only as good as the reader: a function-local or TYPE_CHECKING
    import, relative or absolute, must show up as an edge."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import smtpd_agent.config\n"
        "if TYPE_CHECKING:\n"
        "    from ..app import Runtime\n"
        "def f():\n"
        "    from ..cli import emit\n"
        "    from ..store import domains as store\n"
        "    from . import jobs\n"
    )
    known = {"config", "app", "cli", "store", "store.domains", "agent", "agent.jobs",
             "agent.worker"}
    found = {name for name, _ in imports_of(source, "agent.worker", False, known)}
    assert found == {"config", "app", "cli", "store.domains", "agent.jobs"}
    graph = {"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}
    assert cycles(graph) == [["a", "b", "c"]]


def test_architecture_doc_lists_the_same_layers() -> None:
    """docs/architecture.md's table (a fenced block after "## Layers") names each module
    in the same layer as LAYERS."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Layers", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.S)
    assert block, "docs/architecture.md: no ```text block under ## Layers"
    documented: dict[str, list[str]] = {}
    layer = ""
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            layer, _, rest = line.partition(" ")
            documented[layer] = []
        else:
            rest = line
        documented[layer] += rest.split()
    assert list(documented) == ORDER
    for name, modules in LAYERS.items():
        assert sorted(documented[name]) == sorted(modules), (
            f"docs/architecture.md, layer {name}: "
            f"missing {sorted(set(modules) - set(documented[name]))}, "
            f"extra {sorted(set(documented[name]) - set(modules))}")

