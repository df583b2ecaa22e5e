"""The record types and their Arrow schemas are one definition each."""

import dataclasses

from viscon_hub.records import GENERATION_COLUMNS, Generation


def test_generation_fields_and_schema_name_the_same_columns():
    # image_bytes aside: Generation.to_row leaves it out of the generation records.
    fields = [f.name for f in dataclasses.fields(Generation) if f.name != "image_bytes"]
    assert sorted(fields) == sorted(GENERATION_COLUMNS)
