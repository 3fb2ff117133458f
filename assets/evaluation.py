"""Evaluation: candidate vs champion on the same test rows, the promotion gate (a decision, applied when the
run is published), and the model card."""



import base64
import datetime as dt
import io
import json
import os

import dagster as dg
from mlplatform.lazy import lazy_import
np = lazy_import("numpy")
pl = lazy_import("polars")

from mlplatform import behaviour, modeling, registry
from resources.audit import AuditResource
from resources.lakefs import LakeFSResource
from resources.mlflow import MLflowResource
from resources.naming import ns
from resources.publish import EXPERIMENT_TAG, GATE_TAG, MODEL_NAME_TAG, MODEL_VERSION_TAG
from mlplatform.spec import DatasetSpec


class GateConfig(dg.Config):
    manual_approval: bool = False  # hold promotion until `mlp approve VERSION --by NAME --reason TEXT`
    bootstrap_samples: int = 300


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def plots(spec: DatasetSpec, y, p_new, p_old, importance: dict, slices: list[dict]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if spec.is_classification:
        for name, p in (("candidate", p_new), ("champion", p_old)):
            if p is None:
                continue
            edges = np.linspace(0, 1, 11)
            idx = np.clip(np.digitize(p, edges[1:-1]), 0, 9)
            xs = [p[idx == b].mean() for b in range(10) if (idx == b).any()]
            ys = [y[idx == b].mean() for b in range(10) if (idx == b).any()]
            ax.plot(xs, ys, marker="o", label=name)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed rate")
        ax.set_title("calibration (test split)")
    else:
        ax.scatter(y, p_new, s=2, alpha=0.3, label="candidate")
        ax.set_xlabel("actual")
        ax.set_ylabel("predicted")
        ax.set_title("predicted vs actual (test split)")
    ax.legend()
    out["calibration.png"] = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = sorted(importance, key=importance.get)
    ax.barh(names, [importance[n] for n in names])
    ax.set_title("feature importance (gain)")
    out["importance.png"] = _png(fig)
    plt.close(fig)
    if slices:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(slices) + 1))
        labels = [f"{s['feature']}={s['value']}" for s in slices]
        ax.barh(labels, [s[spec.metric] for s in slices])
        ax.set_title(f"{spec.metric} per slice (test split)")
        out["slices.png"] = _png(fig)
        plt.close(fig)
    return out


