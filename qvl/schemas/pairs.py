"""Image-text pair tables: raw (as read, canonical names), curated (kept) and rejected.

Input layouts (LAION, DataComp, ...) are mapped onto the canonical raw columns by
``qvl.curate.sources.layouts``; every column not mapped is carried through unchanged, so the
schemas below name the columns qvl relies on, not every column a table may hold.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.types as pat

from qvl.errors import QvlError


class SchemaError(QvlError):
    """A table does not have the columns or types a room needs; the message says where."""


RAW_PAIR = pa.schema(
    [
        pa.field("url", pa.string(), nullable=True),
        pa.field("text", pa.string(), nullable=True),
        pa.field("width", pa.int64(), nullable=True),
        pa.field("height", pa.int64(), nullable=True),
        pa.field("clip_score", pa.float64(), nullable=True),
        # the probabilities some datasets publish with each pair (LAION, COYO): null when absent
        pa.field("nsfw", pa.float64(), nullable=True),
        pa.field("watermark", pa.float64(), nullable=True),
        pa.field("aesthetic", pa.float64(), nullable=True),
        # the scores whose column the input had but held no finite value for this row (null, NaN,
        # inf): broken, not absent — rule invalid_score; a null score not named here was never there
        pa.field("invalid_scores", pa.list_(pa.string()), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)
"""Canonical raw pair; sizes and scores may be absent in the input (null), scores broken (``invalid_scores``)."""

_TRACKING = [
    pa.field("row_id", pa.string(), nullable=False),  # "<file stem>:<0-based row>"
    pa.field("text_raw", pa.string(), nullable=True),
]

# the length rule's measure of the cleaned text: whitespace-separated words + CJK characters
_UNITS = pa.field("units", pa.uint32(), nullable=True)

# both models' answers, whichever decided: fastText's top label (null where the script alone
# decided) and lingua's (null where it was not asked)
_OPINIONS = [
    pa.field("lang_fasttext", pa.string(), nullable=True),
    pa.field("lang_fasttext_score", pa.float32(), nullable=True),
    pa.field("lang_lingua", pa.string(), nullable=True),
    pa.field("lang_lingua_score", pa.float32(), nullable=True),
]

CURATED_PAIR = pa.schema(
    _TRACKING
    + list(RAW_PAIR)
    + [
        _UNITS,
        pa.field("lang", pa.string(), nullable=False),
        # null where the script alone decided (Han only, no kana/hangul/Latin): fastText not asked
        pa.field("lang_score", pa.float32(), nullable=True),
        # "fasttext"; "script" where the script decided or overrode fastText's label; "lingua" where
        # fastText doubted a Latin-script caption and lingua decided (curate/lang/second_opinion.py)
        pa.field("lang_by", pa.string(), nullable=False),
        *_OPINIONS,
    ]
)

REJECTED_PAIR = pa.schema(
    _TRACKING
    + list(RAW_PAIR)
    + [
        _UNITS,
        pa.field("lang", pa.string(), nullable=True),
        pa.field("lang_score", pa.float32(), nullable=True),
        pa.field("lang_by", pa.string(), nullable=True),
        *_OPINIONS,
        pa.field("drop_reason", pa.string(), nullable=False),
        pa.field("failed_rules", pa.list_(pa.string()), nullable=False),
    ]
)

DOWNLOADED_PAIR = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("url", pa.string(), nullable=True),
        pa.field("text", pa.string(), nullable=True),
        pa.field("source", pa.string(), nullable=True),
        pa.field("lang", pa.string(), nullable=True),
        pa.field("download_status", pa.string(), nullable=False),  # img2dataset's status, or "not fetched"
        # where the image is: the tar under the download folder (null when none was fetched) and
        # its member's key (the member is KEY.jpg)
        pa.field("image_tar", pa.string(), nullable=True),
        pa.field("image_key", pa.string(), nullable=True),
    ]
)
"""A kept pair of `qvl curate download` (``kept/*.parquet``): the filter's columns it relies on
and where its image is; the curated pair's other columns and the image checks pass through."""

# what `qvl format --downloads` reads of a download's kept table, as ``check_columns`` takes it
DOWNLOADED_LOOKUP = {"url": "string", "image_tar": "string", "image_key": "string"}

_KINDS = {
    "string": lambda t: pat.is_string(t) or pat.is_large_string(t) or pat.is_binary(t)
    or pat.is_large_binary(t) or pat.is_string_view(t) or pat.is_null(t),
    "number": lambda t: pat.is_integer(t) or pat.is_floating(t) or pat.is_null(t)
    or pat.is_decimal(t),
}



def check_columns(
    schema: pa.Schema, required: dict[str, str], where: str, optional: dict[str, str] | None = None
) -> None:
    """Check that ``schema`` has ``required`` columns of the given kinds ("string"/"number").

    ``optional`` columns are type-checked only when present. Raises SchemaError naming
    ``where`` (the file), the column and what is wrong.
    """
    names = set(schema.names)
    missing = [c for c in required if c not in names]
    if missing:
        raise SchemaError(
            f"{where}: missing column(s) {', '.join(missing)}; "
            f"the file has: {', '.join(schema.names) or '(no columns)'}"
        )
    for column, kind in {**required, **(optional or {})}.items():
        if column not in names:
            continue
        t = schema.field(column).type
        if not _KINDS[kind](t):
            raise SchemaError(f"{where}: column {column!r} is {t}, expected a {kind} column")


def conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """``table`` with ``schema``'s columns cast to their types where they stand (the other
    columns and the order kept), then validated: an output that keeps its layout, typed."""
    for field in schema:
        if field.name in table.column_names:
            i = table.column_names.index(field.name)
            table = table.set_column(i, field.name, table.column(i).cast(field.type))
    validate_table(table, schema, where)
    return table


def validate_table(table: pa.Table, schema: pa.Schema, where: str) -> None:
    """Check that ``table`` holds every field of ``schema`` with its exact type and nullability."""
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaError(f"{where}: missing column {field.name!r}")
        col = table.column(field.name)
        if col.type != field.type:
            raise SchemaError(
                f"{where}: column {field.name!r} is {col.type}, expected {field.type}"
            )
        if not field.nullable and col.null_count:
            raise SchemaError(f"{where}: column {field.name!r} has {col.null_count} null(s)")
