"""How well CBPE's label-free estimate tracks the realized ROC AUC on the car-loan production period.

The platform's way: a champion trained on the reference period (time split), CBPE fitted on its test-split
predictions, one estimate per monthly production batch, compared with the realized ROC AUC once labels exist.

    .venv/bin/python bench/bench_cbpe.py
"""

import json

from common import RESULTS, car_loan, quick_training_set

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from mlplatform import modeling  # noqa: E402
from mlplatform.batches import partition_of  # noqa: E402
from mlplatform.features import online_features  # noqa: E402


def main() -> None:
    import nannyml as nml

    spec = car_loan()
    reference, production, labels = spec.load_source()
    t = spec.time_column

    def feats(df):
        d = pl.from_pandas(df)
        d = d.with_columns(pl.col(t).str.to_datetime(time_unit="us"))
        return online_features(d.select(spec.raw_columns), spec).join(
            d.select(spec.id_column, *( [spec.target] if spec.target in d.columns else [])), on=spec.id_column)

    ref = quick_training_set(spec, n=len(reference))  # the whole reference, the platform's way
    trained = modeling.train(ref, spec, modeling.lgb_params(spec, {}, 42), 400, 30)
    test = ref.filter(pl.col("split") == "test")
    test = test.with_columns(pl.Series("prediction", modeling.predict(trained.booster, test, spec)))
    prod = feats(production).join(pl.from_pandas(labels), on=spec.id_column)
    prod = prod.with_columns(pl.Series("prediction", modeling.predict(trained.booster, prod, spec)))
    prod = prod.with_columns(pl.col(t).map_elements(lambda ts: partition_of(spec, ts), return_dtype=pl.String)
                             .alias("batch"))
    r = test.select(t, spec.target, "prediction").to_pandas()
    r["y_pred"] = (r["prediction"] >= 0.5).astype(int)
    rows = []
    for batch in sorted(prod["batch"].unique().to_list()):
        part = prod.filter(pl.col("batch") == batch)
        if part.height < 200:
            continue
        a = part.select(t, "prediction").to_pandas()
        a["y_pred"] = (a["prediction"] >= 0.5).astype(int)
        est = nml.CBPE(y_pred_proba="prediction", y_pred="y_pred", y_true=spec.target, timestamp_column_name=t,
                       metrics=["roc_auc"], chunk_size=len(a), problem_type="classification_binary")
        est.fit(r)
        e = est.estimate(a).filter(period="analysis").to_df()["roc_auc"]
        realized = modeling.metrics(part[spec.target].to_numpy(), part["prediction"].to_numpy(), spec)["roc_auc"]
        rows.append({"batch": batch, "rows": part.height, "estimated": float(e["value"].iloc[0]),
                     "realized": realized, "alert": bool(e["alert"].iloc[0])})
    mae = float(np.mean([abs(x["estimated"] - x["realized"]) for x in rows]))
    print(f"{'batch':<12}{'rows':>7}{'estimated':>11}{'realized':>10}{'abs err':>9}  alert")
    for x in rows:
        print(f"{x['batch']:<12}{x['rows']:>7}{x['estimated']:>11.4f}{x['realized']:>10.4f}"
              f"{abs(x['estimated'] - x['realized']):>9.4f}  {x['alert']}")
    print(f"mean absolute error of the CBPE estimate: {mae:.4f} over {len(rows)} batches "
          f"(champion test ROC AUC {modeling.metrics(test[spec.target].to_numpy(), test['prediction'].to_numpy(), spec)['roc_auc']:.4f})")
    out = RESULTS / "cbpe.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"batches": rows, "mae": mae}, indent=1))


if __name__ == "__main__":
    main()