def build_evaluation(spec: DatasetSpec) -> list:
    n = ns(spec)
    behaviour_checks = [
        dg.AssetCheckSpec(behaviour_check_name(e), asset=n.key("evaluation_report"), blocking=True,
                          description=f"Behavioural expectation ({e.kind}): {e.description or e.name}")
        for e in spec.behaviour]

    @dg.asset(
        key_prefix=[spec.name], group_name="evaluation", kinds={"mlflow", "lightgbm"}, code_version="2",
        ins=n.ins("candidate_model", "training_set"),
        description="Candidate vs champion on the same test rows, with a paired bootstrap CI, and the spec's "
                    "behavioural expectations (invariance, direction, minimum functionality); gates promotion.",
        check_specs=[dg.AssetCheckSpec("promotion_gate", asset=n.key("evaluation_report"), blocking=True,
                                       description="Floor from config; not significantly worse than the champion; "
                                                   "every behavioural expectation holds"),
                     *behaviour_checks],
    )
    def evaluation_report(context: dg.AssetExecutionContext, config: GateConfig, candidate_model: dict,
                          training_set, mlflow: MLflowResource, audit: AuditResource,
                          lakefs: LakeFSResource):
        mlflow = mlflow.scoped(spec)  # this data set's registered model and experiment
        version = str(candidate_model["version"])
        test = training_set.filter(pl.col("split") == "test")
        y = test[spec.target].to_numpy()
        cand = registry.load_booster(mlflow, version)
        p_new = modeling.predict(cand, test, spec)
        m_new = modeling.metrics(y, p_new, spec)
        champ_version = registry.aliases(mlflow).get(registry.CHAMPION)
        p_old, m_old, comparison = None, None, None
        if champ_version and champ_version != version:
            champ = registry.load_booster(mlflow, champ_version)
            p_old = modeling.predict(champ, test, spec)
            m_old = modeling.metrics(y, p_old, spec)
            comparison = modeling.paired_bootstrap(y, p_new, p_old, spec, n=config.bootstrap_samples)
        importance = dict(zip(cand.feature_name(), [float(v) for v in cand.feature_importance("gain")]))
        slices = modeling.slice_metrics(test, p_new, spec)
        images = plots(spec, y, p_new, p_old, importance, slices)
        run_id = candidate_model["run_id"]
        client = mlflow.client()
        for name, data in images.items():
            path = f"/tmp/mlp-{run_id}-{name}"
            with open(path, "wb") as fh:
                fh.write(data)
            client.log_artifact(run_id, path, artifact_path="evaluation")
            os.remove(path)
        for k, v in m_new.items():
            client.log_metric(run_id, f"test_{k}", v)
        results = behaviour.evaluate(spec, test, behaviour.model_predictor(cand, spec))
        report = {
            "model_version": version, "champion_version": champ_version if p_old is not None else None,
            "metric": spec.metric, "test_rows": int(len(y)), "candidate": m_new, "champion": m_old,
            "comparison": comparison, "slices": slices, "importance": importance,
            "behaviour": [r.as_dict() for r in results],
            "mlflow_run_id": run_id, "training_set_commit": candidate_model["training_set_commit"],
        }
        failed_expectations = [r.name for r in behaviour.failures(results)]
        passed, reason = registry.decide(spec, m_new[spec.metric], comparison, behaviour.failure_reasons(results))
        if champ_version == version:  # a retrain on unchanged data, code and params reused the champion
            reason = f"v{version} is already the champion (same training data, code and parameters); {reason}"
        # The gate only decides. Aliases move when this run is published (its data merged into main),
        # so a run that fails after this point moves nothing.
        outcome = registry.apply_gate(
            mlflow, audit.trail(), spec, version, passed, reason,
            {"metrics": m_new, "champion_metrics": m_old, "comparison": comparison, "dagster_run_id": context.run_id,
             "failed_expectations": failed_expectations,
             "lakefs_commit": candidate_model["training_set_commit"], "champion_version": champ_version},
            manual=config.manual_approval, actor=f"dagster:{context.run.tags.get('retrain/trigger', 'run')}")
        context.instance.add_run_tags(context.run_id, {
            GATE_TAG: outcome.action, MODEL_VERSION_TAG: version, MODEL_NAME_TAG: mlflow.model_name,
            EXPERIMENT_TAG: mlflow.experiment})
        report["gate"] = {"passed": passed, "action": outcome.action, "reason": outcome.reason,
                          "applied": "when this run is published to lakeFS main" if passed else "never"}
        client.set_model_version_tag(mlflow.model_name, version, "gate", outcome.action)
        rows = [dg.TableRecord({"metric": k, "candidate": round(v, 5),
                                "champion": round(m_old[k], 5) if m_old else None}) for k, v in m_new.items()]
        md_imgs = "\n".join(f"![{n}](data:image/png;base64,{base64.b64encode(d).decode()})" for n, d in images.items())
        card_meta = {}
        if not passed:
            # The blocking checks fail, so `model_card` will not run: the rejected candidate's card (naming what
            # failed) is written here, to its MLflow run and to this asset's metadata.
            card = make_card(spec, candidate_model, report, training_set, lakefs,
                             audit.trail().history(mlflow.model_name, version))
            md = log_card(client, run_id, card)
            card_meta = {"card": dg.MetadataValue.md(md)}
        yield dg.Output(report, metadata={
            "summary": dg.MetadataValue.table(rows, schema=dg.TableSchema(columns=[
                dg.TableColumn("metric"), dg.TableColumn("candidate", "float"), dg.TableColumn("champion", "float")])),
            f"test_{spec.metric}": dg.MetadataValue.float(m_new[spec.metric]),
            "improvement_vs_champion": dg.MetadataValue.float(comparison["diff"] if comparison else 0.0),
            "ci_low": dg.MetadataValue.float(comparison["ci_low"] if comparison else 0.0),
            "gate": dg.MetadataValue.text(outcome.action),
            "gate_reason": dg.MetadataValue.text(outcome.reason),
            "aliases_move": dg.MetadataValue.text(
                "at publication of this run (when its lakeFS branch is merged into main)" if passed else
                "never: the candidate is rejected"),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
            "plots": dg.MetadataValue.md(md_imgs),
            "behaviour": dg.MetadataValue.md(behaviour.markdown_table(results)),
            "failed_expectations": dg.MetadataValue.text(", ".join(failed_expectations) or "none"),
            **card_meta,
        })
        yield dg.AssetCheckResult(check_name="promotion_gate", passed=passed, description=outcome.reason,
                                  metadata={"decision": outcome.action, "model_version": version,
                                            "failed_expectations": dg.MetadataValue.text(
                                                ", ".join(failed_expectations) or "none")})
        for e, r in zip(spec.behaviour, results):
            yield dg.AssetCheckResult(
                check_name=behaviour_check_name(e), passed=r.passed, description=r.message,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"expectation": r.name, "kind": r.kind, "result": "pass" if r.passed else "FAIL",
                          "measured": dg.MetadataValue.float(float(r.measured)),
                          "threshold": dg.MetadataValue.float(float(r.threshold)),
                          "rows": r.rows, "violating_rows": r.violating_rows, "model_version": version})

    @dg.asset(
        key_prefix=[spec.name], group_name="evaluation", kinds={"mlflow", "lakefs"}, code_version="1",
        ins=n.ins("candidate_model", "evaluation_report", "training_set"),
        description="Model card (Markdown and JSON): use, lineage, metrics, slices, gate and approval.",
    )
    def model_card(context: dg.AssetExecutionContext, candidate_model: dict, evaluation_report: dict,
                   training_set, mlflow: MLflowResource, lakefs: LakeFSResource,
                   audit: AuditResource) -> dict:
        mlflow = mlflow.scoped(spec)
        card = make_card(spec, candidate_model, evaluation_report, training_set, lakefs,
                         audit.trail().history(mlflow.model_name, candidate_model["version"]))
        md = log_card(mlflow.client(), candidate_model["run_id"], card)
        context.add_output_metadata({"card": dg.MetadataValue.md(md),
                                     "mlflow_run": dg.MetadataValue.url(mlflow.run_url(candidate_model["run_id"]))})
        return {"card": card, "markdown": md}

    return [evaluation_report, model_card]


