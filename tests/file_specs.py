"""A data-set spec whose rows come from files (no Python loader), written into a test's folder."""

from __future__ import annotations

from pathlib import Path

import yaml

from mlplatform.spec import DatasetSpec, load_spec

FEATURES = [
    {"name": "car_age", "type": "numeric", "min": 0, "max": 50},
    {"name": "km_driven", "type": "numeric", "min": 0, "max": 1000000},
    {"name": "price_new", "type": "numeric", "min": 0, "max": 500000},
    {"name": "accident_count", "type": "numeric", "min": 0, "max": 50},
    {"name": "door_count", "type": "numeric", "min": 1, "max": 7},
    {"name": "fuel", "type": "categorical", "categories": ["diesel", "electric", "gas"]},
    {"name": "transmission", "type": "categorical", "categories": ["automatic", "manual"]},
]


def write_spec(folder: Path, source: dict, time_type: str = "datetime", name: str = "files_demo",
               cadence: str = "daily", start: str = "2017-02-17", end: str = "2017-02-20", **extra) -> DatasetSpec:
    """Write `<folder>/<name>.yaml` (car_price's columns, rows from `source`, the time column's storage declared
    as `time_column: {name:, type:}`) and load it."""
    raw = {
        "name": name, "description": "rows from files, no code",
        "source": source,
        "id_column": "id",
        "time_column": {"name": "timestamp", "type": time_type},
        "target": {"name": "y_true", "problem_type": "regression"},
        "features": FEATURES,
        "engineered_features": [{"name": "km_per_year", "expression": "km_driven / greatest(car_age, 1)"}],
        "label_delay_days": 0,
        "batch": {"cadence": cadence, "start": start, "end": end},
        "training": {"split": {"train": 0.6, "validation": 0.2, "test": 0.2}, "metric": "rmse",
                     "floor": 100000.0, "margin": 100000.0},
        "monitoring": {"estimated_metrics": ["rmse"], "min_chunk_rows": 50, "psi_bins": 10,
                       "drift_methods": ["psi", "jensen_shannon"]},
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = load_spec(path)
    assert spec.time_type == time_type
    return spec
