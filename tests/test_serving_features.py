"""Online features: the spec's engineered-feature SQL compiled for request rows gives the batch values.

The batch side is the SQL dbt's `features` model runs (dbt_project/models/features/features.sql): raw
columns cast as `record_columns()` casts them (numeric -> double, categorical -> varchar, boolean -> boolean),
then each spec expression, in DuckDB."""

import math

import numpy as np
import polars as pl
import pytest

from mlplatform.serving.expressions import NotCompilable, OnlineFeatures, compile_expression
from mlplatform.serving.settings import ServingSettings
from mlplatform.serving.validation import RowValidator
from mlplatform.spec import load_spec
from mlplatform import modeling

SQL_TYPES = {"numeric": "double", "categorical": "varchar", "boolean": "boolean"}


def batch_features(spec, rows: pl.DataFrame) -> pl.DataFrame:
    """dbt's path: typed raw columns, then the spec's expressions, in DuckDB."""
    import duckdb

    con = duckdb.connect()
    con.register("raw_rows", rows.to_arrow())
    typed = ", ".join(f'cast("{f.name}" as {SQL_TYPES[f.type]}) as "{f.name}"' for f in spec.features)
    exprs = ", ".join(f'{f.expression} as "{f.name}"' for f in spec.engineered_features)
    return con.execute(f"select {exprs} from (select {typed} from raw_rows)").pl()


def production_rows(spec, n: int) -> pl.DataFrame:
    _, production, _ = spec.load_source()
    return pl.from_pandas(production).select(spec.feature_names).head(n)


@pytest.mark.parametrize("name", ["car_loan", "car_price"])
def test_compiled_features_equal_the_batch_sql_on_production_rows(name):
    spec = load_spec(name)
    rows = production_rows(spec, 5000)
    online = OnlineFeatures(spec)
    assert not online.fallback, "every expression of the shipped specs compiles (no DuckDB on the request path)"
    got = np.array(online.compute(rows.to_dicts()), dtype=np.float64)
    want = batch_features(spec, rows).to_numpy().astype(np.float64)
    assert got.shape == want.shape == (5000, len(spec.engineered_features))
    same_nan = np.isnan(got) == np.isnan(want)
    assert same_nan.all()
    assert np.nanmax(np.abs(got - want)) == 0.0


def test_edge_values_follow_duckdb_semantics():
    spec = load_spec("car_loan")
    edge = []
    for dp in ["0%", "10%", "40%", "50%", "12.5%", " 7% ", None]:
        for car in [0.0, 1.0, 12345.678, 999999.0, None]:
            for loan in [0.0, 1.0, 36.0, None]:
                for tenure in [0.0, 2.5, None]:
                    edge.append({"car_value": car, "salary_range": "20K - 40K €", "debt_to_income_ratio": 0.3,
                                 "loan_length": loan, "repaid_loan_on_prev_car": True, "size_of_downpayment": dp,
                                 "driver_tenure": tenure})
    df = pl.DataFrame(edge, schema={f.name: {"numeric": pl.Float64, "categorical": pl.String,
                                             "boolean": pl.Boolean}[f.type] for f in spec.features})
    got = np.array(OnlineFeatures(spec).compute(df.to_dicts()), dtype=np.float64)
    want = batch_features(spec, df).to_numpy().astype(np.float64)
    assert (np.isnan(got) == np.isnan(want)).all()
    finite = ~np.isnan(want)
    assert (got[finite] == want[finite]).all()  # includes ±inf from x / 0


@pytest.mark.parametrize("sql,row,want", [
    ("greatest(a, 1)", {"a": None}, 1), ("greatest(a, 1)", {"a": math.nan}, math.nan),
    ("least(a, 1)", {"a": math.nan}, 1), ("nullif(a, 0)", {"a": 0.0}, None), ("-a * 2 + 1", {"a": 3.0}, -5.0),
    ("a / 0", {"a": -2.0}, -math.inf), ("(a + 1) / 2", {"a": None}, None), ("5 / 2", {}, 2.5),
])
def test_compiled_expressions_match_duckdb(sql, row, want):
    import duckdb

    got = compile_expression(sql, {"a"})(row)
    a = row.get("a")
    (duck,) = duckdb.connect().execute(f"select {sql} from (select cast(? as double) as a)", [a]).fetchone()
    for value in (got, want):
        if duck is None:
            assert value is None
        elif math.isnan(duck):
            assert math.isnan(value)
        else:
            assert value == duck


@pytest.mark.parametrize("sql", ["case when a > 1 then 1 else 0 end", "ln(a)", "cast(a as float)", "a % 2"])
def test_sql_outside_the_compiled_subset_is_refused_not_guessed(sql):
    with pytest.raises(NotCompilable):
        compile_expression(sql, {"a"})


def test_an_uncompilable_expression_runs_in_one_duckdb_connection_per_thread(tmp_path):
    import dataclasses
    from mlplatform.spec import EngineeredFeature

    spec = load_spec("car_loan")
    spec = dataclasses.replace(spec, engineered_features=spec.engineered_features + (
        EngineeredFeature(name="long_loan", expression="case when loan_length > 48 then 1.0 else 0.0 end"),))
    online = OnlineFeatures(spec)
    assert [f.name for f in online.fallback] == ["long_loan"]
    rows = production_rows(spec, 1000)
    got = np.array(online.compute(rows.to_dicts()), dtype=np.float64)
    first = online._duckdb()
    online.compute(rows.head(3).to_dicts())
    assert online._duckdb() is first  # no new connection per call
    want = batch_features(spec, rows).to_numpy().astype(np.float64)
    assert np.nanmax(np.abs(got - want)) == 0.0


def test_the_request_vector_equals_the_batch_feature_matrix():
    spec = load_spec("car_loan")
    rows = production_rows(spec, 2000)
    prepared = RowValidator(spec, ServingSettings()).prepare(rows.to_dicts())
    batch = pl.concat([rows, batch_features(spec, rows)], how="horizontal")
    want = modeling.feature_matrix(batch, spec).to_numpy().astype(np.float64)
    assert (np.isnan(prepared.matrix) == np.isnan(want)).all()
    assert np.nanmax(np.abs(prepared.matrix - want)) == 0.0