def behaviour_check_name(expectation) -> str:
    return f"behaviour_{expectation.name}"


def log_card(client, run_id: str, card: dict) -> str:
    """The card as Markdown and JSON on the candidate's MLflow run; returns the Markdown."""
    md = card_markdown(card)
    client.log_text(run_id, md, "model_card.md")
    client.log_text(run_id, json.dumps(card, indent=1, default=str), "model_card.json")
    return md


def make_card(spec, cand, report, ts, lakefs, events) -> dict:
    from resources.io import asset_path

    splits = {}
    for s in modeling.SPLITS:
        part = ts.filter(pl.col("split") == s)
        splits[s] = {"rows": part.height, "from": str(part[spec.time_column].min()),
                     "to": str(part[spec.time_column].max())}
    return {
        "model": f"{spec.name}-model", "version": cand["version"], "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "intended_use": spec.description + f" Target: {spec.target} ({spec.problem_type}). Batch scoring of "
                        f"{spec.cadence} production batches; not for individual decisions without review.",
        "training_data": {"lakefs_commit": cand["training_set_commit"],
                          "lakefs_uri": lakefs.uri(cand["training_set_commit"],
                                                   asset_path(ns(spec).key("training_set"), None, "parquet")),
                          "splits": splits},
        "features": spec.model_feature_names, "params": cand["params"],
        "metrics": report["candidate"], "champion_metrics": report["champion"], "comparison": report["comparison"],
        "slices": report["slices"], "gate": report["gate"], "behaviour": report.get("behaviour", []),
        "approvals": [{"at": e.at, "by": e.actor, "action": e.action, "reason": e.reason} for e in events
                      if e.action in ("gate_decision", "promoted", "awaiting_approval", "approved", "rolled_back")],
        "limitations": ["Trained on the reference period and labelled production batches only; drift beyond "
                        "them is watched by the monitoring assets, not handled by the model.",
                        "Slices with fewer than 30 test rows are not reported."],
    }


def card_markdown(card: dict) -> str:
    lines = [f"# Model card: {card['model']} v{card['version']}", "", f"**Intended use.** {card['intended_use']}", "",
             "## Training data", f"- lakeFS commit `{card['training_data']['lakefs_commit']}`",
             f"- {card['training_data']['lakefs_uri']}"]
    for s, v in card["training_data"]["splits"].items():
        lines.append(f"- {s}: {v['rows']} rows, {v['from']} .. {v['to']}")
    lines += ["", "## Metrics (test split)", "| metric | candidate | champion |", "|---|---|---|"]
    for k, v in card["metrics"].items():
        champ = card["champion_metrics"][k] if card["champion_metrics"] else None
        lines.append(f"| {k} | {v:.4f} | {'' if champ is None else f'{champ:.4f}'} |")
    if card["comparison"]:
        c = card["comparison"]
        lines.append(f"\nImprovement vs champion: {c['diff']:+.4f} (95% CI {c['ci_low']:+.4f} .. {c['ci_high']:+.4f})")
    lines += ["", f"## Gate: {card['gate']['action']}", card["gate"]["reason"], "", "## Behavioural expectations"]
    results = card.get("behaviour") or []
    failed = [r["name"] for r in results if not r["passed"]]
    if results:
        lines.append(f"Failed: {', '.join(failed)}" if failed else f"All {len(results)} hold.")
        lines.append("")
    lines.append(behaviour.markdown_table([behaviour.Result(**r) for r in results]))
    lines += ["", "## Slices"]
    for s in card["slices"]:
        lines.append(f"- {s['feature']}={s['value']}: {s['rows']} rows, " +
                     ", ".join(f"{k}={v:.4f}" for k, v in s.items() if isinstance(v, float)))
    lines += ["", "## Approvals and decisions"] + [f"- {a['at']} {a['by']}: {a['action']} ({a['reason']})"
                                                   for a in card["approvals"]]
    lines += ["", "## Limitations"] + [f"- {x}" for x in card["limitations"]]
    return "\n".join(lines) + "\n"
