"""Compilation at promotion, against real lakeFS and MLflow: publishing a run whose gate said promote stores the
version's compiled (lleaves) form beside its Booster, and a compiler failure never fails the publish or the
promotion (the server compiles on its first load instead)."""

import pytest

from mlplatform import registry
from mlplatform.serving import models as serving_models
from resources.publish import publish_run

from .test_models import base_ts, mlflow_res, spec, train  # noqa: F401 - fixtures and helpers

pytestmark = pytest.mark.services
WEAK = {"num_boost_round": 8, "num_leaves": 3, "learning_rate": 0.1}


def compiled_artifacts(m, version: str) -> list[str]:
    run_id = m.client().get_model_version(m.model_name, version).run_id
    return [a.path for a in m.client().list_artifacts(run_id, serving_models.COMPILED_DIR)]


def test_a_promoted_version_is_compiled_and_exported_to_onnx_beside_the_model(spec, base_ts, lakefs, state,
                                                                              instance, mlflow_uri):
    m = mlflow_res(spec, mlflow_uri)
    result = train(spec, base_ts, lakefs, state, instance, mlflow_uri, **WEAK)
    outcome = publish_run(instance, lakefs, result.run_id, m)
    assert outcome.status == "published" and "compiled for serving (compiled)" in outcome.detail, outcome.detail
    assert registry.aliases(m) == {"champion": "1"}
    assert compiled_artifacts(m, "1") == [f"{serving_models.COMPILED_DIR}/{serving_models.artifact_name()}"]
    # the server then downloads it instead of compiling
    assert serving_models.load_version(m.tracking(), "1").compiled_from == "artifact"
    # the ONNX export for other runtimes, with its measured difference, and it answers like the Booster
    import json
    import tempfile
    from pathlib import Path

    from mlplatform import modeling
    from mlplatform.serving import export

    assert "ONNX export written" in outcome.detail, outcome.detail
    run_id = m.client().get_model_version(m.model_name, "1").run_id
    assert sorted(a.path for a in m.client().list_artifacts(run_id, export.EXPORT_DIR)) == [
        f"{export.EXPORT_DIR}/{export.MANIFEST_FILE}", f"{export.EXPORT_DIR}/{export.ONNX_FILE}"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(m.client().download_artifacts(run_id, export.EXPORT_DIR, tmp))
        manifest = json.loads((folder / export.MANIFEST_FILE).read_text())
        onnx_bytes = (folder / export.ONNX_FILE).read_bytes()
    booster = registry.load_booster(m.tracking(), "1")
    assert manifest["features"] == booster.feature_name() and manifest["objective"] == "binary"
    tag = m.client().get_model_version(m.model_name, "1").tags[export.DIFF_TAG]
    assert float(tag) == pytest.approx(manifest["max_abs_diff_vs_booster"], rel=1e-2) and float(tag) <= 1e-5
    test_rows = modeling.feature_matrix(base_ts.filter(base_ts["split"] == "test"), spec)
    assert export.differences(onnx_bytes, booster, test_rows.to_numpy(dtype=float))[0] <= 1e-5


def test_a_failed_compile_never_fails_the_publish_or_the_promotion(spec, base_ts, lakefs, state, instance,
                                                                   mlflow_uri, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("LLVM is not available")

    monkeypatch.setattr(serving_models, "compile_version", broken)  # a fault drill: the compiler fails
    m = mlflow_res(spec, mlflow_uri)
    result = train(spec, base_ts, lakefs, state, instance, mlflow_uri, **WEAK)
    outcome = publish_run(instance, lakefs, result.run_id, m)
    assert outcome.status == "published" and not outcome.promotion_pending
    assert "not compiled for serving (RuntimeError)" in outcome.detail
    assert registry.aliases(m) == {"champion": "1"}
    assert compiled_artifacts(m, "1") == []
