"""Which model answers a request: champion only, a canary share to the challenger, or A/B variants with
weights; optionally a shadow (the challenger scored off the response path, only logged); a kill switch
sends everything back to the champion.

The effective routing is the spec's `serving.routing`, updated by the routing file (YAML or JSON with the
same keys), updated by the registered model's MLflow tags `serving.mode`, `serving.canary_percent`,
`serving.shadow`, `serving.kill_switch`, `serving.variants` (JSON). Sticky assignment: an entity id (or the
`x-entity-id` header) is hashed (BLAKE2b) into one of 10,000 buckets, so the same id always gets the same
variant for the same setting, and raising the canary share only moves ids towards the challenger.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlplatform.serving.settings import RoutingSettings
from mlplatform.spec import SettingError

BUCKETS = 10_000
CHAMPION, CHALLENGER = "champion", "challenger"
TAG_PREFIX = "serving."


def bucket(key: Any, salt: str = "") -> int:
    """A stable bucket in [0, 10000) for an entity id (same id -> same bucket, in every process)."""
    digest = hashlib.blake2b(f"{salt}{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


@dataclass(frozen=True)
class Decision:
    variant: str              # the alias that answers
    shadow: str | None        # an alias scored in the background, or None


class Router:
    def __init__(self, routing: RoutingSettings, available: set[str]):
        self.routing, self.available = routing, available
        weights = {a: w for a, w in sorted(routing.variants.items()) if a in available and w > 0}
        total = sum(weights.values())
        self.cumulative: list[tuple[int, str]] = []
        acc = 0.0
        for alias, w in weights.items():
            acc += w / total * BUCKETS if total else 0
            self.cumulative.append((round(acc), alias))

    @property
    def mode(self) -> str:
        if self.routing.kill_switch:
            return "kill_switch"
        return self.routing.mode

    def decide(self, key: Any) -> Decision:
        r = self.routing
        if r.kill_switch or CHAMPION not in self.available:
            return Decision(CHAMPION, None)
        variant = CHAMPION
        if r.mode == "canary" and CHALLENGER in self.available and r.canary_percent > 0:
            if bucket(key) < r.canary_percent * (BUCKETS / 100):
                variant = CHALLENGER
        elif r.mode == "ab" and self.cumulative:
            b = bucket(key)
            variant = next((a for edge, a in self.cumulative if b < edge), self.cumulative[-1][1])
        shadow = CHALLENGER if (r.shadow and variant != CHALLENGER and CHALLENGER in self.available) else None
        return Decision(variant, shadow)

    def aliases_needed(self) -> set[str]:
        r = self.routing
        need = {CHAMPION}
        if r.kill_switch:
            return need
        if r.shadow or (r.mode == "canary" and r.canary_percent > 0):
            need.add(CHALLENGER)
        if r.mode == "ab":
            need |= {a for a, w in r.variants.items() if w > 0}
        return need


def read_routing_file(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingError(f"routing file {path}: cannot be read: {exc}") from None
    if not isinstance(raw, dict):
        raise SettingError(f"routing file {path}: expected a mapping of routing settings")
    return raw


def routing_from_tags(tags: dict[str, str]) -> dict:
    out: dict[str, Any] = {}
    for key, value in tags.items():
        if not key.startswith(TAG_PREFIX):
            continue
        name = key[len(TAG_PREFIX):]
        if name in ("shadow", "kill_switch"):
            out[name] = str(value).strip().lower() in ("1", "true", "yes", "on")
        elif name == "canary_percent":
            out[name] = float(value)
        elif name == "variants":
            out[name] = json.loads(value)
        elif name in ("mode", "sticky_header"):
            out[name] = value
    return out


def effective_routing(base: RoutingSettings, file_values: dict, tag_values: dict) -> RoutingSettings:
    """base < routing file < MLflow tags; invalid values raise SettingError naming where they came from."""
    from pydantic import ValidationError

    merged = base.model_dump()
    for where, values in (("routing file", file_values), ("MLflow tags serving.*", tag_values)):
        merged.update(values)
        try:
            RoutingSettings.model_validate(merged)
        except ValidationError as exc:
            raise SettingError(f"{where}: " + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    return RoutingSettings.model_validate(merged)
