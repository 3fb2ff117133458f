"""Write-audit-publish through a real lakeFS server: publish, keep, load-as-of, isolation, conflicts, faults."""


import subprocess
import sys
import time

import dagster as dg
import polars as pl
import pytest

from resources.io import LakeFSIOManager, asset_path, load_asset
from resources.lakefs import LakeFSResource, LakeFSUnavailable, run_branch
from resources.publish import prune_branches, publish_run

from .conftest import ROOT


class Knobs(dg.Config):
    value: int = 1
    fail_check: bool = False


parts = dg.StaticPartitionsDefinition(["a", "b"])


@dg.asset(check_specs=[dg.AssetCheckSpec("positive", asset="numbers", blocking=True)])
def numbers(config: Knobs):
    yield dg.Output(pl.DataFrame({"x": [config.value] * 3}))
    yield dg.AssetCheckResult(check_name="positive", passed=not config.fail_check)


@dg.asset
def doubled(numbers: pl.DataFrame) -> pl.DataFrame:
    return numbers.with_columns(pl.col("x") * 2)


@dg.asset(partitions_def=parts)
def slices(context: dg.AssetExecutionContext, config: Knobs) -> pl.DataFrame:
    time.sleep(0.2)
    return pl.DataFrame({"part": [context.partition_key], "v": [config.value]})


def run(assets, lakefs, instance, config=None, partition=None, raise_on_error=True, selection=None):
    return dg.materialize(assets, instance=instance, partition_key=partition, raise_on_error=raise_on_error,
                          selection=selection,
                          resources={"io_manager": LakeFSIOManager(lakefs=lakefs, await_publication=False)},
                          run_config={"ops": config} if config else None)


def test_successful_run_is_published_to_main_with_commit_metadata(lakefs, instance):
    before = lakefs.head()
    result = run([numbers, doubled], lakefs, instance, {"numbers": {"config": {"value": 5}}})
    # Before publishing, main is untouched and the run's branch holds the data.
    assert lakefs.head() == before
    assert lakefs.branch_exists(run_branch(result.run_id))
    outcome = publish_run(instance, lakefs, result.run_id)
    assert outcome.status == "published"
    assert lakefs.head() != before
    assert not lakefs.branch_exists(run_branch(result.run_id))
    assert load_asset(lakefs, "doubled")["x"].to_list() == [10, 10, 10]
    # Each materialization records its commit, path and a link; the commit carries lineage metadata.
    mat = result.asset_materializations_for_node("doubled")[0]
    commit = mat.metadata["lakefs_commit"].value
    assert mat.metadata["lakefs_link"].value.endswith(commit)
    meta = lakefs.commit_metadata(commit)
    assert meta["asset_key"] == "doubled" and meta["dagster_run_id"] == result.run_id
    upstream_commit = result.asset_materializations_for_node("numbers")[0].metadata["lakefs_commit"].value
    assert upstream_commit in meta["upstream_commits"]


def test_failed_blocking_check_leaves_main_unchanged_and_keeps_the_branch(lakefs, instance):
    run([numbers], lakefs, instance, {"numbers": {"config": {"value": 1}}})
    publish_run(instance, lakefs, instance.get_runs()[0].run_id)
    before = lakefs.head()
    result = run([numbers, doubled], lakefs, instance, {"numbers": {"config": {"value": 99, "fail_check": True}}},
                 raise_on_error=False)
    assert not result.success
    outcome = publish_run(instance, lakefs, result.run_id)
    assert outcome.status == "kept"
    assert lakefs.head() == before
    assert lakefs.branch_exists(run_branch(result.run_id))
    # The rejected data is on the kept branch for inspection, not on main.
    assert load_asset(lakefs, "numbers", ref=run_branch(result.run_id))["x"][0] == 99
    assert load_asset(lakefs, "numbers")["x"][0] == 1
    # A later run reads the last checked version, never the failed run's data.
    later = run([numbers, doubled], lakefs, instance, selection=["doubled"])
    assert load_asset(lakefs, "doubled", ref=run_branch(later.run_id))["x"][0] == 2
    # The kept branch is listed and can be pruned.
    assert prune_branches(instance, lakefs, older_than_days=0, dry_run=False).pruned == [run_branch(result.run_id)]
    assert not lakefs.branch_exists(run_branch(result.run_id))


