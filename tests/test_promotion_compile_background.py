"""The demo's promotion compiles run beside its next steps: a publish does not wait for them, and the process
waits for them before it ends (mlplatform/serving/models.py)."""

from __future__ import annotations

import threading
import time

import pytest

from mlplatform.serving import models as serving_models


@pytest.fixture
def background():
    serving_models.compile_promotions_in_background()
    yield
    serving_models._IN_BACKGROUND.clear()
    serving_models.wait_for_promotion_compiles(timeout=5)


def test_in_background_a_publish_does_not_wait_and_the_process_waits_for_the_compile(monkeypatch, background):
    release, finished = threading.Event(), []

    def slow(tracking, version):
        release.wait(10)
        finished.append(version)
        return "compiled"

    monkeypatch.setattr(serving_models, "compile_version", slow)
    start = time.monotonic()
    detail = serving_models.compile_at_promotion(None, "7", wait_seconds=30.0)
    assert time.monotonic() - start < 1
    assert detail == "still compiling for serving after 0s (continues in the background)"
    assert serving_models.wait_for_promotion_compiles(timeout=0.2) == 1  # still running
    release.set()
    assert serving_models.wait_for_promotion_compiles(timeout=10) == 0
    assert finished == ["7"]
