"""A promotion's serving compile is bounded (mlplatform/serving/models.py compile_at_promotion): a publish waits
for it `wait_seconds` at most, and in the demo's background mode not at all, the process then waiting for it
before it ends."""

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


@pytest.fixture
def slow_compile(monkeypatch):
    """compile_version replaced by one that waits for `release`; `finished` lists the versions it compiled."""
    release, finished = threading.Event(), []

    def slow(tracking, version):
        release.wait(10)
        finished.append(version)
        return "compiled"

    monkeypatch.setattr(serving_models, "compile_version", slow)
    return release, finished


def test_a_slow_compile_does_not_hold_the_publish_beyond_its_bound(slow_compile):
    release, finished = slow_compile
    start = time.monotonic()
    detail = serving_models.compile_at_promotion(None, "4", wait_seconds=0.3)
    assert time.monotonic() - start < 2
    assert detail == "still compiling for serving after 0.3s (continues in the background)"
    release.set()  # the compile goes on and finishes on its own thread
    assert serving_models.wait_for_promotion_compiles(timeout=10) == 0
    assert finished == ["4"]


def test_in_background_a_publish_does_not_wait_and_the_process_waits_for_the_compile(slow_compile, background):
    release, finished = slow_compile
    start = time.monotonic()
    detail = serving_models.compile_at_promotion(None, "7", wait_seconds=30.0)
    assert time.monotonic() - start < 1
    assert detail == "still compiling for serving after 0s (continues in the background)"
    assert serving_models.wait_for_promotion_compiles(timeout=0.2) == 1  # still running
    release.set()
    assert serving_models.wait_for_promotion_compiles(timeout=10) == 0
    assert finished == ["7"]
