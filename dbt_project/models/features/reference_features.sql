-- The history's features: one row per reference record, through the same feature_select as each batch.
{{ feature_select(ref('stg_reference_records')) }}
