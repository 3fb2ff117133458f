-- Labels with the moment each became known: history at event time + delay, production when delivered.
-- A production label is only accepted for an id in its own batch's records (raw_labels), and ids are unique
-- across batches (raw_records), so the join on the id cannot hand one entity's label to another. Nothing is
-- de-duplicated here: a repeated id fails the blocking `unique` test rather than silently picking one label.
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
select * from history
union all by name
select * from production
