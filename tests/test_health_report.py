"""The model health report's HTML (mlplatform.report) on synthetic inputs, without services: four sections with
their plots and tables, plotly.js inlined once (no CDN), and a summary that says what each section holds."""

import re

import polars as pl

from mlplatform import report

PARTS = ["2019-01", "2019-02", "2019-03", "2019-04"]
FEATURES = ["car_value", "debt_to_income_ratio", "salary_range"]


def synthetic_health(as_of: str = "2019-04") -> report.HealthData:
    drift = pl.DataFrame([
        {"partition": p, "feature": f, "method": m, "value": 0.01 * (i + 1) * (j + 1), "upper_threshold": 0.05,
         "alert": f == "debt_to_income_ratio" and i >= 2}
        for i, p in enumerate(PARTS) for j, f in enumerate(FEATURES) for m in ("jensen_shannon", "psi")])
    performance = pl.DataFrame([
        {"partition": p, "estimated": 0.95 - 0.02 * i, "lower": 0.93 - 0.02 * i, "upper": 0.97 - 0.02 * i,
         "lower_threshold": 0.9, "reference_score": 0.96, "model_version": "1",
         "realized": (0.94 - 0.02 * i) if i < 2 else None, "alert": i == 3}
        for i, p in enumerate(PARTS)])
    quality = pl.DataFrame([
        {"partition": p, "feature": f, "rows": 1000, "missing_rate": 0.02 if (f == "car_value" and i == 1) else 0.0,
         "unseen_categories": 3 if f == "salary_range" and i == 2 else 0, "out_of_range": 0}
        for i, p in enumerate(PARTS) for f in FEATURES])
    ingestion = pl.DataFrame([
        {"partition": p, "rows": 1000, "files_accepted": 1, "files_rejected": 1 if i == 1 else 0,
         "rejected_reasons": "bad.csv: column 'car_value' missing" if i == 1 else ""} for i, p in enumerate(PARTS)])
    versions = [{"version": "1", "created": "2019-01-01T00:00:00", "gate": "promote", "aliases": ["previous"],
                 "lakefs_commit": "abc"},
                {"version": "2", "created": "2019-03-01T00:00:00", "gate": "promote", "aliases": ["challenger"],
                 "lakefs_commit": "def"},
                {"version": "3", "created": "2019-03-15T00:00:00", "gate": "reject", "aliases": [],
                 "lakefs_commit": "ghi"}]
    events = [
        {"at": "2019-01-01T00:00:00", "action": "registered", "version": "1", "actor": "dagster:run", "reason": "r"},
        {"at": "2019-01-01T00:01:00", "action": "gate_decision", "version": "1", "actor": "dagster:run",
         "reason": "first model", "decision": "promote"},
        {"at": "2019-01-01T00:02:00", "action": "promoted", "version": "1", "actor": "platform:publish", "reason": "p"},
        {"at": "2019-03-01T00:00:00", "action": "promoted", "version": "2", "actor": "platform:publish", "reason": "p"},
        {"at": "2019-03-15T00:00:00", "action": "gate_decision", "version": "3", "actor": "dagster:drift",
         "reason": "behavioural expectation(s) failed: <dti>", "decision": "reject"},
        {"at": "2019-04-02T00:00:00", "action": "rolled_back", "version": "1", "actor": "platform:rollback",
         "reason": "realized roc_auc fell"},
        {"at": "2019-04-02T00:00:00", "action": "rollback_intent", "version": "1", "actor": "x", "reason": "i"}]
    return report.HealthData(model="car_loan-model", dataset="car_loan", as_of=as_of, metric="roc_auc",
                             higher_is_better=True, drift_method="jensen_shannon", drift=drift,
                             performance=performance, quality=quality, ingestion=ingestion, versions=versions,
                             events=events, links={"lakeFS commit": "http://127.0.0.1:1/commits/x"})


def test_the_report_has_four_sections_each_with_a_plot_and_a_table_with_rows():
    page = report.build_html(synthetic_health())
    for name in report.SECTIONS:
        section = page.split(f'<section id="section-{name}"', 1)[1].split("</section>", 1)[0]
        assert f'id="plot-{name}"' in section
        assert "<tbody>" in section and section.count("<tr>") >= 3, name
        assert 'class="empty"' not in section, name
    # nothing is fetched when the page opens (plotly.js's bundle only names a CDN for map topologies, unused here)
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"?https?:", page)
    assert len(re.findall(r"Plotly\.newPlot\(\s*\"plot-", page)) == 4
    assert len(re.findall(r"plotly\.js v\d", page)) == 1  # the library is embedded once
    assert "&lt;dti&gt;" in page and "<dti>" not in page  # text from the audit trail is escaped


def test_the_sections_hold_the_inputs_numbers():
    data = synthetic_health()
    drift = report.drift_table(data)
    assert drift.height == 3 and drift["feature"][0] == "debt_to_income_ratio" and drift["latest_alert"][0]
    assert drift.filter(pl.col("feature") == "debt_to_income_ratio")["alerting_batches"][0] == 2
    perf = report.performance_table(data)
    assert perf["partition"].to_list() == PARTS and perf["realized"].null_count() == 2
    quality = report.quality_table(data)
    row = quality.filter(pl.col("partition") == "2019-02").row(0, named=True)
    assert (row["files_quarantined"], row["max_missing_rate"], row["worst_feature"]) == (1, 0.02, "car_value")
    labels = [e["label"] for e in report.timeline(data)]
    assert labels == ["registered", "gate: promote", "promoted", "promoted", "gate: reject", "rolled_back"]
    s = report.summary(data)
    assert s["drift"]["alerting_in_latest"] == ["debt_to_income_ratio"]
    assert s["performance"]["batches_realized"] == 2 and abs(s["performance"]["latest_realized"] - 0.92) < 1e-9
    assert s["versions"] == {"count": 3, "champion": None, "promotions": 2, "rollbacks": 1}
    md = report.summary_markdown(data, link="http://127.0.0.1:1/objects?path=x")
    assert "1 of 3 features alerting" in md and "1 file(s) quarantined over 4 batches" in md
    assert "[open the report](http://127.0.0.1:1/objects?path=x)" in md


def test_a_section_without_data_says_so_instead_of_plotting_nothing():
    data = synthetic_health()
    data.drift = report.empty(report.DRIFT_COLUMNS)
    data.performance = report.empty(report.PERFORMANCE_COLUMNS)
    data.events, data.versions = [], []
    page = report.build_html(data)
    assert "No drift report yet." in page and "No performance estimate yet." in page
    assert "No registered model version." in page
    assert "No data-quality report yet." not in page  # that section still has data
