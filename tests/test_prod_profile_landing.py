"""The landing zone as an object-store prefix (MLP_LANDING_URL=lakefs://<repository>/<branch>/<prefix>), behind the
same interface as the local folder, against a real lakeFS: objects a producer puts are what the zone lists and
reads, a quarantined file keeps its bytes and reason in the store, and the setting alone selects it."""

from __future__ import annotations

import io
import uuid

import polars as pl
import pytest

from mlplatform.landing_store import LakeFSPrefixStore, ObjectStoreLanding
from resources.environment import Settings, build_resources
from resources.landing import LandingZoneResource
from resources.landing_store import ObjectStoreLandingZoneResource

pytestmark = pytest.mark.services


def parquet(n: int) -> bytes:
    buf = io.BytesIO()
    pl.DataFrame({"id": list(range(n))}).write_parquet(buf)
    return buf.getvalue()


def settings(lakefs, state, **env) -> Settings:
    return Settings.from_env({"MLP_STATE_DIR": str(state), "LAKEFS_ENDPOINT": lakefs.endpoint,
                              "LAKEFS_ACCESS_KEY_ID": lakefs.access_key_id,
                              "LAKEFS_SECRET_ACCESS_KEY": lakefs.secret_access_key,
                              "LAKEFS_REPOSITORY": lakefs.repository, **env})


def test_the_setting_alone_chooses_the_object_store_or_the_folder(lakefs, state):
    assert type(build_resources(settings(lakefs, state))["landing"]) is LandingZoneResource
    url = f"lakefs://landing-{uuid.uuid4().hex[:8]}/main/car_loan"
    res = build_resources(settings(lakefs, state, MLP_LANDING_URL=url))["landing"]
    assert isinstance(res, ObjectStoreLandingZoneResource) and res.url == url
    assert isinstance(res.zone(), ObjectStoreLanding)


def test_objects_under_the_prefix_are_what_the_zone_lists_reads_and_quarantines(lakefs, state):
    repo = f"landing-{uuid.uuid4().hex[:8]}"
    res = build_resources(settings(lakefs, state, MLP_LANDING_URL=f"lakefs://{repo}/main/car_loan"))["landing"]
    zone = res.zone()  # the landing repository is created by the platform on first use
    producer = LakeFSPrefixStore(res.lakefs.client, repo, "main")
    producer.put("car_loan/records/2019-04-01/batch-a.parquet", parquet(3))
    producer.put("car_loan/records/2019-04-01/batch-b.parquet", parquet(5))
    producer.put("car_loan/records/2019-04-01/_SUCCESS", b"")  # a marker: not data
    producer.put("car_loan/labels/2019-04-01/labels.parquet", parquet(2))
    producer.put("elsewhere/records/2019-04-01/x.parquet", parquet(1))  # outside the prefix: never seen

    files = zone.files("records", "2019-04-01")
    assert [f.name for f in files] == ["batch-a.parquet", "batch-b.parquet"]
    assert [pl.read_parquet(f).height for f in files] == [3, 5]  # readers get local files with the objects' bytes
    assert all(f.complete and f.why.startswith("marker") for f in zone.landed("records", "2019-04-01"))
    scan = zone.scan("labels", ["2019-03-01", "2019-04-01"])
    assert list(scan.partitions) == ["2019-04-01"] and scan.strays == []

    before = {f.name: f.entry for f in zone.landed("records", "2019-04-01")}
    producer.put("car_loan/records/2019-04-01/batch-b.parquet", parquet(7))  # redelivered: a new entry
    zone.sync(force=True)
    after = {f.name: f.entry for f in zone.landed("records", "2019-04-01")}
    assert after["batch-a.parquet"] == before["batch-a.parquet"] and after["batch-b.parquet"] != before["batch-b.parquet"]

    target = zone.quarantine("records", "2019-04-01", files[1], "ids repeat batch-a", "run-1")
    keys = {o.key for o in producer.list("car_loan/")}
    assert "car_loan/records/2019-04-01/batch-b.parquet" not in keys  # left the landing prefix...
    assert {"car_loan/quarantine/records/2019-04-01/batch-b.parquet",
            "car_loan/quarantine/records/2019-04-01/batch-b.parquet.reason.json"} <= keys  # ...kept with its reason
    assert pl.read_parquet(io.BytesIO(producer.get("car_loan/quarantine/records/2019-04-01/batch-b.parquet"))).height \
        == 7 and target.exists()
    zone.sync(force=True)
    assert [f.name for f in zone.files("records", "2019-04-01")] == ["batch-a.parquet"]

    producer.delete("car_loan/records/2019-04-01/batch-a.parquet")  # withdrawn by its producer
    zone.sync(force=True)
    assert zone.files("records", "2019-04-01") == []
