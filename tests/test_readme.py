"""The README and the manual (docs/) say what the code does: the ACL rights health.py asks for, every error
class, every module, and the layering of the package."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path
from typing import Any

import redis_weights
from redis_weights.backend.keys import Keys
from redis_weights.errors import RedisWeightsError
from redis_weights.observe.health import UNSAFE, check_acl
from redis_weights.tools.cli.commands import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Every page of the manual, by its path under docs/.
DOCS = {str(path.relative_to(ROOT / "docs")): path.read_text() for path in sorted((ROOT / "docs").rglob("*.md"))}


class DeniedEverything:
    """A client whose user may run nothing: ``check_acl`` answers with its fix, the rights to grant."""

    def execute_command(self, *args: Any) -> str:
        if args[:2] == ("ACL", "WHOAMI"):
            return "worker"
        return "This user has no permissions to run the command"


def test_every_acl_rights_list_in_the_docs_is_the_one_health_py_asks_for():
    finding = check_acl(DeniedEverything(), Keys("ns"))  # type: ignore[arg-type]
    assert finding.level == UNSAFE
    rights = [word for word in finding.fix.split() if word.startswith("+")]
    assert "+@connection" in rights
    # every place the README or a page of the manual lists rights: a run of +... words in backquotes (may wrap)
    text = "\n".join([README, *DOCS.values()])
    lists = [re.findall(r"\+[@\w]+", m) for m in re.findall(r"`[^`]*\+@read[^`]*`", text)]
    assert len(lists) >= 2
    for found in lists:
        assert found == rights, found


def error_classes() -> set[type]:
    """Every RedisWeightsError subclass defined in the package (optional integrations skipped)."""
    for module in pkgutil.walk_packages(redis_weights.__path__, "redis_weights."):
        if module.name.endswith("__main__"):  # runs the CLI
            continue
        try:
            importlib.import_module(module.name)
        except ImportError:  # integrations.torchrl without torchrl
            continue
    found: set[type] = set()
    todo = [RedisWeightsError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("redis_weights") and cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def first_column(page: str, heading: str, pattern: str) -> dict[str, str]:
    """In section ``heading`` of the manual's ``page``: each name ``pattern`` finds in a table's first column -> its row."""
    text = DOCS[page]
    section = text[text.index(heading):]
    end = section.find("\n#", 1)
    section = section if end < 0 else section[:end]
    return {name: line for line in section.splitlines() if line.startswith("| `")
            for name in re.findall(pattern, line.split(" | ")[0])}  # fmt: skip


def test_the_errors_table_lists_every_error_class_under_its_import_path():
    listed = {}
    for name in first_column("guide/api.md", "## Errors", r"`([\w.]+Error)`"):
        module, _, cls = name.rpartition(".")
        listed[name] = getattr(importlib.import_module(module) if module else redis_weights, cls)
    assert set(listed.values()) == error_classes() - {RedisWeightsError}
    for name, cls in listed.items():
        assert issubclass(cls, RedisWeightsError) and issubclass(cls, RuntimeError), name
        exported = "." not in name
        assert exported == (cls.__name__ in redis_weights.__all__), f"{name}: the docs and __all__ disagree"


def test_the_module_map_lists_every_module_of_the_package_and_nothing_else():
    rows = first_column("design/layout.md", "# Layout", r"`([\w/]+)`")  # a package's row (`tools/cli/`) names its modules
    packages, modules = set(), set()
    for info in pkgutil.walk_packages(redis_weights.__path__, "redis_weights."):
        path = info.name.removeprefix("redis_weights.").replace(".", "/")
        (packages if info.ispkg else modules).add(path)
    missing = []
    for path in sorted(modules - {"__main__"}):
        package, _, name = path.rpartition("/")
        row = rows.get(f"{package}/") if package else None
        if path not in rows and not (row and f"`{name}`" in row):
            missing.append(path)
    assert missing == [], f"modules the module map (docs/design/layout.md) does not list: {missing}"
    unknown = [name for name in rows if name.rstrip("/") not in (packages if name.endswith("/") else modules)]
    assert unknown == [], f"the module map (docs/design/layout.md) lists modules that do not exist: {unknown}"


def test_the_cli_manual_has_a_row_for_every_command_in_the_order_of_its_help():
    """A new command is one module, its line in ``COMMANDS`` and its row in docs/operations/cli.md."""
    rows = first_column("operations/cli.md", "# The `redis-weights` command", r"^\| `([\w-]+)")
    assert list(rows) == [command.name for command in COMMANDS], "docs/operations/cli.md's command table"


def _imports(path: Path, package: str, modules: set[str]) -> set[str]:
    """The ``redis_weights`` modules (of ``modules``) that the module at ``path`` imports, lazy imports too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # ``from . import ranks`` imports a module, ``from .x import y`` x
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return found & modules


def test_no_module_imports_one_above_it():
    root = Path(redis_weights.__file__).parent
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[path] = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    graph: dict[str, set[str]] = {}
    for path, name in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imports(path, package, set(names.values())) - {name}
    above = ("redis_weights.tools", "redis_weights.integrations")
    core = {name for name in graph if not name.startswith(above) and not name.endswith("__main__")}
    upward = {(m, t) for m in core for t in graph[m] if t.startswith(above)}
    assert upward == set(), "the core imports an operator tool or an integration"
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name):] + (name,))}"
        if name not in done:
            for target in graph[name]:
                visit(target, path + (name,))
            done.add(name)

    for name in graph:
        visit(name, ())
