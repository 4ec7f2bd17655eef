"""Arrow schemas of every table that crosses a room boundary, and their validation."""

from qvl.schemas.pairs import (
    CURATED_PAIR,
    DOWNLOADED_LOOKUP,
    DOWNLOADED_PAIR,
    RAW_PAIR,
    REJECTED_PAIR,
    SchemaError,
    check_columns,
    conform,
    validate_table,
)

__all__ = [
    "CURATED_PAIR",
    "DOWNLOADED_LOOKUP",
    "DOWNLOADED_PAIR",
    "RAW_PAIR",
    "REJECTED_PAIR",
    "SchemaError",
    "check_columns",
    "conform",
    "validate_table",
]
