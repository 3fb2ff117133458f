"""Shadow scoring off the response path: requests are queued (O(1)) and a background thread scores them
in batches, one predict per model per batch, then logs the results. Batching keeps the shadow thread's
share of the interpreter lock small and rare, and it yields the lock between the batch's requests, so a
request arriving meanwhile waits for one request's logging at most, not the whole batch; a full queue
drops shadow work (counted), never delays a response."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


class ShadowScorer:
    def __init__(self, on_scored: Callable, interval: float = 0.05, max_queue: int = 10_000):
        self.on_scored, self.interval, self.max_queue = on_scored, interval, max_queue
        self._jobs: collections.deque = collections.deque()
        self._stop = threading.Event()
        self.skipped = self.scored = self.failed = 0
        self._thread = threading.Thread(target=self._run, name="shadow-scorer", daemon=True)
        self._thread.start()

    def submit(self, model, prepared, request_id: str, alias: str, mode: str, now) -> bool:
        if len(self._jobs) >= self.max_queue:
            self.skipped += len(prepared.raw)
            return False
        self._jobs.append((model, prepared, request_id, alias, mode, now))
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.drain()
        self.drain()

    def drain(self) -> None:
        jobs = []
        while self._jobs:
            try:
                jobs.append(self._jobs.popleft())
            except IndexError:
                break
        by_model: dict[int, list] = collections.defaultdict(list)
        for job in jobs:
            by_model[id(job[0])].append(job)
        for group in by_model.values():
            model = group[0][0]
            try:
                t0 = time.perf_counter()
                preds = model.predict(np.vstack([j[1].matrix for j in group]))
                per_row_ms = (time.perf_counter() - t0) * 1000 / max(len(preds), 1)
                start = 0
                for _, prepared, request_id, alias, mode, now in group:
                    time.sleep(0)  # hand the interpreter lock to a request waiting for it, between jobs
                    n = len(prepared.raw)
                    self.on_scored(model, prepared, preds[start:start + n], request_id, alias, mode, now,
                                   per_row_ms * n)
                    start += n
                self.scored += len(preds)
            except Exception:  # noqa: BLE001 - a shadow failure never reaches a client
                self.failed += len(group)
                log.exception("shadow scoring by v%s failed", model.version)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
