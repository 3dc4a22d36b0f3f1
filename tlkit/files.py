"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

import os
import tempfile
from pathlib import Path


def write_atomically(path, write):
    """Writes a file through a temporary file beside it, then renames it over `path`.

    Args:
        path: the file to (re)write.
        write: called with the open binary temporary file; writes the content.

    The temporary file is hidden (`.<stem>-*.tmp`), flushed to disk before the rename, and
    removed if anything fails, Ctrl-C included.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-",
                                         suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
