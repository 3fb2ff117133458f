"""Online serving: a REST model server (FastAPI on uvicorn) for the data set's champion and challenger.

The library side of serving: request validation and the missing-feature policies built from the spec
(`validation`), the spec's engineered-feature SQL compiled to a row-level fast path (`expressions`), models
loaded from MLflow by alias and compiled to a fast single-row form (`models`), routing (`routing`), the
prediction log (`predlog`) and the ASGI app (`app`). No Dagster here; heavy libraries are imported inside
functions. `make serve` starts it (python -m mlplatform.serving).
"""
