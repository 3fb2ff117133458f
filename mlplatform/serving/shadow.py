"""Shadow scoring off the response path.

ShadowProcess (what the server uses): each shadowed request is pickled and queued (O(1), ~10 us), a sender
thread writes the queue to a pipe every 50 ms, and a child process, started on the first shadowed request at a
lower CPU priority, loads the challenger's version itself, scores and logs the shadow rows. The server's process
does no shadow scoring or logging, so the champion's latency does not depend on the shadow.

ShadowScorer (what the child runs): requests are queued and a background thread scores them in batches, one
predict per model per batch, then logs the results, yielding the interpreter lock between the batch's requests.
A full queue drops shadow work (counted), never delays a response."""

from __future__ import annotations

import collections
import logging
import pickle
import struct
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from mlplatform.serving.predlog import take_all

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
        jobs = take_all(self._jobs)
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


# --- the shadow in its own process -------------------------------------------------------------------------
# In the server's process, shadow scoring and its logging competed with requests for the interpreter lock: with a
# shadow on, the champion's p99 rose by ~0.4 ms (bench_serving --only-shadow, quiet machine). Now the server only
# pickles each shadowed request (~10 us, on the request path) and a sender thread writes them to a pipe in
# batches (os.write releases the lock); a child process, started on the first shadowed request and run at a
# lower CPU priority, loads the version by itself, scores with a ShadowScorer and writes the shadow rows to the
# same prediction-log spool as the server. If the child dies, the sender says so and starts a new one (at most
# once per `restart_seconds`); the jobs in flight are counted as skipped, never retried into a response.

_FRAME = struct.Struct("<I")


