-- One production batch's records (the run's partition of raw_records only), typed by the spec. An id names
-- one entity: raw_records rejects records reusing an id already published in another batch or in the history
-- (blocking check ids_unique_across_batches), so nothing is de-duplicated here; the blocking `unique` test
-- guards the partition itself.
-- depends_on: {{ source('lakefs', 'raw_records') }}
select {{ record_columns() }}, 'production' as origin, "_source_file" as source_file
from {{ lakefs_table('raw_records', record_shape()) }}
