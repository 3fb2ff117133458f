"""Registered model versions as the server runs them: the Booster from MLflow, compiled with lleaves.

lleaves compiles the LightGBM model text to native code with LLVM, in double precision, so its output
equals Booster.predict (max |diff| ~1e-16, checked by tests/test_serving_models.py on the test split); ONNX
via onnxmltools only takes float32 inputs and thresholds for LightGBM, so it is not what answers: it is written
beside the version as the export for other runtimes (mlplatform/serving/export.py). The compiled object is stored as an MLflow artifact of the version's run
(`compiled/lleaves-<target>-<cpu>.o`, native code for that target and CPU): compiled once (at promotion by
`compile_version`, or by the first server that loads it) and downloaded by every later load. If lleaves is
unavailable or its check against the Booster fails, the Booster answers (single-threaded).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlplatform.tracking import Tracking

log = logging.getLogger(__name__)
COMPILED_DIR = "compiled"
MAX_ABS_DIFF = 1e-6


@dataclass
class ServedModel:
    version: str
    booster: Any
    compiled: Any = None                 # lleaves.Model, or None
    run_id: str = ""
    compiled_from: str = ""              # "artifact" | "compiled" | "" (Booster)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def runtime(self) -> str:
        return "lleaves" if self.compiled is not None else "lightgbm"

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        if self.compiled is not None:
            return self.compiled.predict(np.ascontiguousarray(matrix, dtype=np.float64), n_jobs=1)
        return self.booster.predict(matrix, num_threads=1)


def artifact_name() -> str:
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    cpu = llvm.get_host_cpu_name() or "generic"
    return f"lleaves-{llvm.get_process_triple()}-{cpu}.o"


def _compile(booster, workdir: Path, cache: Path):
    import lleaves

    model_file = workdir / "model.txt"
    booster.save_model(str(model_file))
    model = lleaves.Model(model_file=str(model_file))
    model.compile(cache=str(cache))
    return model


def check_compiled(compiled, booster, matrix: np.ndarray) -> float:
    """max |compiled - Booster.predict| on `matrix`."""
    return float(np.max(np.abs(compiled.predict(np.ascontiguousarray(matrix, dtype=np.float64), n_jobs=1)
                               - booster.predict(matrix, num_threads=1)))) if len(matrix) else 0.0


def _probe_matrix(booster, n: int = 256, seed: int = 0) -> np.ndarray:
    """Rows that walk every split of the model: values around each threshold, plus NaN."""
    rng = np.random.default_rng(seed)
    k = booster.num_feature()
    dump = booster.dump_model()
    thresholds: list[list[float]] = [[] for _ in range(k)]

    def walk(node):
        if "split_feature" in node:
            t = node.get("threshold")
            if isinstance(t, (int, float)):
                thresholds[node["split_feature"]].append(float(t))
            elif isinstance(t, str):
                thresholds[node["split_feature"]].extend(float(c) for c in t.split("||"))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in dump["tree_info"]:
        walk(tree["tree_structure"])
    m = np.empty((n, k))
    for j in range(k):
        ts = np.array(thresholds[j] or [0.0])
        pick = rng.choice(ts, n)
        m[:, j] = pick + rng.choice([-1e-9, 0.0, 1e-9, 1.0, -1.0], n)
    m[rng.random((n, k)) < 0.05] = np.nan
    return m


def load_version(tracking: Tracking, version: str, compile: bool = True) -> ServedModel:
    """A registered version with its compiled form (downloaded, or compiled now and stored)."""
    from mlplatform import registry

    booster = registry.load_booster(tracking, str(version))
    mv = tracking.client().get_model_version(tracking.model_name, str(version))
    served = ServedModel(str(version), booster, run_id=mv.run_id or "")
    if compile:
        try:
            served.compiled, served.compiled_from = _compiled_for(tracking, served)
        except Exception as exc:  # noqa: BLE001 - serving falls back to the Booster, and says so
            log.warning("v%s: lleaves compilation unavailable (%s: %s); the Booster answers",
                        version, type(exc).__name__, exc)
    return served


def _compiled_for(tracking: Tracking, served: ServedModel):
    client = tracking.client()
    name = artifact_name()
    with tempfile.TemporaryDirectory(prefix="mlp-lleaves-") as tmp:
        workdir = Path(tmp)
        cache = workdir / name
        source = "compiled"
        if served.run_id:
            try:
                got = client.download_artifacts(served.run_id, f"{COMPILED_DIR}/{name}", str(workdir / "dl"))
                cache = Path(got)
                source = "artifact"
            except Exception:  # noqa: BLE001 - not compiled yet for this target: compile it below
                cache = workdir / name
        model = _compile(served.booster, workdir, cache)
        diff = check_compiled(model, served.booster, _probe_matrix(served.booster))
        if diff > MAX_ABS_DIFF:
            raise RuntimeError(f"compiled model differs from Booster.predict by {diff:.3g} > {MAX_ABS_DIFF}")
        if source == "compiled" and served.run_id:
            try:
                client.log_artifact(served.run_id, str(cache), COMPILED_DIR)
            except Exception as exc:  # noqa: BLE001 - the next load compiles again; serving is unaffected
                log.warning("v%s: could not store %s on run %s: %s", served.version, name, served.run_id, exc)
        return model, source


def compile_version(tracking: Tracking, version: str) -> str:
    """Compile a registered version and store the object beside the model (call at promotion); returns how."""
    return load_version(tracking, version, compile=True).compiled_from or "booster"


_BACKGROUND: list[threading.Thread] = []  # promotion compiles started by this process
_IN_BACKGROUND = threading.Event()


def compile_promotions_in_background() -> None:
    """For a process that goes on working after its publishes (the demo): a promotion's compile no longer holds
    the publish (`wait_seconds` becomes 0), it runs beside the work that follows; call
    `wait_for_promotion_compiles` before the process ends, so the compiled form is stored."""
    _IN_BACKGROUND.set()


def wait_for_promotion_compiles(timeout: float | None = None) -> int:
    """Join the promotion compiles this process started; returns how many are still running after `timeout`."""
    for thread in list(_BACKGROUND):
        thread.join(timeout)
    _BACKGROUND[:] = [t for t in _BACKGROUND if t.is_alive()]
    return len(_BACKGROUND)


def compile_at_promotion(tracking: Tracking, version: str, wait_seconds: float = 30.0, log=log) -> str:
    """`compile_version` for a publish: never raises, and returns after `wait_seconds` at most (a longer compile
    goes on in a daemon thread; if the process ends first, the server compiles on its first load). Returns
    what happened, for the publish's detail. After `compile_promotions_in_background()`, it does not wait."""
    done: dict = {}
    if _IN_BACKGROUND.is_set():
        wait_seconds = 0.0

    def work():
        try:
            done["how"] = compile_version(tracking, version)
        except Exception as exc:  # noqa: BLE001 - reported; serving compiles on its first load
            done["error"] = exc
            log.warning(f"v{version}: not compiled for serving ({type(exc).__name__}: {exc})")
        try:  # the export for other runtimes (mlplatform/serving/export.py); ours never answers with it
            from mlplatform.serving.export import export_version

            done["onnx"] = export_version(tracking, version)["max_abs_diff_vs_booster"]
        except Exception as exc:  # noqa: BLE001 - reported; the version is served without it
            done["onnx_error"] = exc
            log.warning(f"v{version}: no ONNX export ({type(exc).__name__}: {exc})")

    thread = threading.Thread(target=work, name=f"compile-v{version}", daemon=True)
    thread.start()
    _BACKGROUND.append(thread)
    thread.join(wait_seconds)
    onnx = (f"; ONNX export written (max |diff| vs Booster {done['onnx']:.2g})" if "onnx" in done else
            f"; no ONNX export ({type(done['onnx_error']).__name__})" if "onnx_error" in done else "")
    if "how" in done:
        return f"compiled for serving ({done['how']}){onnx}"
    if "error" in done:
        return f"not compiled for serving ({type(done['error']).__name__}){onnx}"
    return f"still compiling for serving after {wait_seconds:g}s (continues in the background)"
