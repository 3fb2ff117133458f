"""Operator tooling: the `mlp` command line, the local services (lakeFS, MLflow), the demo and its data simulator.

It sits on top: it may import the Dagster layer (assets, resources, sensors) and the library (mlplatform);
nothing imports it but tests and benchmarks."""