def test_pruning_never_touches_a_queued_running_or_unknown_runs_branch(lakefs, instance):
    import uuid

    failed = run([numbers], lakefs, instance, {"numbers": {"config": {"fail_check": True}}}, raise_on_error=False)
    assert not failed.success
    from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    # A queued run needs an origin (where the daemon would launch it from); this file stands in for one.
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(InProcessCodeLocationOrigin(
        LoadableTargetOrigin(python_file=__file__)), "__repository__"), "ingest_batch")
    live = {}
    for status in (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
                   dg.DagsterRunStatus.NOT_STARTED):
        run_id = str(uuid.uuid4())
        instance.add_run(dg.DagsterRun(job_name="car_loan__ingest_batch", run_id=run_id, status=status,
                                       remote_job_origin=origin))
        live[run_branch(run_id)] = status
        lakefs.ensure_branch(run_branch(run_id))
    unknown = run_branch(str(uuid.uuid4()))  # e.g. a run of another Dagster instance sharing this repository
    lakefs.ensure_branch(unknown)
    dry = prune_branches(instance, lakefs, older_than_days=0, dry_run=True)
    assert dry.pruned == [run_branch(failed.run_id)] and lakefs.branch_exists(run_branch(failed.run_id))
    result = prune_branches(instance, lakefs, older_than_days=0, dry_run=False)
    assert result.pruned == [run_branch(failed.run_id)]
    assert not lakefs.branch_exists(run_branch(failed.run_id))
    for name, status in live.items():
        assert lakefs.branch_exists(name) and status.value in result.kept[name]
    assert lakefs.branch_exists(unknown) and "unknown run" in result.kept[unknown]
    # A failed run's branch younger than the limit is kept too.
    young = run([numbers], lakefs, instance, {"numbers": {"config": {"fail_check": True}}}, raise_on_error=False)
    assert run_branch(young.run_id) not in prune_branches(instance, lakefs, older_than_days=1, dry_run=False).pruned
    assert lakefs.branch_exists(run_branch(young.run_id))


def test_loading_at_an_older_commit_returns_the_older_content(lakefs, instance):
    first = run([numbers], lakefs, instance, {"numbers": {"config": {"value": 1}}})
    publish_run(instance, lakefs, first.run_id)
    old_commit = lakefs.head()
    lakefs.tag("v1", old_commit)
    second = run([numbers], lakefs, instance, {"numbers": {"config": {"value": 2}}})
    publish_run(instance, lakefs, second.run_id)
    assert load_asset(lakefs, "numbers")["x"][0] == 2
    assert load_asset(lakefs, "numbers", ref=old_commit)["x"][0] == 1
    assert load_asset(lakefs, "numbers", ref="v1")["x"][0] == 1
    # The I/O manager can also be pinned to a ref: downstream computed from the tagged data.
    pinned = dg.materialize([numbers, doubled], selection=["doubled"], instance=instance, resources={
        "io_manager": LakeFSIOManager(lakefs=lakefs, read_ref="v1", await_publication=False)})
    assert load_asset(lakefs, "doubled", ref=run_branch(pinned.run_id))["x"][0] == 2


