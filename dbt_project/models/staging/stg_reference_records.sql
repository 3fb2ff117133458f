-- The history (reference) records, typed by the spec. Unpartitioned: rebuilt only when reference data changes.
-- depends_on: {{ source('lakefs', 'reference_data') }}
select {{ record_columns() }}, 'reference' as origin, cast(null as varchar) as source_file
from {{ lakefs_table('reference_data', {}) }}
