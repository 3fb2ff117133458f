"""The landing zone as a resource (a folder locally)."""


from pathlib import Path

import dagster as dg

from mlplatform.batches import Landing


class LandingZoneResource(dg.ConfigurableResource):
    """Where production batches and delayed labels arrive before ingestion."""

    root: str

    def zone(self) -> Landing:
        return Landing(Path(self.root))