def test_two_runs_at_once_write_separate_branches_without_interfering(lakefs, instance):
    # Two processes, as two runs launched at once would be.
    procs = {p: subprocess.Popen([sys.executable, "-m", "tests.concurrent_run", instance.root_directory, p, str(v)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p, v in (("a", 1), ("b", 2))}
    run_ids = {}
    for p, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        run_ids[p] = out.strip().splitlines()[-1]

    class R:
        def __init__(self, run_id):
            self.run_id, self.success = run_id, instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS

    results = {p: R(r) for p, r in run_ids.items()}
    a, b = results["a"], results["b"]
    assert a.success and b.success
    # Each branch sees only its own write.
    assert not lakefs.exists(run_branch(a.run_id), asset_path(dg.AssetKey("slices"), "b", "parquet"))
    assert not lakefs.exists(run_branch(b.run_id), asset_path(dg.AssetKey("slices"), "a", "parquet"))
    assert publish_run(instance, lakefs, a.run_id).status == "published"
    assert publish_run(instance, lakefs, b.run_id).status == "published"
    assert load_asset(lakefs, "slices", partition="a")["v"][0] == 1
    assert load_asset(lakefs, "slices", partition="b")["v"][0] == 2


def test_two_runs_writing_the_same_partition_conflict_and_main_keeps_the_first(lakefs, instance):
    lakefs.ensure_branch("seed")
    first = run([slices], lakefs, instance, {"slices": {"config": {"value": 1}}}, partition="a")
    second = run([slices], lakefs, instance, {"slices": {"config": {"value": 2}}}, partition="a")
    assert publish_run(instance, lakefs, first.run_id).status == "published"
    outcome = publish_run(instance, lakefs, second.run_id)
    assert outcome.status == "conflict"
    assert "assets/slices/partition=a/data.parquet" in outcome.detail
    assert load_asset(lakefs, "slices", partition="a")["v"][0] == 1
    assert lakefs.branch_exists(run_branch(second.run_id))


def test_unreachable_lakefs_fails_fast_naming_the_endpoint():
    from tooling.services import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    # The retry budget bounds the wait: one retry here (the default budget retries for up to a minute).
    res = LakeFSResource(endpoint=endpoint, access_key_id="x", secret_access_key="y", timeout_seconds=2,
                         retries=1, retry_deadline_seconds=3)
    t0 = time.time()
    with pytest.raises(LakeFSUnavailable, match=endpoint.replace(".", r"\.")):
        res.head()
    assert time.time() - t0 < 5


def test_wrong_credentials_give_a_clear_error(lakefs_env):
    res = LakeFSResource(endpoint=lakefs_env["LAKEFS_ENDPOINT"], access_key_id="AKIAWRONGWRONGWRONG1",
                         secret_access_key="nope")
    with pytest.raises(LakeFSUnavailable, match="rejected the credentials.*AKIAWRONGWRONGWRONG1"):
        res.head()


def test_a_missing_setting_is_named(state, monkeypatch, tmp_path):
    from mlplatform.spec import SettingError, load_spec

    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "platform" / "datasets" / "car_loan.yaml").read_text().replace("time_column:", "tim:"))
    with pytest.raises(SettingError, match=r"bad\.yaml: setting 'time_column' is missing"):
        load_spec(bad)
    bad.write_text((ROOT / "platform" / "datasets" / "car_loan.yaml").read_text()
                   .replace("cadence: monthly", "cadence: fortnightly"))
    with pytest.raises(SettingError, match="batch.cadence"):
        load_spec(bad)
    monkeypatch.setenv("MLP_ENV", "staging")
    from mlplatform.spec import environment
    with pytest.raises(SettingError, match="MLP_ENV"):
        environment()


def test_the_definitions_load_and_validate(lakefs, mlflow_uri, state):
    env = {k: v for k, v in __import__("os").environ.items()}
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "dagster"), "definitions", "validate",
                           "-f", "platform/definitions.py", "-d", "."], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Validation successful" in proc.stderr + proc.stdout


def test_the_definitions_hold_one_group_per_asset_and_the_publish_sensor(lakefs, mlflow_uri, state):
    defs = dg.Definitions.merge(_load_defs())
    graph = defs.resolve_asset_graph()
    assert len(graph.get_all_asset_keys()) >= 10  # the loop below covers the platform's whole graph
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.group_name and node.group_name != "default", key
        assert node.description, key
    assert {s.name for s in defs.sensors} >= {"publish_successful_runs", "keep_failed_run_branches",
                                              "car_loan__rollback_on_regression"}
    # The rollback sensor only requests runs: the job that acts is part of the definitions.
    assert defs.get_job_def("car_loan__rollback_champion").graph.node_names() == ["car_loan__roll_back_champion"]


def _load_defs() -> dg.Definitions:
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlp_definitions", ROOT / "platform" / "definitions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.defs


def test_pruning_keeps_the_branch_of_a_failed_run_that_dagster_will_retry(lakefs, instance):
    failed = run([numbers], lakefs, instance, {"numbers": {"config": {"fail_check": True}}}, raise_on_error=False)
    retried = run([numbers], lakefs, instance, {"numbers": {"config": {"fail_check": True}}}, raise_on_error=False)
    # The daemon marks a run it is about to re-execute; its resumed retry branches from this branch.
    instance.add_run_tags(retried.run_id, {"dagster/will_retry": "true"})
    result = prune_branches(instance, lakefs, older_than_days=0, dry_run=False)
    assert result.pruned == [run_branch(failed.run_id)]
    assert lakefs.branch_exists(run_branch(retried.run_id))
    assert "retry" in result.kept[run_branch(retried.run_id)]
