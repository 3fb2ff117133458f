"""Freshness SLAs: the definitions carry the spec's windows, and Dagster's freshness evaluation turns an
asset left stale past its window to FAIL."""

import os
import sys
import time

import dagster as dg
import pytest

from .conftest import ROOT
from .helpers import key  # the tests' data set: car_loan


def load_defs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlp_defs_fresh", ROOT / "platform" / "definitions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.defs


def test_the_definitions_carry_freshness_policies_and_automation(lakefs, mlflow_uri, state):
    graph = load_defs().resolve_asset_graph()
    for name in ("raw_records", "features", "batch_predictions", "candidate_model"):
        policy = graph.get(key(name)).freshness_policy
        assert isinstance(policy, dg.FreshnessPolicy), name
    assert graph.get(key("candidate_model")).freshness_policy.fail_window.to_timedelta().days == 30
    # The realized metric follows its labels by declarative automation; scoring and monitoring are requested by
    # the publish sensor once the batch is on main (one path per asset: tests/test_publication.py).
    assert graph.get(key("realized_performance")).automation_condition is not None
    for name in ("batch_predictions", "drift_report", "performance_estimate"):
        assert graph.get(key(name)).automation_condition is None, name


def test_an_asset_left_stale_past_its_window_turns_to_fail(lakefs, mlflow_uri, state, instance, tmp_path,
                                                           monkeypatch):
    from dagster._core.definitions.freshness import FreshnessState
    from dagster._core.test_utils import freeze_time
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import PythonFileTarget
    from dagster._daemon.freshness import FreshnessDaemon

    spec_text = (ROOT / "platform" / "datasets" / "car_loan.yaml").read_text()
    spec_text = spec_text.replace("features:         {warn: 36h, fail: 48h}", "features:         {warn: 1m, fail: 2m}")
    spec_path = tmp_path / "car_loan.yaml"
    spec_path.write_text(spec_text)
    monkeypatch.setenv("MLP_DATASET", str(spec_path))
    features = key("features")
    target = PythonFileTarget(python_file=str(ROOT / "platform" / "definitions.py"), attribute=None,
                              working_directory=str(ROOT), location_name="mlplatform")
    with WorkspaceProcessContext(instance, target) as ctx:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=features))
        now = time.time()

        def state_at(offset: float) -> FreshnessState:
            # Dagster's own clock moved forward: the asset is left alone for `offset` seconds.
            with freeze_time(now + offset):
                list(FreshnessDaemon().run_iteration(ctx))
            return instance.get_freshness_state_records([features])[features].freshness_state

        assert state_at(5) == FreshnessState.PASS
        assert state_at(90) == FreshnessState.WARN
        assert state_at(150) == FreshnessState.FAIL


def test_a_freshness_setting_naming_no_asset_is_an_error_naming_it(tmp_path, monkeypatch):
    from mlplatform.spec import SettingError

    text = (ROOT / "platform" / "datasets" / "car_loan.yaml").read_text()
    assert "  features:" in text
    bad = tmp_path / "car_loan.yaml"
    bad.write_text(text.replace("  features:", "  featurez:", 1))
    monkeypatch.setenv("MLP_DATASET", str(bad))
    with pytest.raises(SettingError, match=r"car_loan\.yaml: setting 'freshness' names \['featurez'\]"):
        load_defs()
