-- History labels with the moment each became known: event time + the spec's label delay.
-- depends_on: {{ source('lakefs', 'reference_data') }}
select cast("{{ var('id_column') }}" as bigint) as "{{ var('id_column') }}",
       cast("{{ var('target') }}" as double) as label,
       cast("{{ var('time_column') }}" as timestamp) + to_days({{ var('label_delay_days') }}) as label_available_at,
       'reference' as origin
from {{ lakefs_table('reference_data', {}) }}
