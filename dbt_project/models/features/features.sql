-- One production batch's features: one row per record, the spec's features plus the engineered ones
-- (feature_select: the same SQL as reference_features and as serving).
{{ feature_select(ref('stg_records')) }}
