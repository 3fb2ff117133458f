"""The model health report: one self-contained HTML page per model answering "how is this model doing?".

Four sections, each a plot and a table:
1. drift over time per feature (the batch drift reports);
2. the label-free estimate (NannyML CBPE / DLE) with its confidence band, against the realized metric;
3. data quality per batch (quarantined files, rows, missing / unseen / out-of-range rates);
4. the timeline of model versions: registrations, gate decisions, promotions, approvals and rollbacks.

Plain logic on plain inputs (`HealthData`), no Dagster: assets/report.py gathers the inputs. Plotly is imported
inside the functions; its JavaScript is embedded once, inline, so the page opens with no network at all.
"""

from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass, field
from typing import Any

from mlplatform.lazy import lazy_import
pl = lazy_import("polars")

SECTIONS = ("drift", "performance", "quality", "versions")
EVENT_ACTIONS = ("registered", "gate_decision", "promoted", "awaiting_approval", "approved", "rolled_back",
                 "retrain_triggered")
DRIFT_COLUMNS = ("partition", "feature", "method", "value", "upper_threshold", "alert")
PERFORMANCE_COLUMNS = ("partition", "estimated", "lower", "upper", "lower_threshold", "reference_score",
                       "model_version", "realized", "alert")
QUALITY_COLUMNS = ("partition", "feature", "rows", "missing_rate", "unseen_categories", "out_of_range")
INGESTION_COLUMNS = ("partition", "rows", "files_accepted", "files_rejected", "rejected_reasons")


@dataclass
class HealthData:
    """Everything the report shows. Frames may be empty (a section then says what is missing)."""

    model: str
    dataset: str
    as_of: str                      # the batch the report was refreshed after
    metric: str                     # the estimated metric
    higher_is_better: bool
    drift_method: str
    drift: pl.DataFrame             # DRIFT_COLUMNS: one row per batch, feature and method
    performance: pl.DataFrame       # PERFORMANCE_COLUMNS: one row per batch (realized null until labels land)
    quality: pl.DataFrame           # QUALITY_COLUMNS: one row per batch and feature
    ingestion: pl.DataFrame         # INGESTION_COLUMNS: one row per batch
    versions: list[dict[str, Any]]  # {version, created, gate, aliases (list), lakefs_commit}
    events: list[dict[str, Any]]    # {at, action, version, actor, reason, decision}
    links: dict[str, str] = field(default_factory=dict)  # label -> URL (Dagster run, lakeFS commit, MLflow model)
    generated_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def empty(columns: tuple[str, ...]) -> pl.DataFrame:
    return pl.DataFrame({c: [] for c in columns})


# --- the numbers each section is built on (shared by the HTML and the Dagster summary) ----------------------------
def drift_series(data: HealthData) -> pl.DataFrame:
    """The report's drift method only: partition, feature, value, upper_threshold, alert; sorted."""
    d = data.drift
    if d.height == 0:
        return empty(("partition", "feature", "value", "upper_threshold", "alert"))
    if "method" in d.columns:
        d = d.filter(pl.col("method") == data.drift_method)
    return d.select("partition", "feature", "value", "upper_threshold", "alert").sort("feature", "partition")


def drift_table(data: HealthData) -> pl.DataFrame:
    """Per feature: the latest batch's value, whether it alerts, and alerts over the window."""
    s = drift_series(data)
    if s.height == 0:
        return empty(("feature", "latest_value", "latest_alert", "alerting_batches", "batches"))
    return (s.group_by("feature").agg(pl.col("value").last().alias("latest_value"),
                                      pl.col("alert").last().alias("latest_alert"),
                                      pl.col("alert").cast(pl.Int64).sum().alias("alerting_batches"),
                                      pl.len().alias("batches"))
            .sort(["latest_alert", "latest_value"], descending=True))


def performance_table(data: HealthData) -> pl.DataFrame:
    p = data.performance
    if p.height == 0:
        return empty(PERFORMANCE_COLUMNS)
    for c in PERFORMANCE_COLUMNS:
        if c not in p.columns:
            p = p.with_columns(pl.lit(None).alias(c))
    return p.select(PERFORMANCE_COLUMNS).sort("partition")


