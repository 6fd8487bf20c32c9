"""The README says what the code does: the ACL rights health.py asks for, every error class, every module."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from typing import Any

import redis_weights
from redis_weights.errors import RedisWeightsError
from redis_weights.health import UNSAFE, check_acl
from redis_weights.keys import Keys

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


class DeniedEverything:
    """A client whose user may run nothing: ``check_acl`` answers with its fix, the rights to grant."""

    def execute_command(self, *args: Any) -> str:
        if args[:2] == ("ACL", "WHOAMI"):
            return "worker"
        return "This user has no permissions to run the command"


def test_every_acl_rights_list_in_the_readme_is_the_one_health_py_asks_for():
    finding = check_acl(DeniedEverything(), Keys("ns"))  # type: ignore[arg-type]
    assert finding.level == UNSAFE
    rights = [word for word in finding.fix.split() if word.startswith("+")]
    assert "+@connection" in rights
    # every place the README lists rights: a run of +... words in backquotes (may wrap lines)
    lists = [re.findall(r"\+[@\w]+", m) for m in re.findall(r"`[^`]*\+@read[^`]*`", README)]
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


def first_column(heading: str, pattern: str) -> dict[str, str]:
    """In the README's section ``heading``: each name ``pattern`` finds in a table's first column -> its row."""
    section = README[README.index(heading):]
    section = section[: section.index("\n#", 1)]
    return {name: line for line in section.splitlines() if line.startswith("| `")
            for name in re.findall(pattern, line.split(" | ")[0])}  # fmt: skip


def test_the_errors_table_lists_every_error_class_under_its_import_path():
    listed = {}
    for name in first_column("### Errors", r"`([\w.]+Error)`"):
        module, _, cls = name.rpartition(".")
        listed[name] = getattr(importlib.import_module(module) if module else redis_weights, cls)
    assert set(listed.values()) == error_classes() - {RedisWeightsError}
    for name, cls in listed.items():
        assert issubclass(cls, RedisWeightsError) and issubclass(cls, RuntimeError), name
        exported = "." not in name
        assert exported == (cls.__name__ in redis_weights.__all__), f"{name}: README and __all__ disagree"


def test_the_module_map_lists_every_module_of_the_package_and_nothing_else():
    rows = first_column("### Layout", r"`([\w/]+)`")  # a package's row (`tools/cli/`) names its modules
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
    assert missing == [], f"modules the README's module map does not list: {missing}"
    unknown = [name for name in rows if name.rstrip("/") not in (packages if name.endswith("/") else modules)]
    assert unknown == [], f"the README's module map lists modules that do not exist: {unknown}"
