-- Every record (history and production), typed by the spec. An id names one entity: raw_records rejects
-- records reusing an id already published in another batch or in the history (blocking check
-- ids_unique_across_batches), so nothing is de-duplicated here; should a repeat ever get through (e.g. two
-- batches ingested concurrently), the blocking `unique` test on the id fails instead of silently keeping one.
-- depends_on: {{ source('lakefs', 'reference_data') }} {{ source('lakefs', 'raw_records') }}
with history as (
    select {{ record_columns() }}, 'reference' as origin, cast(null as varchar) as source_file
    from {{ lakefs_table('reference_data', {}) }}
),
production as (
    select {{ record_columns() }}, 'production' as origin, "_source_file" as source_file
    from {{ lakefs_table('raw_records', record_shape()) }}
)
select * from history
union all by name
select * from production