def quality_table(data: HealthData) -> pl.DataFrame:
    """Per batch: rows, files accepted / quarantined, and the worst feature rates."""
    q, ing = data.quality, data.ingestion
    parts = sorted(set(q["partition"].to_list() if q.height else []) |
                   set(ing["partition"].to_list() if ing.height else []))
    if not parts:
        return empty(("partition", "rows", "files_accepted", "files_quarantined", "max_missing_rate",
                      "worst_feature", "unseen_categories", "out_of_range", "quarantine_reasons"))
    rows = []
    for p in parts:
        qp = q.filter(pl.col("partition") == p) if q.height else q
        ip = ing.filter(pl.col("partition") == p) if ing.height else ing
        worst = qp.sort("missing_rate", descending=True).row(0, named=True) if qp.height else None
        rows.append({
            "partition": p,
            "rows": int(ip["rows"][0]) if ip.height and ip["rows"][0] is not None else
            (int(qp["rows"].max()) if qp.height else None),
            "files_accepted": int(ip["files_accepted"][0]) if ip.height else None,
            "files_quarantined": int(ip["files_rejected"][0]) if ip.height else None,
            "max_missing_rate": float(worst["missing_rate"]) if worst else None,
            "worst_feature": worst["feature"] if worst and worst["missing_rate"] > 0 else "",
            "unseen_categories": int(qp["unseen_categories"].sum()) if qp.height else None,
            "out_of_range": int(qp["out_of_range"].sum()) if qp.height else None,
            "quarantine_reasons": (ip["rejected_reasons"][0] or "") if ip.height else "",
        })
    return pl.DataFrame(rows, infer_schema_length=None)


def timeline(data: HealthData) -> list[dict[str, Any]]:
    """The registry events worth a marker, oldest first."""
    out = []
    for e in data.events:
        if e.get("action") not in EVENT_ACTIONS:
            continue
        label = e["action"]
        if label == "gate_decision":
            label = f"gate: {e.get('decision') or '?'}"
        out.append({**e, "label": label})
    return sorted(out, key=lambda e: str(e.get("at")))


def summary(data: HealthData) -> dict[str, Any]:
    """The headline of each section (also the Dagster metadata preview)."""
    d, perf, qual, events = drift_table(data), performance_table(data), quality_table(data), timeline(data)
    realized = perf.filter(pl.col("realized").is_not_null()) if perf.height else perf
    champion = next((v["version"] for v in data.versions if "champion" in (v.get("aliases") or [])), None)
    return {
        "as_of": data.as_of,
        "batches": sorted(set(drift_series(data)["partition"].to_list()) | set(perf["partition"].to_list())),
        "drift": {"method": data.drift_method, "features": d.height,
                  "alerting_in_latest": d.filter(pl.col("latest_alert"))["feature"].to_list() if d.height else []},
        "performance": {"metric": data.metric, "batches_estimated": perf.height, "batches_realized": realized.height,
                        "latest_estimate": perf["estimated"][-1] if perf.height else None,
                        "latest_realized": realized["realized"][-1] if realized.height else None},
        "quality": {"batches": qual.height,
                    "files_quarantined": int(qual["files_quarantined"].fill_null(0).sum()) if qual.height else 0,
                    "max_missing_rate": float(qual["max_missing_rate"].fill_null(0).max()) if qual.height else None},
        "versions": {"count": len(data.versions), "champion": champion,
                     "promotions": sum(e["action"] in ("promoted", "approved") for e in events),
                     "rollbacks": sum(e["action"] == "rolled_back" for e in events)},
    }


def summary_markdown(data: HealthData, link: str | None = None) -> str:
    s = summary(data)
    perf = s["performance"]

    def num(v):
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"**Model health of {data.model}** after batch `{data.as_of}`" + (f" — [open the report]({link})"
                                                                               if link else ""), "",
             "| section | status |", "|---|---|",
             f"| drift ({s['drift']['method']}) | {len(s['drift']['alerting_in_latest'])} of {s['drift']['features']} "
             f"features alerting in the latest batch {', '.join(s['drift']['alerting_in_latest'])} |",
             f"| {perf['metric']}: estimate vs realized | latest estimate {num(perf['latest_estimate'])}, latest "
             f"realized {num(perf['latest_realized'])} ({perf['batches_realized']} of {perf['batches_estimated']} "
             "batches labelled) |",
             f"| data quality | {s['quality']['files_quarantined']} file(s) quarantined over {s['quality']['batches']} "
             f"batches; max missing rate {num(s['quality']['max_missing_rate'])} |",
             f"| versions | {s['versions']['count']} version(s); champion {_champion(s)}; "
             f"{s['versions']['promotions']} promotion(s), {s['versions']['rollbacks']} rollback(s) |"]
    return "\n".join(lines)


def _champion(s: dict) -> str:
    return f"v{s['versions']['champion']}" if s["versions"]["champion"] else "none"


