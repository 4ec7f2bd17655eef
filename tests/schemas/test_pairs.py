from __future__ import annotations

import pyarrow as pa
import pytest

from qvl.schemas import CURATED_PAIR, SchemaError, check_columns, validate_table


def test_check_columns_names_file_column_and_problem():
    schema = pa.schema([("url", pa.string()), ("text", pa.int32())])
    with pytest.raises(SchemaError, match=r"f.parquet: missing column\(s\) width; the file has: url, text"):
        check_columns(schema, {"url": "string", "width": "number"}, "f.parquet")
    with pytest.raises(SchemaError, match=r"f.parquet: column 'text' is int32, expected a string column"):
        check_columns(schema, {"url": "string", "text": "string"}, "f.parquet")
    check_columns(schema, {"url": "string"}, "f.parquet", optional={"text": "number", "height": "number"})


def test_validate_table_checks_types_and_nulls():
    table = pa.table({name: pa.nulls(1, CURATED_PAIR.field(name).type) for name in CURATED_PAIR.names})
    with pytest.raises(SchemaError, match="out.parquet: column 'row_id' has 1 null"):
        validate_table(table, CURATED_PAIR, "out.parquet")
    table = pa.table({name: pa.array([{"string": "x", "float": 0.5, "list<item: string>": []}.get(str(CURATED_PAIR.field(name).type), None)],
                                     CURATED_PAIR.field(name).type) for name in CURATED_PAIR.names})
    validate_table(table, CURATED_PAIR, "out.parquet")
    with pytest.raises(SchemaError, match="missing column 'lang'"):
        validate_table(table.drop(["lang"]), CURATED_PAIR, "out.parquet")
    with pytest.raises(SchemaError, match="column 'source' is int64, expected string"):
        validate_table(table.set_column(table.schema.get_field_index("source"), "source", pa.array([1])),
                       CURATED_PAIR, "out.parquet")
