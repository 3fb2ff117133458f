"""The landing zone as a resource (a folder locally), with how arrivals in it are taken and retried."""


from pathlib import Path

import dagster as dg
from pydantic import Field

from mlplatform.batches import SETTLE_SECONDS, Landing


class LandingZoneResource(dg.ConfigurableResource):
    """Where production batches and delayed labels arrive before ingestion: `root` holds one folder per data set
    (`zone(spec)`: `<root>/<data set>`).

    A file is read only once complete: a `<file>.done` or `_SUCCESS` marker, or an mtime (hence size)
    unchanged for `settle_seconds` (see mlplatform/batches.py). The arrival sensor retries a failed
    ingestion of the same files at most `max_ingest_attempts` times, waiting `retry_backoff_seconds`,
    doubled after each failure, before the next attempt (defaults: 5 attempts over about 15 minutes,
    waiting 1, 2, 4 and 8 minutes). A changed or new file is a new delivery with its own attempts."""

    root: str
    settle_seconds: float = Field(default=SETTLE_SECONDS, ge=0,
                                  description="A file without a marker is taken once unchanged this long.")
    max_ingest_attempts: int = Field(default=5, ge=1,
                                     description="Runs tried for the same files before the sensor gives up.")
    retry_backoff_seconds: float = Field(default=60.0, ge=0,
                                         description="Wait after the first failed run; doubles per failure.")

    def folder(self, spec=None) -> Path:
        """The landing folder of a data set: `<root>/<data set>` (each data set lands in its own folder); without
        a spec, `root` itself (a zone given as one data set's folder, e.g. by a test)."""
        return Path(self.root) / spec.name if spec is not None else Path(self.root)

    def zone(self, spec=None) -> Landing:
        return Landing(self.folder(spec), settle_seconds=self.settle_seconds)