class ShadowProcess:
    """ShadowScorer's interface (submit / close / scored / failed / skipped), scoring in a child process."""

    def __init__(self, spec, tracking, settings, log_dir, interval: float = 0.05, max_queue: int = 10_000,
                 restart_seconds: float = 5.0):
        import multiprocessing as mp

        self.spec, self.tracking, self.settings, self.log_dir = spec, tracking, settings, log_dir
        self.interval, self.max_queue, self.restart_seconds = interval, max_queue, restart_seconds
        self._ctx = mp.get_context("spawn")  # never fork a process that runs an event loop and threads
        self._counters = self._ctx.Array("q", 3, lock=False)  # scored, failed, skipped (child side)
        self._pending: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._proc = None
        self._conn = None
        self._last_start = 0.0
        self._skipped = 0
        self.restarts = 0
        self._thread = threading.Thread(target=self._run, name="shadow-sender", daemon=True)
        self._thread.start()

    @property
    def scored(self) -> int:
        return int(self._counters[0])

    @property
    def failed(self) -> int:
        return int(self._counters[1])

    @property
    def skipped(self) -> int:
        return self._skipped + int(self._counters[2])

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def submit(self, model, prepared, request_id: str, alias: str, mode: str, now) -> bool:
        if len(self._pending) >= self.max_queue:
            self._skipped += len(prepared.raw)
            return False
        self._pending.append((len(prepared.raw),
                              pickle.dumps((model.version, prepared, request_id, alias, mode, now), protocol=5)))
        return True

    def _spawn(self) -> bool:
        self._last_start = time.monotonic()  # also when starting fails: the next try waits restart_seconds
        recv, send = self._ctx.Pipe(duplex=False)
        try:
            proc = self._ctx.Process(target=_child_main, name="shadow-scorer", daemon=True,
                                     args=(recv, self.spec, self.tracking, self.settings, str(self.log_dir),
                                           self._counters, self.interval))
            proc.start()
        except Exception:  # noqa: BLE001 - no shadow process: its rows are counted as skipped, serving goes on
            log.exception("shadow scorer process could not be started; retrying in %.0fs", self.restart_seconds)
            recv.close()
            send.close()
            return False
        recv.close()
        self._proc, self._conn = proc, send
        return True

    def _alive(self) -> bool:
        if self._proc is not None and self._proc.is_alive():
            return True
        if self._proc is not None:
            log.warning("shadow scorer process %s ended (exit code %s); starting a new one",
                        self._proc.pid, self._proc.exitcode)
            self._close_conn()
            self._proc = None
            self.restarts += 1
        wait = self.restart_seconds - (time.monotonic() - self._last_start)
        if self._last_start and wait > 0:
            return False  # crash loop guard: jobs meanwhile are skipped
        return self._spawn()

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None

    def _send(self) -> None:
        jobs = take_all(self._pending)
        if not jobs:
            return
        rows = sum(n for n, _ in jobs)
        if not self._alive():
            self._skipped += rows
            return
        try:
            self._conn.send_bytes(b"".join(_FRAME.pack(len(b)) + b for _, b in jobs))
        except (OSError, ValueError) as exc:  # the child died mid-batch: counted, and restarted next time
            self._skipped += rows
            log.warning("shadow scorer process unreachable (%s: %s); %d row(s) skipped", type(exc).__name__, exc, rows)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._send()
            except Exception:  # noqa: BLE001 - the sender never dies: say why, and go on with the next batch
                log.exception("shadow sender: a batch could not be handed over")
        try:
            self._send()
            if self._conn is not None:
                self._conn.send_bytes(b"")  # end of stream (from this thread only): the child drains and exits
        except (OSError, ValueError):
            pass

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued, let the child score and log it, then stop it (a graceful shutdown loses nothing
        that was accepted, unless the child takes longer than `timeout`: then it is terminated)."""
        self._stop.set()
        end = time.monotonic() + timeout
        self._thread.join(timeout)
        if self._proc is None:
            return
        self._proc.join(max(0.1, end - time.monotonic()))
        if self._proc.is_alive():
            log.warning("shadow scorer process %s did not stop in %.0fs; terminated", self._proc.pid, timeout)
            self._proc.terminate()
            self._proc.join(5)
        self._close_conn()


def _child_main(conn, spec, tracking, settings, log_dir: str, counters, interval: float) -> None:
    """The shadow process: receive pickled jobs, score them per version, log the shadow rows."""
    import os

    from mlplatform.serving.models import load_version
    from mlplatform.serving.predlog import PredictionLog, rows_for_log

    try:
        os.nice(10)  # the server and its clients come first on a busy machine
    except OSError:
        pass
    plog = PredictionLog(spec, Path(log_dir), settings.log.batch_rows, settings.log.flush_seconds,
                         settings.log.queue_rows) if settings.log.enabled else None

    def on_scored(model, prepared, preds, request_id, alias, mode, now, latency_ms):
        if plog is not None:
            plog.add(rows_for_log(prepared, preds, request_id, alias, model.version, True, mode, latency_ms, spec,
                                  now))

    scorer = ShadowScorer(on_scored, interval=interval, max_queue=settings.log.queue_rows)
    models: collections.OrderedDict = collections.OrderedDict()
    refused: dict[str, float] = {}  # version -> when its load failed (retried after 30 s)

    def model_for(version: str):
        if version in models:
            models.move_to_end(version)
            return models[version]
        if time.monotonic() - refused.get(version, -1e9) < 30:
            return None
        try:
            models[version] = load_version(tracking, version, compile=settings.compile)
        except Exception:  # noqa: BLE001 - logged; this version's shadow jobs are failed, serving goes on
            log.exception("shadow: could not load %s v%s", tracking.model_name, version)
            refused[version] = time.monotonic()
            return None
        while len(models) > 4:
            models.popitem(last=False)
        return models[version]

    base = list(counters)  # a replacement process counts on from its predecessor's totals

    def sync():
        counters[0], counters[1], counters[2] = (base[0] + scorer.scored, base[1] + scorer.failed,
                                                 base[2] + scorer.skipped)

    try:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                break
            if not data:
                break
            view, pos = memoryview(data), 0
            while pos < len(view):
                (size,) = _FRAME.unpack_from(view, pos)
                version, prepared, request_id, alias, mode, now = pickle.loads(view[pos + 4:pos + 4 + size])
                pos += 4 + size
                model = model_for(version)
                if model is None:
                    scorer.failed += len(prepared.raw)
                    continue
                scorer.submit(model, prepared, request_id, alias, mode, now)
            sync()
    finally:
        scorer.close()
        if plog is not None:
            plog.close()
        sync()
