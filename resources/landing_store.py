"""The landing zone as an object-store prefix (MLP_LANDING_URL=lakefs://<repository>/<branch>/<prefix>): the
same resource as the folder's (`LandingZoneResource`: arrivals, settle time, retries), whose zone is a
`mlplatform.landing_store.ObjectStoreLanding` mirrored into `root`. Chosen by the resource factory
(resources/environment.py) when the setting is given; the folder otherwise."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from mlplatform.landing_store import LakeFSPrefixStore, ObjectStoreLanding, parse_landing_url
from resources.lakefs import LakeFSResource
from resources.landing import LandingZoneResource


class ObjectStoreLandingZoneResource(LandingZoneResource):
    """Batches and labels arrive as objects under `url` on the lakeFS server of `lakefs`; `root` is the local
    mirror the platform reads them from."""

    url: str = Field(description="lakefs://<repository>/<branch>/<prefix> (setting MLP_LANDING_URL)")
    lakefs: LakeFSResource

    def zone(self, spec=None) -> ObjectStoreLanding:
        """A data set's zone: objects under `<prefix>/<data set>`, mirrored into `<root>/<data set>` (without a
        spec: `<prefix>` into `root`)."""
        repository, branch, prefix = parse_landing_url(self.url)
        if spec is not None:
            prefix = f"{prefix}{spec.name}/"  # parse_landing_url's prefix ends in '/' or is empty
        self._ensure_repository(repository, branch)
        store = LakeFSPrefixStore(self.lakefs.client, repository, branch)
        return ObjectStoreLanding(self.folder(spec), settle_seconds=self.settle_seconds, store=store, prefix=prefix)

    def _ensure_repository(self, repository: str, branch: str) -> None:
        """The landing repository, created on first use next to the data repository's storage namespace."""
        import lakefs

        ns = self.lakefs.storage_namespace
        namespace = f"{ns.rstrip('/').rsplit('/', 1)[0]}/{repository}" if "/" in ns.split("://", 1)[-1] \
            else f"local://{repository}"
        repo = lakefs.Repository(repository, client=self.lakefs.client)
        self.lakefs.call("create landing repository", lambda: repo.create(
            storage_namespace=namespace, default_branch=branch, exist_ok=True))


__all__ = ["ObjectStoreLandingZoneResource"]
