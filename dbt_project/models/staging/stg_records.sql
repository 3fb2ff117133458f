-- Every record once (history and production), typed by the spec; the latest copy of a repeated id wins.
-- depends_on: {{ source('lakefs', 'reference_data') }} {{ source('lakefs', 'raw_records') }}
with history as (
    select {{ record_columns() }}, 'reference' as origin, cast(null as varchar) as source_file
    from {{ lakefs_table('reference_data', {}) }}
),
production as (
    select {{ record_columns() }}, 'production' as origin, "_source_file" as source_file
    from {{ lakefs_table('raw_records', record_shape()) }}
),
unioned as (
    select * from history
    union all by name
    select * from production
)
select *
from unioned
qualify row_number() over (partition by "{{ var('id_column') }}" order by "{{ var('time_column') }}" desc) = 1
