"""Landing-zone integrity against the real lakeFS: a batch grows from its previous checked version, so rows
on main never vanish; bad files are quarantined and the good ones publish in the same run; a re-delivery
follows the spec's policy; labels wait for their records; ids cannot be reused across batches.
(The catalogue of bad file kinds is tests/test_bad_inputs.py.)"""

import dataclasses
import json
import os
import time

import dagster as dg
import polars as pl
import pytest

from assets.ingestion import build_ingestion
from mlplatform.batches import window
from resources.io import load_asset
from resources.naming import ns
from resources.publish import publish_run

from .helpers import K, car_loan, key, node, production_rows, resources_for

pytestmark = pytest.mark.services

PARTITION = "2018-11-01"


@pytest.fixture(scope="module")
def spec():
    return car_loan()


@pytest.fixture(scope="module")
def good(spec):
    start, end = window(spec, PARTITION)
    return production_rows(spec, start, end, n=300)


def land(state, spec, name: str, content, kind: str = "records", partition: str = PARTITION, age_s: float = 300):
    """A complete landing file that arrived `age_s` seconds ago (later files get smaller ages)."""
    d = state / "landing" / spec.name / kind / partition
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    if isinstance(content, pl.DataFrame):
        content.write_csv(path) if name.endswith(".csv") else content.write_parquet(path)
    else:
        path.write_bytes(content)
    os.utime(path, (time.time() - age_s,) * 2)
    return path


def ingest(spec, lakefs, state, instance, asset="raw_records", partition=PARTITION):
    return dg.materialize(build_ingestion(spec), selection=[ns(spec).key(asset)], partition_key=partition, instance=instance,
                          resources=resources_for(lakefs, state, spec), raise_on_error=False)


def published(spec, lakefs, state, instance, asset="raw_records", partition=PARTITION):
    result = ingest(spec, lakefs, state, instance, asset, partition)
    assert result.success, failed_checks(result)
    assert publish_run(instance, lakefs, result.run_id).status == "published"
    return result


def failed_checks(result) -> dict[str, str]:
    return {e.check_name: e.description for e in result.get_asset_check_evaluations() if not e.passed}


def main_ids(lakefs, asset="raw_records", partition=PARTITION) -> list[int]:
    return sorted(load_asset(lakefs, key(asset), partition=partition)["id"].to_list())


def reason_of(state, spec, name, kind="records", partition=PARTITION) -> str:
    q = state / "landing" / spec.name / "quarantine" / kind / partition
    assert (q / name).exists(), f"{name} is not in quarantine"
    return json.loads((q / f"{name}.reason.json").read_text())["reason"]


def test_a_bad_file_is_quarantined_and_the_good_file_beside_it_publishes_in_the_same_run(spec, good, lakefs, state,
                                                                                          instance):
    land(state, spec, "a.parquet", good.slice(0, 150), age_s=300)
    land(state, spec, "b.parquet", good.slice(150).with_columns(pl.lit(7.5).alias("debt_to_income_ratio")), age_s=200)
    result = ingest(spec, lakefs, state, instance)
    assert result.success, failed_checks(result)
    assert set(failed_checks(result)) == {"files_quarantined"}
    assert "b.parquet quarantined: 150 value(s) of 'debt_to_income_ratio' outside [0, 1]" in \
        failed_checks(result)["files_quarantined"]
    meta = result.asset_materializations_for_node(node("raw_records"))[0].metadata
    table = meta["rejected"].value
    assert [r.data["file"] for r in table.records] == ["b.parquet"]
    assert table.records[0].data["column"] == "debt_to_income_ratio" and table.records[0].data["rows"] == 150
    assert publish_run(instance, lakefs, result.run_id).status == "published"
    assert main_ids(lakefs) == sorted(good.slice(0, 150)["id"].to_list())
    assert "outside [0, 1]" in reason_of(state, spec, "b.parquet")


