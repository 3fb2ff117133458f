"""`make demo`: materialize the pipeline from the CLI, batch by batch, then print where to look."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAGSTER = str(Path(sys.executable).parent / "dagster")


def materialize(select: str, partition: str | None = None) -> None:
    cmd = [DAGSTER, "asset", "materialize", "-f", "platform/definitions.py", "-d", ".", "--select", select]
    if partition:
        cmd += ["--partition", partition]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"materialization of {select} {partition or ''} failed (exit {proc.returncode})")
    print(f"  ok in {time.time() - t0:.0f}s", flush=True)
    publish()


def publish() -> None:
    subprocess.run([str(Path(sys.executable).parent / "mlp"), "publish"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)


def summary() -> None:
    from mlplatform.cli import _lakefs

    lakefs = _lakefs()
    head = lakefs.head()
    print("\n== where to look")
    print(f"lakeFS main:   {head}  {lakefs.commit_url(head)}")
    print(f"  objects:     {lakefs.endpoint}/repositories/{lakefs.repository}/objects?ref=main")
    print(f"MLflow:        {os.environ.get('MLFLOW_TRACKING_URI')}  (UI: `make dev`, then http://127.0.0.1:5000)")
    print("Dagster UI:    make dev   (then http://127.0.0.1:3000; DAGSTER_HOME=.state/dagster_home)")
    print("Lifecycle:     .venv/bin/python -m mlplatform.env mlp status   (below)\n")
    from mlplatform.cli import main as mlp

    mlp(["status"])


def main() -> None:
    from mlplatform.cli import _simulator

    if "--summary" in sys.argv:
        summary()
        return
    state = _simulator().state()
    materialize("reference_data")
    for partition in state["released"]:
        select = "raw_records,raw_labels" if partition in state["labels_released"] else "raw_records"
        materialize(select, partition)
    materialize("stg_records,stg_labels,features,labelled_examples,training_set,candidate_model,"
                "evaluation_report,model_card")
    for partition in state["released"]:
        labelled = partition in state["labels_released"]
        materialize(PER_BATCH + (",realized_performance" if labelled else ""), partition)


# Per-batch scoring and monitoring, materialized after the model exists.
PER_BATCH = "batch_predictions,drift_report,performance_estimate,data_quality_report"


if __name__ == "__main__":
    main()