# --- HTML ---------------------------------------------------------------------------------------------------------
def _esc(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(df: pl.DataFrame | list[dict], columns: list[str], empty_note: str, limit: int = 200) -> str:
    rows = df.select(columns).head(limit).iter_rows() if isinstance(df, pl.DataFrame) else \
        [tuple(r.get(c) for c in columns) for r in df[:limit]]
    rows = list(rows)
    if not rows:
        return f'<p class="empty">{html.escape(empty_note)}</p>'
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _figure_html(fig, first: bool, div_id: str) -> str:
    fig.update_layout(margin={"l": 50, "r": 20, "t": 40, "b": 60}, height=380, template="plotly_white")
    return fig.to_html(full_html=False, include_plotlyjs="inline" if first else False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def _drift_figure(data: HealthData):
    import plotly.graph_objects as go

    s = drift_series(data)
    fig = go.Figure()
    for feat in s["feature"].unique().sort().to_list():
        f = s.filter(pl.col("feature") == feat)
        fig.add_trace(go.Scatter(x=f["partition"].to_list(), y=f["value"].to_list(), mode="lines+markers",
                                 name=feat))
    alerts = s.filter(pl.col("alert").fill_null(False))
    if alerts.height:
        fig.add_trace(go.Scatter(x=alerts["partition"].to_list(), y=alerts["value"].to_list(), mode="markers",
                                 name="alert", text=alerts["feature"].to_list(),
                                 marker={"symbol": "x", "size": 11, "color": "crimson"}))
    fig.update_layout(title=f"{data.drift_method} per feature and batch", xaxis_title="batch",
                      yaxis_title=data.drift_method)
    fig.update_xaxes(type="category")  # batches are labels, not a continuous time axis
    return fig


def _performance_figure(data: HealthData):
    import plotly.graph_objects as go

    p = performance_table(data)
    x = p["partition"].to_list()
    fig = go.Figure()
    band = p.filter(pl.col("lower").is_not_null() & pl.col("upper").is_not_null())
    if band.height:
        bx = band["partition"].to_list()
        fig.add_trace(go.Scatter(x=bx + bx[::-1], y=band["upper"].to_list() + band["lower"].to_list()[::-1],
                                 fill="toself", fillcolor="rgba(31,119,180,0.18)", line={"width": 0}, mode="lines",
                                 hoverinfo="skip", name="confidence band"))
    fig.add_trace(go.Scatter(x=x, y=p["estimated"].to_list(), mode="lines+markers", name=f"estimated {data.metric}",
                             line={"color": "rgb(31,119,180)"}))
    real = p.filter(pl.col("realized").is_not_null())
    if real.height:
        fig.add_trace(go.Scatter(x=real["partition"].to_list(), y=real["realized"].to_list(), mode="lines+markers",
                                 name=f"realized {data.metric}", line={"color": "black", "dash": "dot"},
                                 marker={"symbol": "diamond", "size": 9}))
    ref = p.filter(pl.col("reference_score").is_not_null())
    if ref.height:
        fig.add_trace(go.Scatter(x=ref["partition"].to_list(), y=ref["reference_score"].to_list(), mode="lines",
                                 name="champion test score", line={"color": "grey", "dash": "dash"}))
    thr = p.filter(pl.col("lower_threshold").is_not_null())
    if thr.height:
        fig.add_trace(go.Scatter(x=thr["partition"].to_list(), y=thr["lower_threshold"].to_list(), mode="lines",
                                 name="alert threshold", line={"color": "crimson", "dash": "dash"}))
    fig.update_layout(title=f"{data.metric}: NannyML estimate (band) vs realized once labels land",
                      xaxis_title="batch", yaxis_title=data.metric)
    fig.update_xaxes(type="category")
    return fig


def _quality_figure(data: HealthData):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    q, t = data.quality, quality_table(data)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=("missing rate per feature", "files per batch"))
    if q.height:
        for feat in q["feature"].unique().sort().to_list():
            f = q.filter(pl.col("feature") == feat).sort("partition")
            fig.add_trace(go.Scatter(x=f["partition"].to_list(), y=f["missing_rate"].to_list(),
                                     mode="lines+markers", name=f"missing: {feat}"), row=1, col=1)
    if t.height:
        fig.add_trace(go.Bar(x=t["partition"].to_list(), y=t["files_accepted"].fill_null(0).to_list(),
                             name="files accepted", marker_color="seagreen"), row=2, col=1)
        fig.add_trace(go.Bar(x=t["partition"].to_list(), y=t["files_quarantined"].fill_null(0).to_list(),
                             name="files quarantined", marker_color="crimson"), row=2, col=1)
    fig.update_layout(barmode="stack", title="data quality per batch")
    fig.update_xaxes(type="category")
    return fig


def _versions_figure(data: HealthData):
    import plotly.graph_objects as go

    events = timeline(data)
    colours = {"registered": "grey", "gate: promote": "seagreen", "gate: reject": "crimson",
               "gate: await_approval": "orange", "promoted": "green", "approved": "green",
               "awaiting_approval": "orange", "rolled_back": "purple", "retrain_triggered": "steelblue"}
    fig = go.Figure()
    for label in dict.fromkeys(e["label"] for e in events):
        es = [e for e in events if e["label"] == label]
        fig.add_trace(go.Scatter(
            x=[e["at"] for e in es], y=[_version_number(e.get("version")) for e in es], mode="markers",
            name=label, text=[f"v{e.get('version')} {e['label']} by {e.get('actor')}: {e.get('reason', '')}"[:300]
                              for e in es],
            hoverinfo="text+x", marker={"size": 12, "color": colours.get(label, "black"),
                                        "symbol": "x" if "reject" in label or label == "rolled_back" else "circle"}))
    fig.update_layout(title="model versions: registrations, gate decisions, promotions and rollbacks",
                      xaxis_title="time", yaxis_title="version", yaxis={"dtick": 1})
    return fig


def _version_number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table.data { border-collapse: collapse; font-size: .85em; margin: .8em 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.data th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
p.empty { color: #a33; font-style: italic; } .meta { color: #666; font-size: .9em; }
"""


def build_html(data: HealthData) -> str:
    """The report as one HTML document; plotly.js is inlined once (no network needed to open it)."""
    figures = {"drift": _drift_figure(data), "performance": _performance_figure(data),
               "quality": _quality_figure(data), "versions": _versions_figure(data)}
    plot = {name: _figure_html(fig, i == 0, f"plot-{name}") for i, (name, fig) in enumerate(figures.items())}
    s = summary(data)
    links = " · ".join(f'<a href="{html.escape(u, quote=True)}">{html.escape(k)}</a>' for k, u in data.links.items())
    perf = performance_table(data)
    versions = [{**v, "aliases": ", ".join(v.get("aliases") or [])} for v in data.versions]
    sections = {
        "drift": ("1. Drift over time per feature",
                  f"<p>{len(s['drift']['alerting_in_latest'])} of {s['drift']['features']} features alert in the "
                  f"latest batch ({data.drift_method}; thresholds from the reference chunks).</p>",
                  _table(drift_table(data), ["feature", "latest_value", "latest_alert", "alerting_batches", "batches"],
                         "No drift report yet.")),
        "performance": ("2. Estimated vs realized performance",
                        f"<p>{data.metric}: NannyML's label-free estimate with its confidence band; the realized "
                        f"value appears once a batch's labels land ({s['performance']['batches_realized']} of "
                        f"{s['performance']['batches_estimated']} batches so far).</p>",
                        _table(perf, ["partition", "model_version", "estimated", "lower", "upper", "realized",
                                      "reference_score", "alert"], "No performance estimate yet.")),
        "quality": ("3. Data quality per batch",
                    "<p>Files accepted and quarantined by the landing contracts, and the per-feature rates of "
                    "missing values, unseen categories and out-of-range values.</p>",
                    _table(quality_table(data), ["partition", "rows", "files_accepted", "files_quarantined",
                                                 "max_missing_rate", "worst_feature", "unseen_categories",
                                                 "out_of_range", "quarantine_reasons"],
                           "No data-quality report yet.")),
        "versions": ("4. Model versions: promotions and rollbacks",
                     f"<p>Champion: {_champion(s)}; {s['versions']['promotions']} promotion(s), "
                     f"{s['versions']['rollbacks']} rollback(s). Events from the audit trail; aliases from the "
                     "registry.</p>",
                     _table(versions, ["version", "created", "aliases", "gate", "lakefs_commit"],
                            "No registered model version.") +
                     _table(timeline(data)[::-1], ["at", "version", "label", "actor", "reason"],
                            "No registry event.", limit=50)),
    }
    body = "\n".join(f'<section id="section-{name}" class="health-section"><h2>{html.escape(title)}</h2>{intro}'
                     f'{plot[name]}{table}</section>' for name, (title, intro, table) in sections.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Model health: {html.escape(data.model)}</title>
<style>{CSS}</style></head>
<body>
<h1>Model health: {html.escape(data.model)} <small>({html.escape(data.dataset)})</small></h1>
<p class="meta">After batch <b>{html.escape(data.as_of)}</b> · generated {html.escape(data.generated_at)}
{(' · ' + links) if links else ''}</p>
{body}
</body></html>
"""
