"""`make demo`: materialize the pipeline batch by batch in one process (each step printed as its CLI
command), then print where to look.

The flow is `flow(state)` -> the list of (selection, partition) steps; `main` runs them in one process (the
definitions loaded once) and publishes each run to lakeFS main, printing for each step the `dagster asset
materialize` command that does the same from the CLI. tests/test_demo_flow.py runs these same commands from an
empty state (a lakeFS with no repository, an empty MLflow store, an empty DAGSTER_HOME).

The demo walks ONE data set through its lifecycle: MLP_DATASET's, car_loan by default (`make demo
DEMO_DATASET=car_price` for the other). The definitions it loads hold every live data set; its selections name
that data set's assets (`car_loan/raw_records`, ...), so the others are left untouched.
"""

from __future__ import annotations

import os
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
HEALTH = "model_health_report"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def flow(state: dict, spec=None) -> list[tuple[str, str | None]]:
    """The demo's materializations, in order, for the simulator's state (released batches and labels), as
    `--select` strings of `spec`'s asset keys (default: MLP_DATASET's data set, car_loan)."""
    from mlplatform.spec import dataset_spec
    from resources.naming import ns

    n = ns(spec or dataset_spec())
    return [(n.selection(select.split(",")), partition) for select, partition in _flow(state)]


def _flow(state: dict) -> list[tuple[str, str | None]]:
    steps: list[tuple[str, str | None]] = [("reference_data", None)]
    for partition in state["released"]:
        batch = "raw_records,stg_records,features"  # a batch's features are built with its records
        steps.append((batch + ",raw_labels,stg_labels" if partition in state["labels_released"] else batch,
                      partition))
    steps.append((TRAINING, None))
    for partition in state["released"]:
        labelled = partition in state["labels_released"]
        # The model's health page last: it reads the batch's monitoring outputs made in the same run.
        steps.append((PER_BATCH + (",realized_performance" if labelled else "") + f",{HEALTH}", partition))
    return steps


def cli_command(select: str, partition: str | None = None) -> list[str]:
    """The `dagster asset materialize` command that does one step (what an operator types to redo it)."""
    cmd = [DAGSTER, "asset", "materialize", "-f", "platform/definitions.py", "-d", ".", "--select", select]
    return cmd + (["--partition", partition] if partition else [])


class Runner:
    """Runs the demo's steps in this one process: the definitions are loaded once (not once per step, as one
    `dagster asset materialize` process per step would), each step is a run of the instance in DAGSTER_HOME
    (seen in the UI like any other), and each run is published as `mlp publish` would, before the next step."""

    def __init__(self) -> None:
        import runpy

        import dagster as dg

        from resources.environment import LAKEFS
        from tooling.cli import _resources

        from mlplatform.serving.models import compile_promotions_in_background

        # A promotion's compile for serving (lleaves, ONNX) runs beside the next steps, not before them; main()
        # waits for it at the end, so the compiled form is stored as a publish that waited would store it.
        compile_promotions_in_background()
        defs = runpy.run_path(str(ROOT / "platform" / "definitions.py"))["defs"]
        self.assets = list(defs.assets or [])
        self.resources = dict(defs.resources or {})
        self.instance = dg.DagsterInstance.get()
        res = _resources(*LAKEFS)
        self.lakefs, self.mlflow, self.audit = res["lakefs"], res.get("mlflow"), res["audit"].trail()

    def materialize(self, select: str, partition: str | None = None) -> None:
        import dagster as dg

        from resources.publish import publish_run

        print(f"$ {' '.join(cli_command(select, partition)[1:])}", flush=True)
        t0 = time.time()
        # The runs' event stream stays in the instance (the UI shows it); the console gets warnings and errors only.
        result = dg.materialize(self.assets, selection=select.split(","), partition_key=partition,
                                instance=self.instance, resources=self.resources, raise_on_error=False,
                                tags={"mlp/demo": "1"}, run_config=QUIET)
        if not result.success:
            from mlplatform.redact import redact

            failures = [e for e in result.all_events if e.is_step_failure]
            for event in failures:
                sys.stderr.write(redact(f"{event.step_key}: {event.step_failure_data.error.to_string()}"[-6000:]))
            raise SystemExit(f"materialization of {select} {partition or ''} failed (run {result.run_id}); "
                             f"the step failures are above; the run is in the UI (make dev)")
        outcome = publish_run(self.instance, self.lakefs, result.run_id, self.mlflow, self.audit)
        if outcome.status != "published" or outcome.promotion_pending:
            raise SystemExit(f"publishing run {result.run_id} did not complete: {outcome.status}: {outcome.detail}")
        print(f"  ok in {time.time() - t0:.0f}s (published)", flush=True)


def summary() -> None:
    from mlplatform.redact import redact_uri
    from resources.environment import LAKEFS
    from tooling.cli import _resources

    from mlplatform.spec import dataset_spec

    spec = dataset_spec()
    res = _resources(*LAKEFS)
    lakefs, mlflow = res["lakefs"], res.get("mlflow")
    mlflow = mlflow.scoped(spec) if mlflow is not None else None
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

    mlp(["status", "--dataset", spec.name])


def simulate(batches: int) -> None:
    """`mlp simulate reset` then `mlp simulate next <batches>` for the demo's data set, in this process (each
    printed as the command that does it)."""
    from mlplatform.spec import dataset_spec
    from tooling.cli import main as mlp

    name = dataset_spec().name
    for args in (["simulate", "reset", "--dataset", name], ["simulate", "next", str(batches), "--dataset", name]):
        print(f"$ mlp {' '.join(args)}", flush=True)
        if mlp(args) != 0:
            raise SystemExit(f"`mlp {' '.join(args)}` failed")


def main(argv: list[str] | None = None) -> None:
    """`python -m tooling.demo` runs the steps for the landing zone as it is; `--release N` first resets it and
    releases N batches (`mlp simulate reset` + `next N`); `--then-summary` prints where to look after the steps;
    `--summary` prints only that. `make demo` does all three in this one process: the libraries are imported
    once, not once per command."""
    from tooling.cli import _simulator

    argv = sys.argv[1:] if argv is None else argv
    if "--summary" in argv:
        summary()
        return
    if "--release" in argv:
        simulate(int(argv[argv.index("--release") + 1]))
    steps = flow(_simulator().state())
    runner = Runner()
    for select, partition in steps:
        runner.materialize(select, partition)
    from mlplatform.serving.models import wait_for_promotion_compiles

    t0 = time.time()
    if wait_for_promotion_compiles(timeout=300):
        print("  the champion's compile for serving is still running: the model server compiles on its first load")
    elif time.time() - t0 >= 1:
        print(f"  waited {time.time() - t0:.0f}s for the champion's compile for serving", flush=True)
    if "--then-summary" in argv:
        summary()


if __name__ == "__main__":
    main()