def test_rows_on_main_never_disappear_when_a_later_file_is_bad_or_a_landing_file_is_gone(spec, good, lakefs, state,
                                                                                          instance):
    a = land(state, spec, "a.parquet", good.slice(0, 100), age_s=500)
    published(spec, lakefs, state, instance)
    # A later bad file alone: the run still succeeds, the batch keeps its rows, the file is quarantined.
    land(state, spec, "b.parquet", good.slice(100, 100).with_columns(pl.lit(None).alias("id")), age_s=400)
    result = published(spec, lakefs, state, instance)
    assert "b.parquet" in failed_checks(result)["files_quarantined"]
    assert main_ids(lakefs) == sorted(good.slice(0, 100)["id"].to_list())
    # The first file leaves the landing zone (archived, cleaned up): its rows stay; a new file adds to them.
    a.unlink()
    land(state, spec, "c.parquet", good.slice(200, 100), age_s=300)
    result = published(spec, lakefs, state, instance)
    meta = result.asset_materializations_for_node(node("raw_records"))[0].metadata
    assert meta["files_accepted"].value == ["c.parquet"] and meta["rows_before"].value == 100
    assert main_ids(lakefs) == sorted(good.slice(0, 100)["id"].to_list() + good.slice(200, 100)["id"].to_list())
    # Re-running with nothing new changes nothing (every file still landed is already in the batch).
    result = published(spec, lakefs, state, instance)
    meta = result.asset_materializations_for_node(node("raw_records"))[0].metadata
    assert meta["files_already_ingested"].value == ["c.parquet"] and meta["files_accepted"].value == []
    assert len(main_ids(lakefs)) == 200


def test_a_later_file_repeating_published_ids_never_gets_the_earlier_file_quarantined(spec, good, lakefs, state,
                                                                                        instance):
    a = land(state, spec, "a.parquet", good, age_s=500)
    published(spec, lakefs, state, instance)
    land(state, spec, "a-copy.parquet", good.head(10), age_s=100)
    result = published(spec, lakefs, state, instance)
    assert a.exists(), "the earlier file is never judged again"
    reason = reason_of(state, spec, "a-copy.parquet")
    assert "a-copy.parquet: 10 'id' value(s) are already in batch 2018-11-01 from ['a.parquet']" in reason
    assert "landing.redelivery: reject" in reason
    assert "a-copy.parquet" in failed_checks(result)["files_quarantined"]
    held = load_asset(lakefs, key("raw_records"), partition=PARTITION)
    assert held.height == good.height and set(held["_source_file"]) == {"a.parquet"}


def test_replace_by_id_lets_a_corrected_redelivery_replace_its_rows(spec, good, lakefs, state, instance):
    replace = dataclasses.replace(spec, redelivery="replace_by_id")
    land(state, spec, "a.parquet", good.head(100), age_s=500)
    published(replace, lakefs, state, instance)
    land(state, spec, "a.parquet", good.head(100).with_columns(pl.lit(1.0).alias("car_value")), age_s=100)
    result = published(replace, lakefs, state, instance)
    assert result.asset_materializations_for_node(node("raw_records"))[0].metadata["rows_replaced"].value == {"a.parquet": 100}
    held = load_asset(lakefs, key("raw_records"), partition=PARTITION)
    assert held.height == 100 and held["car_value"].unique().to_list() == [1.0]


def test_records_reusing_ids_of_another_batch_are_rejected(spec, lakefs, state, instance):
    """An id names one entity: a record reusing an id published in another batch would be joined to that
    entity's label, so it is rejected (blocking check `ids_unique_across_batches`)."""
    oct_rows = production_rows(spec, *window(spec, "2018-10-01"))
    land(state, spec, "oct.parquet", oct_rows, partition="2018-10-01")
    published(spec, lakefs, state, instance, partition="2018-10-01")
    nov = production_rows(spec, *window(spec, PARTITION), n=50)
    reused = nov.with_columns(pl.Series("id", oct_rows["id"].head(50).to_list()))
    land(state, spec, "nov.parquet", reused)
    result = ingest(spec, lakefs, state, instance)
    assert not result.success
    failures = failed_checks(result)
    assert "values already published in batch 2018-10-01" in failures["ids_unique_across_batches"]
    assert "nov.parquet" in reason_of(state, spec, "nov.parquet")


