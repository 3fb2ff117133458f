"""A data set's batch periods as Dagster partitions, built from the library's cadence table
(mlplatform.batches: CRON, KEY_FORMAT), so the keys Dagster shows are the keys the library computes."""

from __future__ import annotations

import dagster as dg

from mlplatform.batches import CRON, KEY_FORMAT, _first, _parse_bound
from mlplatform.spec import DatasetSpec


def partitions_def(spec: DatasetSpec) -> dg.TimeWindowPartitionsDefinition:
    fmt = KEY_FORMAT[spec.cadence]
    start = _first(spec.cadence, _parse_bound(spec.batch_start)).strftime(fmt)
    end = _parse_bound(spec.batch_end).strftime(fmt) if spec.batch_end else None
    return dg.TimeWindowPartitionsDefinition(cron_schedule=CRON[spec.cadence], fmt=fmt, start=start, end=end)
