"""Dagster resources of the platform; `resources.environment.build_resources` picks them per environment."""
