"""`make demo`: materialize the pipeline from the CLI, batch by batch, then print where to look.

The flow is `flow(state)` -> the list of (selection, partition) steps; `main` runs them with `dagster asset
materialize` and publishes each run to lakeFS main. tests/test_demo_flow.py runs these same commands from an
empty state (a lakeFS with no repository, an empty MLflow store, an empty DAGSTER_HOME).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DAGSTER = str(BIN / "dagster")

# Whole-history assets built once the batches are in, then per-batch scoring and monitoring.
TRAINING = ("stg_reference_records,stg_reference_labels,reference_features,labelled_examples,training_set,"
            "candidate_model,"
            "evaluation_report,model_card")
PER_BATCH = "batch_predictions,drift_report,performance_estimate,data_quality_report"


def flow(state: dict) -> list[tuple[str, str | None]]:
    """The demo's materializations, in order, for the simulator's state (released batches and labels)."""
    steps: list[tuple[str, str | None]] = [("reference_data", None)]
    for partition in state["released"]:
        batch = "raw_records,stg_records,features"  # a batch's features are built with its records
        steps.append((batch + ",raw_labels,stg_labels" if partition in state["labels_released"] else batch,
                      partition))
    steps.append((TRAINING, None))
    for partition in state["released"]:
        labelled = partition in state["labels_released"]
        steps.append((PER_BATCH + (",realized_performance" if labelled else ""), partition))
    return steps


def materialize(select: str, partition: str | None = None) -> None:
    cmd = [DAGSTER, "asset", "materialize", "-f", "platform/definitions.py", "-d", ".", "--select", select]
    if partition:
        cmd += ["--partition", partition]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        from mlplatform.redact import redact

        sys.stderr.write(redact(proc.stdout[-3000:] + proc.stderr[-6000:]))
        raise SystemExit(f"materialization of {select} {partition or ''} failed (exit {proc.returncode})")
    print(f"  ok in {time.time() - t0:.0f}s", flush=True)
    publish()


def publish() -> None:
    proc = subprocess.run([str(BIN / "mlp"), "publish"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        from mlplatform.redact import redact

        sys.stderr.write(redact(proc.stdout[-3000:] + proc.stderr[-3000:]))
        raise SystemExit(f"`mlp publish` failed (exit {proc.returncode})")


def summary() -> None:
    from mlplatform.redact import redact_uri
    from resources.environment import LAKEFS
    from tooling.cli import _resources

    res = _resources(*LAKEFS)
    lakefs, mlflow = res["lakefs"], res.get("mlflow")
    head = lakefs.head()
    print("\n== where to look")
    print(f"lakeFS main:   {head}  {lakefs.commit_url(head)}")
    print(f"  objects:     {redact_uri(lakefs.endpoint)}/repositories/{lakefs.repository}/objects?ref=main")
    print(f"MLflow:        {redact_uri(mlflow.tracking_uri) if mlflow else '(MLFLOW_TRACKING_URI not set)'}  "
          f"(UI: `make dev`, then {mlflow.ui_url if mlflow else 'http://127.0.0.1:5000'})")
    print(f"Dagster UI:    make dev   (then http://127.0.0.1:3000; DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '')})")
    print("Lifecycle:     .venv/bin/python -m tooling.env mlp status   (below)")
    model = mlflow.model_name if mlflow else "<data set>-model"
    print(f"Online:        make serve   (then curl -s 127.0.0.1:8080/v1/models/{model}/predict "
          f"-H 'content-type: application/json' -d '{{\"rows\": [{{...one raw row...}}]}}'; "
          f"schema at http://127.0.0.1:8080/docs)\n")
    from tooling.cli import main as mlp

    mlp(["status"])


def main(argv: list[str] | None = None) -> None:
    from tooling.cli import _simulator

    argv = sys.argv[1:] if argv is None else argv
    if "--summary" in argv:
        summary()
        return
    for select, partition in flow(_simulator().state()):
        materialize(select, partition)


if __name__ == "__main__":
    main()
