-- Labels with the moment each became known: history at event time + delay, production when delivered.
-- depends_on: {{ source('lakefs', 'reference_data') }} {{ source('lakefs', 'raw_labels') }}
with history as (
    select cast("{{ var('id_column') }}" as bigint) as "{{ var('id_column') }}",
           cast("{{ var('target') }}" as double) as label,
           cast("{{ var('time_column') }}" as timestamp) + to_days({{ var('label_delay_days') }}) as label_available_at,
           'reference' as origin
    from {{ lakefs_table('reference_data', {}) }}
),
production as (
    select cast("{{ var('id_column') }}" as bigint) as "{{ var('id_column') }}",
           cast("{{ var('target') }}" as double) as label,
           cast(label_available_at as timestamp) as label_available_at,
           'production' as origin
    from {{ lakefs_table('raw_labels', {var('id_column'): 'bigint', var('target'): 'double', 'label_available_at': 'timestamp'}) }}
)
select *
from (select * from history union all by name select * from production)
qualify row_number() over (partition by "{{ var('id_column') }}" order by label_available_at asc) = 1