def test_an_empty_batch_blocks(spec, lakefs, state, instance):
    (state / "landing" / spec.name / "records" / PARTITION).mkdir(parents=True)
    before = lakefs.head()
    result = ingest(spec, lakefs, state, instance)
    assert not result.success
    assert "no file of batch 2018-11-01 was accepted (0 file(s) found" in failed_checks(result)["not_empty"]
    assert publish_run(instance, lakefs, result.run_id).status == "kept"
    assert lakefs.head() == before


def test_unseen_categories_warn_below_the_limit(spec, good, lakefs, state, instance):
    land(state, spec, "a.parquet", good.with_columns(
        pl.when(pl.int_range(pl.len()) < 4).then(pl.lit("1M+ €")).otherwise(pl.col("salary_range"))
        .alias("salary_range")))
    result = ingest(spec, lakefs, state, instance)
    assert result.success
    warn = [e for e in result.get_asset_check_evaluations() if e.check_name == "known_categories"][0]
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN
    assert "'1M+ €'" in warn.description and "4 row(s) (1.3%)" in warn.description


def test_labels_for_unknown_ids_quarantine_their_file_and_good_labels_publish(spec, good, lakefs, state, instance):
    land(state, spec, "a.parquet", good)
    published(spec, lakefs, state, instance)
    ids = good["id"].to_list()
    land(state, spec, "good.parquet", pl.DataFrame({"id": ids[:100], "repaid": [1.0] * 100}), "labels", age_s=200)
    land(state, spec, "bad.parquet", pl.DataFrame({"id": [ids[100], 987654321], "repaid": [1.0, 0.0]}), "labels",
         age_s=100)
    result = published(spec, lakefs, state, instance, "raw_labels")
    assert "bad.parquet" in failed_checks(result)["files_quarantined"]
    assert "1 label(s) are for ids not in the records of batch 2018-11-01, in ['bad.parquet']" in \
        reason_of(state, spec, "bad.parquet", "labels")
    assert main_ids(lakefs, "raw_labels") == sorted(ids[:100])


def test_labels_that_arrive_before_their_records_are_held_not_quarantined(spec, good, lakefs, state, instance):
    labels = land(state, spec, "early.parquet", pl.DataFrame({"id": good["id"].head(20), "repaid": [1.0] * 20}),
                  "labels")
    result = ingest(spec, lakefs, state, instance, "raw_labels")
    assert not result.success
    assert "have no checked version yet: label file(s) ['early.parquet'] are held" in \
        failed_checks(result)["labels_for_known_ids"]
    assert labels.exists(), "held in the landing zone, not quarantined"
    # Once the records are ingested, the same labels are taken.
    land(state, spec, "a.parquet", good)
    published(spec, lakefs, state, instance)
    published(spec, lakefs, state, instance, "raw_labels")
    assert main_ids(lakefs, "raw_labels") == sorted(good["id"].head(20).to_list())


# --- labels whose records are still arriving are held, not quarantined (issue 9) -----------------------------

def labels_run(spec, lakefs, state, instance, settle_seconds: float = 0):
    """raw_labels, with the landing zone's settle time given (a fresh file without marker is still written)."""
    from resources.landing import LandingZoneResource

    resources = {**resources_for(lakefs, state, spec),
                 "landing": LandingZoneResource(root=str(state / "landing"), settle_seconds=settle_seconds)}
    return dg.materialize(build_ingestion(spec), selection=K("raw_labels"), partition_key=PARTITION, instance=instance,
                          resources=resources, raise_on_error=False)


def quarantined(state, spec, kind="labels") -> list[str]:
    q = state / "landing" / spec.name / "quarantine" / kind / PARTITION
    return sorted(p.name for p in q.iterdir()) if q.exists() else []


