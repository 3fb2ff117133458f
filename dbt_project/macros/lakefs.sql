{#- A raw table on the run's lakeFS ref, read through the S3 gateway; an empty typed relation if absent. -#}
{% macro lakefs_table(name, empty_columns) -%}
  {%- set url = var('tables')[name] -%}
  {%- if url -%}
    read_parquet('{{ url }}', union_by_name = true)
  {%- else -%}
    (select {% for col, typ in empty_columns.items() %}cast(null as {{ typ }}) as "{{ col }}"{% if not loop.last %}, {% endif %}{% endfor %} where false)
  {%- endif -%}
{%- endmacro %}

{#- DuckDB type of a spec feature type. -#}
{% macro sql_type(feature_type) -%}
  {%- if feature_type == 'numeric' -%}double{%- elif feature_type == 'boolean' -%}boolean{%- else -%}varchar{%- endif -%}
{%- endmacro %}

{#- Columns of a raw records table, typed by the spec. -#}
{% macro record_columns() -%}
  cast("{{ var('id_column') }}" as bigint) as "{{ var('id_column') }}",
  cast("{{ var('time_column') }}" as timestamp) as "{{ var('time_column') }}"
  {%- for f in var('features') %},
  cast("{{ f.name }}" as {{ sql_type(f.type) }}) as "{{ f.name }}"
  {%- endfor %}
{%- endmacro %}

{#- The empty shape of raw records, for a ref with no production batch yet. -#}
{% macro record_shape() -%}
  {%- set cols = {var('id_column'): 'bigint', var('time_column'): 'timestamp', '_source_file': 'varchar'} -%}
  {%- for f in var('features') -%}{%- do cols.update({f.name: sql_type(f.type)}) -%}{%- endfor -%}
  {{ return(cols) }}
{%- endmacro %}

{#- Row-level engineered features, defined once in the data-set spec; serving runs the same SQL. -#}
{% macro engineered_features() -%}
  {%- for f in var('engineered') %},
  {{ f.expression }} as "{{ f.name }}"
  {%- endfor %}
{%- endmacro %}

{#- The feature SELECT over a staged records relation: one row per record, the spec's features plus the
    engineered ones. The one definition used by `features` (per batch) and `reference_features` (history). -#}
{% macro feature_select(relation) -%}
select
    "{{ var('id_column') }}",
    "{{ var('time_column') }}",
    origin
    {%- for f in var('features') %},
    "{{ f.name }}"
    {%- endfor %}
    {{ engineered_features() }}
from {{ relation }}
{%- endmacro %}
