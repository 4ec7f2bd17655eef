"""Tokenized training samples: the table between `qvl format` and `qvl train`.

One row per sample, or per packed sequence. ``labels`` holds -100 where no loss is taken.
``images`` uses the Hugging Face Image layout (``struct<bytes, path>``) with the bytes
inline, in the order the image spans appear in ``input_ids``. Packed rows list the ids
and token counts of the samples they hold, so attention and positions restart at each.
"""

from __future__ import annotations

import pyarrow as pa

IGNORE_INDEX = -100
IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

SAMPLE = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("images", pa.list_(IMAGE), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("sample_ids", pa.list_(pa.string()), nullable=False),
        pa.field("sample_lengths", pa.list_(pa.int32()), nullable=False),
    ]
)

# the newer families' rows add their M-RoPE position ids: per row three lists (temporal, height,
# width) as long as input_ids, each packed sample counting from 0 as it would alone
SAMPLE_MROPE = SAMPLE.append(pa.field("position_ids", pa.list_(pa.list_(pa.int32())), nullable=False))

REJECT = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("line", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
)