def test_labels_for_ids_of_a_records_file_still_arriving_are_held_and_taken_once_it_publishes(
        spec, good, lakefs, state, instance):
    ids = good["id"].to_list()
    land(state, spec, "a.parquet", good.slice(0, 250), age_s=600)
    published(spec, lakefs, state, instance)
    land(state, spec, "first.parquet", pl.DataFrame({"id": ids[:100], "repaid": [1.0] * 100}), "labels", age_s=500)
    published(spec, lakefs, state, instance, "raw_labels")
    # The second records file is still being written; the labels cover a's ids and its 50 new ones.
    late = land(state, spec, "late.parquet", good.slice(250), age_s=0)
    labels = land(state, spec, "labels.parquet", pl.DataFrame({"id": ids[100:], "repaid": [0.0] * 200}), "labels",
                  age_s=100)
    for path in (labels, labels.with_name("first.parquet")):  # complete by their marker
        path.with_name(path.name + ".done").touch()
    result = labels_run(spec, lakefs, state, instance, settle_seconds=3600)
    assert result.success, failed_checks(result)  # the earlier labels still publish; this file waits
    meta = result.asset_materializations_for_node(node("raw_labels"))[0].metadata
    assert meta["files_held"].value == ["labels.parquet"] and meta["files_accepted"].value == []
    assert not any(e.startswith("labels.parquet|") for e in meta["files"].value)  # the sensor sees it as not in
    held = failed_checks(result)["files_held"]
    assert "50 label(s) for ids not (yet) in the records of batch 2018-11-01" in held
    assert "late.parquet still being written" in held
    assert labels.exists() and quarantined(state, spec) == [], "held in the landing zone, not quarantined"
    assert publish_run(instance, lakefs, result.run_id).status == "published"
    assert main_ids(lakefs, "raw_labels") == sorted(ids[:100])
    # Complete but not yet ingested by a records run: still held.
    os.utime(late, (time.time() - 300,) * 2)
    result = labels_run(spec, lakefs, state, instance)
    assert "late.parquet not yet ingested" in failed_checks(result)["files_held"] and labels.exists()
    assert publish_run(instance, lakefs, result.run_id).status == "published"  # as the publish sensor would
    # The records publish: the same label file is taken whole.
    published(spec, lakefs, state, instance)
    result = published(spec, lakefs, state, instance, "raw_labels")
    meta = result.asset_materializations_for_node(node("raw_labels"))[0].metadata
    assert meta["files_accepted"].value == ["labels.parquet"] and meta["files_held"].value == []
    assert main_ids(lakefs, "raw_labels") == sorted(ids) and quarantined(state, spec) == []


def test_held_labels_are_quarantined_once_the_records_settle_without_their_ids(spec, good, lakefs, state, instance):
    ids = good["id"].to_list()
    land(state, spec, "a.parquet", good.slice(0, 250), age_s=600)
    published(spec, lakefs, state, instance)
    labels = land(state, spec, "labels.parquet", pl.DataFrame({"id": ids, "repaid": [1.0] * 300}), "labels",
                  age_s=100)
    # An ingest_batch run of the partition is running (no records file pending): the labels wait for it.
    running = instance.add_run(dg.DagsterRun(job_name="car_loan__ingest_batch", run_id="running-records-run",
                                             tags={"dagster/partition": PARTITION}, status=dg.DagsterRunStatus.STARTED))
    result = labels_run(spec, lakefs, state, instance)
    assert not result.success  # nothing to publish yet
    assert "label file(s) ['labels.parquet'] are held" in failed_checks(result)["labels_for_known_ids"]
    assert f"ingest_batch run {running.run_id} is started" in failed_checks(result)["files_held"]
    assert labels.exists() and quarantined(state, spec) == []
    # That run ends without the missing ids (its file was bad): the records are settled, the file is quarantined.
    instance.report_run_failed(running)
    result = labels_run(spec, lakefs, state, instance)
    assert not labels.exists() and "labels.parquet" in quarantined(state, spec)
    assert "50 label(s) are for ids not in the records of batch 2018-11-01" in \
        reason_of(state, spec, "labels.parquet", "labels")
