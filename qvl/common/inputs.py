"""Names of a run's input files, as its row and sample ids use them.

An id is ``<name>:<line>``, where the name is the file's path relative to the folder all
the run's inputs share (a lone file, or files of one folder: just the file name). Two
``part-0.parquet`` in different folders therefore keep apart, and the same file given
twice — whose rows would be counted twice under one id — is refused.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from qvl.errors import QvlError


class DuplicateInput(QvlError):
    pass


def input_names(paths: list) -> list[str]:
    """Paths or files in a bucket (``RemoteFile``: named from their URL, ``s3://b/`` kept apart
    from local folders)."""
    resolved = [Path(p).resolve() if isinstance(p, (str, Path)) else PurePosixPath("/", *str(p).split("://", 1))
                for p in paths]
    seen: dict[Path, Path] = {}
    for given, real in zip(paths, resolved):
        if real in seen:
            raise DuplicateInput(f"{given}: given twice (also as {seen[real]}); each input file may appear once")
        seen[real] = given
    if not resolved:
        return []
    root = os.path.commonpath([r.parent for r in resolved])
    return [r.relative_to(root).as_posix() for r in resolved]
