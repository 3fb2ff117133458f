"""The ONNX export of a registered version: the model for runtimes other than ours (ONNX Runtime, Triton, a JVM
or browser runtime), stored at promotion as an MLflow artifact of the version's run, beside the Booster and the
lleaves object the server runs (mlplatform/serving/models.py).

onnxmltools converts a LightGBM model to ONNX-ML's TreeEnsemble operators, which compare float32 inputs with
float32 thresholds. A value that lies between a threshold and its float32 rounding takes the other branch, so
the export is close to Booster.predict, not equal to it: the difference is measured when the file is written,
on rows drawn across every feature's split range, and stored with it (`export/model.json` and the model
version's tag `onnx_max_abs_diff`). Our own server never answers with it; lleaves is exact (≤ 1e-6).

Layout on the run: `export/model.onnx` (input `input`, float32 [n, features] in the order of
`export/model.json`'s `features`; output `score`: the positive-class probability for a binary model, the
prediction for a regression) and `export/model.json` (features, objective, opset, measured difference).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mlplatform.tracking import Tracking

EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
MANIFEST_FILE = "model.json"
DIFF_TAG = "onnx_max_abs_diff"
TARGET_OPSET = 15


def to_onnx(booster) -> bytes:
    """The Booster as an ONNX model with one float32 input `input` and one output `score` (see module doc)."""
    import onnx
    from onnx import helper
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    n = booster.num_feature()
    model = convert_lightgbm(booster, initial_types=[("input", FloatTensorType([None, n]))], zipmap=False,
                             target_opset=TARGET_OPSET)
    graph = model.graph
    outputs = [o.name for o in graph.output]
    if binary(booster):
        # outputs: label, probabilities [n, 2]: expose the positive class as `score` [n]
        probs = outputs[-1]
        graph.initializer.append(helper.make_tensor("positive_index", onnx.TensorProto.INT64, [1], [1]))
        graph.node.append(helper.make_node("Gather", [probs, "positive_index"], ["score_2d"], axis=1))
    else:
        graph.node.append(helper.make_node("Identity", [outputs[0]], ["score_2d"]))
    graph.initializer.append(helper.make_tensor("flatten_shape", onnx.TensorProto.INT64, [1], [-1]))
    graph.node.append(helper.make_node("Reshape", ["score_2d", "flatten_shape"], ["score"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [None]))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def binary(booster) -> bool:
    return str(booster.params.get("objective", booster.dump_model().get("objective", ""))).startswith("binary")


def predict_onnx(onnx_bytes: bytes, matrix: np.ndarray) -> np.ndarray:
    """ONNX Runtime's `score` for `matrix` (float64 or float32 rows; NaN is missing)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(["score"], {"input": np.ascontiguousarray(matrix, dtype=np.float32)})[0]


def spread_rows(booster, n: int = 2000, seed: int = 0) -> np.ndarray:
    """Rows drawn uniformly across each numeric feature's range of split thresholds (and a little beyond), and
    from each categorical feature's split categories plus one unseen code; 5% NaN. Every split is exercised on
    both sides, without sitting on a threshold more often than data would."""
    rng = np.random.default_rng(seed)
    k = booster.num_feature()
    lo, hi = np.full(k, np.inf), np.full(k, -np.inf)
    categories: dict[int, set[float]] = {}

    def walk(node):
        if "split_feature" in node:
            j, t = node["split_feature"], node.get("threshold")
            if node.get("decision_type") == "==":
                categories.setdefault(j, set()).update(float(c) for c in str(t).split("||"))
            else:
                lo[j], hi[j] = min(lo[j], float(t)), max(hi[j], float(t))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in booster.dump_model()["tree_info"]:
        walk(tree["tree_structure"])
    lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 1.0)
    pad = 0.1 * (hi - lo) + 1e-3
    m = rng.uniform(lo - pad, hi + pad, size=(n, k))
    for j, seen in categories.items():
        codes = np.array(sorted(seen) + [max(seen) + 1.0])
        m[:, j] = rng.choice(codes, n)
    m[rng.random((n, k)) < 0.05] = np.nan
    return m


def differences(onnx_bytes: bytes, booster, matrix: np.ndarray) -> tuple[float, float]:
    """(max |onnx - booster|, max |onnx - booster| / max(|booster|, 1)) on `matrix`."""
    if not len(matrix):
        return 0.0, 0.0
    exact = booster.predict(matrix, num_threads=1)
    diff = np.abs(predict_onnx(onnx_bytes, matrix) - exact)
    return float(diff.max()), float((diff / np.maximum(np.abs(exact), 1.0)).max())


def export_version(tracking: Tracking, version: str, booster: Any = None) -> dict:
    """Write `export/model.onnx` and `export/model.json` on the version's run, and tag the version with the
    measured difference; returns the manifest."""
    from mlplatform import registry

    booster = booster if booster is not None else registry.load_booster(tracking, str(version))
    client = tracking.client()
    mv = client.get_model_version(tracking.model_name, str(version))
    if not mv.run_id:
        raise RuntimeError(f"{tracking.model_name} v{version} has no run to store its ONNX export on")
    data = to_onnx(booster)
    diff, relative = differences(data, booster, spread_rows(booster))
    manifest = {"format": "onnx", "file": f"{EXPORT_DIR}/{ONNX_FILE}", "input": "input", "output": "score",
                "dtype": "float32", "features": list(booster.feature_name()),
                "objective": "binary" if binary(booster) else "regression",
                "opset": TARGET_OPSET,
                "max_abs_diff_vs_booster": diff, "max_rel_diff_vs_booster": relative,
                "checked_on": "2000 rows drawn across every feature's split range, 5% missing"}
    with tempfile.TemporaryDirectory(prefix="mlp-onnx-") as tmp:
        (Path(tmp) / ONNX_FILE).write_bytes(data)
        (Path(tmp) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        client.log_artifact(mv.run_id, str(Path(tmp) / ONNX_FILE), EXPORT_DIR)
        client.log_artifact(mv.run_id, str(Path(tmp) / MANIFEST_FILE), EXPORT_DIR)
    client.set_model_version_tag(tracking.model_name, str(version), DIFF_TAG, f"{diff:.3g}")
    return manifest
