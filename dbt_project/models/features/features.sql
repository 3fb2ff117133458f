-- One row per record: the spec's features plus the engineered ones (the same SQL serving runs).
select
    "{{ var('id_column') }}",
    "{{ var('time_column') }}",
    origin
    {%- for f in var('features') %},
    "{{ f.name }}"
    {%- endfor %}
    {{ engineered_features() }}
from {{ ref('stg_records') }}
