"""The model health report end to end: two batches scored and monitored by the real assets (batch_predictions,
drift_report, performance_estimate, realized_performance, data_quality_report) against the real lakeFS and
MLflow, then `model_health_report` commits its HTML on the run branch, published to main, linked and previewed in
the metadata; and the page, opened in Debian's chromium (Playwright, as tests/test_ui_browser.py), shows its four
sections with data. The screenshot goes to the test's state folder (`<pytest tmp>/.../screenshots/`)."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from assets.monitoring import build_monitoring
from assets.report import build_report, report_path
from assets.serving import build_serving
from mlplatform import registry
from mlplatform.batches import window
from mlplatform.features import online_features
from resources.partitions import partitions_def
from resources.publish import publish_run

from .helpers import car_loan, materialize_and_publish, node, production_rows, quick_training_set, resources_for
from .test_models import mlflow_res, train

pytestmark = [pytest.mark.services, pytest.mark.browser, pytest.mark.slow]

BATCHES = ["2018-10-01", "2018-11-01"]
SECTION_PROBE = """(name) => {
  const section = document.getElementById('section-' + name);
  const plot = document.getElementById('plot-' + name);
  const points = (plot && plot.data || []).reduce((n, t) => n + ((t.x || t.y || []).length || 0), 0);
  return {points: points, traces: (plot && plot.data || []).length,
          svg: section.querySelectorAll('.main-svg').length,
          rows: section.querySelectorAll('table.data tbody tr').length,
          empty: section.querySelectorAll('p.empty').length};
}"""


def stubs(spec, labels: pl.DataFrame):
    """Stand-ins for what ingestion and dbt provide (the raw batch with its landing metadata, its labels, its
    features, the history's features); everything downstream is the platform's own assets."""
    parts = partitions_def(spec)
    reference, _, _ = spec.load_source()
    ref = pl.from_pandas(reference).select(spec.raw_columns).with_columns(
        pl.col(spec.time_column).str.to_datetime(time_unit="us"))

    def raw(partition):
        start, end = window(spec, partition)
        return production_rows(spec, start, end)

    @dg.asset(name="raw_records", key_prefix=["car_loan"], partitions_def=parts)
    def stub_raw_records(context) -> dg.Output:
        df = raw(context.partition_key)
        second = context.partition_key == BATCHES[1]
        if second:  # a batch with missing values, and one landing file quarantined
            df = df.with_columns(pl.when(pl.col(spec.id_column) % 10 == 0).then(None)
                                 .otherwise(pl.col("car_value")).alias("car_value"))
        rejected = [dg.TableRecord({"file": "late.csv", "reason": "column 'car_value' has the wrong type"})]
        return dg.Output(df, metadata={
            "rows": df.height, "files_accepted": dg.MetadataValue.json(["a.parquet"]),
            "files_rejected": 1 if second else 0,
            **({"rejected": dg.MetadataValue.table(rejected, schema=dg.TableSchema(columns=[
                dg.TableColumn("file"), dg.TableColumn("reason")]))} if second else {})})

    @dg.asset(name="raw_labels", key_prefix=["car_loan"], partitions_def=parts)
    def stub_raw_labels(context) -> pl.DataFrame:
        return labels

    @dg.asset(name="features", key_prefix=["car_loan"], partitions_def=parts)
    def stub_features(context) -> pl.DataFrame:
        return online_features(raw(context.partition_key), spec)

    @dg.asset(name="reference_features", key_prefix=["car_loan"])
    def stub_reference_features() -> pl.DataFrame:
        return online_features(ref, spec)

    return [stub_raw_records, stub_raw_labels, stub_features, stub_reference_features]


def test_the_health_report_after_two_batches_is_committed_linked_and_shows_four_sections_in_a_browser(
        lakefs, state, instance, mlflow_uri, tmp_path):
    from playwright.sync_api import sync_playwright

    from .test_ui_browser import CHROMIUM, Console

    spec = car_loan()
    m = mlflow_res(spec, mlflow_uri)
    champion = train(spec, quick_training_set(spec, n=6000), lakefs, state, instance, mlflow_uri,
                     num_boost_round=30)
    publish_run(instance, lakefs, champion.run_id, m)
    assert registry.aliases(m) == {"champion": "1"}

    _, _, labels = spec.load_source()
    labels = pl.from_pandas(labels).select(spec.id_column, spec.target)
    res = resources_for(lakefs, state, spec, mlflow_uri)
    graph = [*stubs(spec, labels), *build_serving(spec), *build_monitoring(spec), *build_report(spec)]
    materialize_and_publish(graph, ["reference_features"], instance, res, lakefs)
    per_batch = ["raw_records", "raw_labels", "features", "batch_predictions", "drift_report",
                 "performance_estimate", "realized_performance", "data_quality_report", "model_health_report"]
    for batch in BATCHES:
        result = materialize_and_publish(graph, per_batch, instance, res, lakefs, partition=batch)

    meta = result.asset_materializations_for_node(node("model_health_report"))[0].metadata
    path = report_path(spec, BATCHES[1])
    assert meta["report"].value == lakefs.object_url("main", path)
    assert meta["batches"].value == 2 and meta["files_quarantined"].value == 1 and meta["model_versions"].value == 1
    preview = meta["summary"].value
    assert f"after batch `{BATCHES[1]}`" in preview and "champion v1" in preview and "1 promotion(s)" in preview
    assert "2 of 2 batches labelled" in preview
    page_html = lakefs.get("main", path).decode()  # published with the batch's other outputs
    assert page_html.startswith("<!DOCTYPE html>") and "Model health: car_loan-model" in page_html

    shots = state / "screenshots"
    shots.mkdir(exist_ok=True)
    local = tmp_path / "model_health.html"
    local.write_text(page_html)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            console = Console(page)
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(local.as_uri())
            page.wait_for_selector("#plot-versions .main-svg")
            found = {name: page.evaluate(SECTION_PROBE, name) for name in
                     ("drift", "performance", "quality", "versions")}
            page.screenshot(path=str(shots / "model_health_report.png"), full_page=True)
        finally:
            browser.close()
    print(f"\nhealth report screenshot: {shots / 'model_health_report.png'}")
    for name, f in found.items():
        assert f["svg"] >= 1 and f["points"] > 0 and f["rows"] > 0 and f["empty"] == 0, (name, f)
    # two batches x every monitored feature (drift); estimate and realized for both batches (performance)
    assert found["drift"]["points"] >= 2 * len(spec.model_feature_names)
    assert found["performance"]["rows"] == 2 and found["quality"]["rows"] == 2
    assert not console.errors, console.errors
    assert [u for u in requests if not u.startswith("file://")] == []  # nothing fetched from anywhere
