"""``docs/faults.md`` stays current: every test it names exists, every fault test is in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "faults.md"
SUITES = ["test_faults.py", "test_faults_procs.py", "test_reliability.py", "test_bad_input.py", "test_security.py",
          "test_cluster_faults.py", "test_sentinel.py", "test_netlab.py"]


def _defined(path: Path) -> set[str]:
    return set(re.findall(r"^def (test_\w+)\(", path.read_text(), re.M))


def test_every_test_named_in_the_fault_matrix_exists():
    doc = DOC.read_text()
    named = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", doc)
    assert len(named) > 30
    everything = set().union(*(_defined(p) for p in (ROOT / "tests").glob("test_*.py")))
    missing = [f"{f}::{n}" for f, n in named if n not in (_defined(ROOT / "tests" / f) if f else everything)]
    assert not missing, f"docs/faults.md names tests that do not exist: {missing}"


def test_every_fault_and_bad_input_test_is_in_the_matrix():
    doc = DOC.read_text()
    absent = [f"{s}::{n}" for s in SUITES for n in sorted(_defined(ROOT / "tests" / s)) if n not in doc]
    assert not absent, f"add these tests to docs/faults.md: {absent}"
