"""Quarantine under faults: a rejected landing file is kept with its reason whatever its name, a second file
of the same name never overwrites the first, and a quarantine that cannot be written (a name past the file
system's limit, a full disk, a blocked folder) never fails the run: the file is reported as rejected and
left in place, never half-copied, and the good files beside it still reach main.
The landing logic is tested on plain folders; the runs against the real lakeFS and a real Dagster instance."""

from __future__ import annotations

import errno
import io
import json
import os

import dagster as dg
import polars as pl
import pytest

from mlplatform.batches import NAME_MAX_BYTES, Landing

from .helpers import K, car_loan, key, production_rows, resources_for

NOV = "2018-11-01"
LONG = "x" * 240 + ".parquet"   # 248 bytes: a legal name, but `<name>.reason.json` would be 260


def land(root, name: str, content: bytes = b"bad bytes", kind: str = "records", marker: bool = False):
    d = root / kind / NOV
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(content)
    if marker:
        (d / f"{name}.done").touch()
    return d / name


def entries(zone: Landing) -> dict[str, dict]:
    """Reason JSON of every quarantine entry, by the entry's name."""
    q = zone.quarantine_dir("records", NOV)
    return {p.name[: -len(".reason.json")]: json.loads(p.read_text()) for p in q.glob("*.reason.json")}


# --- plain folders -----------------------------------------------------------------------------------------

def test_a_file_with_a_long_legal_name_is_quarantined_under_a_bounded_name_recording_the_original(tmp_path):
    zone = Landing(tmp_path)
    path = land(tmp_path, LONG, b"bad bytes", marker=True)
    target = zone.quarantine("records", NOV, path, "cannot be read as parquet", "run-1")
    assert not path.exists() and not path.with_name(LONG + ".done").exists()
    assert target.read_bytes() == b"bad bytes"
    assert target.name.endswith(".parquet") and target.name != LONG
    for p in zone.quarantine_dir("records", NOV).iterdir():
        assert len(p.name.encode()) <= NAME_MAX_BYTES, p.name
    (reason,) = entries(zone).values()
    assert reason["original_name"] == LONG and reason["quarantined_as"] == target.name
    assert reason["reason"] == "cannot be read as parquet" and reason["file"] == str(path)
    assert (target.parent / f"{target.name}.done").exists()  # the marker moved with it


def test_a_multibyte_name_is_shortened_on_a_character_boundary(tmp_path):
    zone = Landing(tmp_path)
    name = "é" * 120 + ".csv"   # 244 bytes
    target = zone.quarantine("records", NOV, land(tmp_path, name), "bad", "run-1")
    assert len(target.name.encode()) <= NAME_MAX_BYTES and target.name.endswith("é.csv")
    assert entries(zone)[target.name]["original_name"] == name


def test_quarantining_a_file_of_the_same_name_twice_keeps_both_copies_and_reasons(tmp_path):
    zone = Landing(tmp_path)
    first = zone.quarantine("records", NOV, land(tmp_path, "b.parquet", b"first"), "first reason", "run-1")
    second = zone.quarantine("records", NOV, land(tmp_path, "b.parquet", b"second"), "second reason", "run-2")
    third = zone.quarantine("records", NOV, land(tmp_path, LONG, b"third"), "third reason", "run-2")
    fourth = zone.quarantine("records", NOV, land(tmp_path, LONG, b"fourth"), "fourth reason", "run-2")
    assert len({first, second, third, fourth}) == 4
    assert [p.read_bytes() for p in (first, second, third, fourth)] == [b"first", b"second", b"third", b"fourth"]
    reasons = entries(zone)
    assert {r["reason"]: r["original_name"] for r in reasons.values()} == {
        "first reason": "b.parquet", "second reason": "b.parquet", "third reason": LONG, "fourth reason": LONG}
    assert reasons[first.name]["reason"] == "first reason" and reasons[second.name]["reason"] == "second reason"


def test_a_quarantine_that_fails_midway_leaves_the_file_in_place_and_nothing_half_written(tmp_path, monkeypatch):
    """A full disk while the reason is written: the copy already in quarantine is taken back, no temporary
    file is left, and the landing file and its marker stay where they were."""
    import mlplatform.batches as batches

    zone = Landing(tmp_path)
    path = land(tmp_path, "b.parquet", b"bad bytes", marker=True)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the second rename is the reason file's
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(batches.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        zone.quarantine("records", NOV, path, "bad", "run-1")
    assert path.read_bytes() == b"bad bytes" and path.with_name("b.parquet.done").exists()
    assert list(zone.quarantine_dir("records", NOV).iterdir()) == []


# --- runs against the real lakeFS --------------------------------------------------------------------------

def _parquet(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def _run_good_beside_bad(lakefs, state, instance, bad_name: str):
    from assets.ingestion import build_ingestion
    from resources.io import load_asset
    from resources.publish import publish_run

    spec = car_loan()
    root = state / "landing" / spec.name
    good = production_rows(spec, *_nov(), n=50)
    land(root, "good.parquet", _parquet(good))
    bad = land(root, bad_name, b"PAR1\x00garbage-not-parquet")
    result = dg.materialize(build_ingestion(spec), selection=K("raw_records"), partition_key=NOV, instance=instance,
                            resources=resources_for(lakefs, state, spec), raise_on_error=False)
    assert result.success, [e for e in result.all_events if e.is_failure]
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["files_quarantined"].passed and bad_name in checks["files_quarantined"].description
    assert publish_run(instance, lakefs, result.run_id).status == "published"
    on_main = load_asset(lakefs, key("raw_records"), partition=NOV)
    assert sorted(on_main[spec.id_column].to_list()) == sorted(good[spec.id_column].to_list())
    assert set(on_main["_source_file"].to_list()) == {"good.parquet"}
    return Landing(root), bad, result


def _nov():
    import datetime as dt

    return dt.datetime(2018, 11, 1), dt.datetime(2018, 12, 1)


@pytest.mark.services
def test_a_bad_file_with_a_long_name_is_quarantined_and_the_good_file_beside_it_reaches_main(
        lakefs, state, instance):
    zone, bad, _ = _run_good_beside_bad(lakefs, state, instance, LONG)
    assert not bad.exists()
    (reason,) = entries(zone).values()
    assert reason["original_name"] == LONG and "cannot be read as parquet" in reason["reason"]


@pytest.mark.services
def test_a_quarantine_that_cannot_be_written_leaves_the_bad_file_in_place_and_the_good_file_reaches_main(
        lakefs, state, instance):
    spec = car_loan()
    root = state / "landing" / spec.name
    root.mkdir(parents=True)
    (root / "quarantine").write_text("a file where the quarantine folder should be")  # mkdir fails
    zone, bad, result = _run_good_beside_bad(lakefs, state, instance, "bad.parquet")
    assert bad.read_bytes() == b"PAR1\x00garbage-not-parquet"  # left in place, untouched
    (mat,) = [e.materialization for e in result.get_asset_materialization_events()
              if e.materialization.asset_key == key("raw_records")]
    assert mat.metadata["files_rejected"].value == 1
    table = mat.metadata["rejected"].value.records
    assert table[0].data["file"] == "bad.parquet" and "left in place" in table[0].data["quarantined_to"]
