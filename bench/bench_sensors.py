"""Duration of one tick of each sensor on a real (SQLite) Dagster instance holding a realistic history.

    .venv/bin/python bench/bench_sensors.py
"""

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, car_loan

import dagster as dg  # noqa: E402
import polars as pl  # noqa: E402

from resources.environment import Settings, build_resources  # noqa: E402
from sensors.lifecycle import build_lifecycle  # noqa: E402


def main() -> None:
    spec = car_loan()
    sensors = {s.name.split("__", 1)[-1]: s for s in build_lifecycle(spec)["sensors"]}  # car_loan__<name>
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MLP_STATE_DIR"] = str(tmp)
        # The platform's resources for this state folder (no lakeFS: the sensors only read).
        platform = build_resources(Settings(state_dir=tmp, dataset=spec.name,
                                       mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}"))
        landing = platform["landing"].folder(spec)
        (tmp / "home").mkdir()
        with dg.instance_for_test(temp_dir=str(tmp / "home")) as instance:
            # A year of history: 12 batches x (records, labels, drift, estimate, realized) events.
            for month in range(1, 13):
                p = f"2019-{month:02d}-01" if month <= 8 else f"2018-{month:02d}-01"
                for key, meta in (("raw_records", {"rows": 5000}), ("raw_labels", {"rows": 5000}),
                                  ("drift_report", {"summary": dg.MetadataValue.json(
                                      {"alerts_by_feature": {"car_value": ["jensen_shannon"]}})}),
                                  ("performance_estimate", {"estimated_roc_auc": 0.96, "champion_test_score": 0.97}),
                                  ("realized_performance", {"realized_roc_auc": 0.96, "previous_roc_auc": 0.96,
                                                            "model_version": "1"})):
                    instance.report_runless_asset_event(dg.AssetMaterialization([spec.name, key], partition=p,
                                                                                metadata=meta))
                d = landing / "records" / p
                d.mkdir(parents=True)
                pl.DataFrame({"id": [1]}).write_parquet(d / "batch.parquet")
                (d / "batch.parquet.done").touch()  # complete at once: the tick requests instead of waiting
            resources = {"landing_arrivals": {"landing": platform["landing"]},
                         "retrain_on_evidence": {}, "rollback_on_regression": {"mlflow": platform["mlflow"]}}
            results = {}
            for name, res in resources.items():
                times, cursor = [], None
                for i in range(15):
                    ctx = dg.build_sensor_context(instance=instance, cursor=cursor if i else None,
                                                  resources=res or None)
                    t0 = time.perf_counter()
                    sensors[name](ctx)
                    times.append(time.perf_counter() - t0)
                results[name] = {"median_ms": round(statistics.median(times[1:]) * 1000, 1),
                                 "max_ms": round(max(times[1:]) * 1000, 1), "first_ms": round(times[0] * 1000, 1)}
    print(f"{'sensor':<26}{'median ms':>10}{'max ms':>10}{'first tick ms':>15}")
    for name, r in results.items():
        print(f"{name:<26}{r['median_ms']:>10}{r['max_ms']:>10}{r['first_ms']:>15}")
    out = RESULTS / "sensors.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
