"""The layout holds: imports point one way, the library needs no Dagster, benchmarks stand on their own, and the
library's batch periods are the partitions Dagster shows."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_imports_point_from_tooling_to_the_dagster_layer_to_the_library():
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_benchmarks_do_not_import_the_tests():
    offending = {p.name: sorted(m for m in _imported_modules(p) if m == "tests" or m.startswith("tests."))
                 for p in sorted((ROOT / "bench").glob("*.py"))}
    assert {k: v for k, v in offending.items() if v} == {}


@pytest.mark.parametrize("cadence", ["hourly", "daily", "weekly", "monthly", "yearly"])
def test_library_batch_periods_equal_the_dagster_partitions(cadence):
    from mlplatform import batches
    from mlplatform.spec import load_spec
    from resources.partitions import partitions_def

    spec = load_spec("car_loan")
    bounds = [("2018-11-01", "2019-03-01"), ("2018-11-15", "2021-02-10"), ("2018-11-04", "2020-01-01")]
    if cadence == "hourly":
        bounds = [("2018-11-01", "2018-11-03"), ("2018-11-15-05:00", "2018-11-16-01:00")]
    seen = 0
    for start, end in bounds:
        s = dataclasses.replace(spec, cadence=cadence, batch_start=start, batch_end=end)
        pdef = partitions_def(s)
        keys = pdef.get_partition_keys()
        assert batches.partition_keys(s) == keys, (start, end)
        seen += len(keys)
        for key in itertools.islice(keys, 0, None, max(1, len(keys) // 5)):
            tw = pdef.time_window_for_partition_key(key)
            start_end = (tw.start.replace(tzinfo=None), tw.end.replace(tzinfo=None))
            assert batches.window(s, key) == start_end
            assert batches.partition_of(s, start_end[0]) == key
            assert batches.partition_of(s, start_end[1] - (start_end[1] - start_end[0]) / 2) == key
    assert seen > 0
