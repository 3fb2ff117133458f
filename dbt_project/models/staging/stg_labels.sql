-- One production batch's labels (the run's partition of raw_labels), with the moment each was delivered.
-- A production label is only accepted for an id in its own batch's records (raw_labels), and ids are unique
-- across batches (raw_records), so the join on the id cannot hand one entity's label to another. Nothing is
-- de-duplicated here: a repeated id fails the blocking `unique` test rather than silently picking one label.
-- Empty (typed) while the batch's labels have not arrived.
-- depends_on: {{ source('lakefs', 'raw_labels') }}
select cast("{{ var('id_column') }}" as bigint) as "{{ var('id_column') }}",
       cast("{{ var('target') }}" as double) as label,
       cast(label_available_at as timestamp) as label_available_at,
       'production' as origin
from {{ lakefs_table('raw_labels', {var('id_column'): 'bigint', var('target'): 'double', 'label_available_at': 'timestamp'}) }}
