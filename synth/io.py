"""Writing files so that a reader, a crash or a kill never leaves half of one: temporary name, then rename.

Every file the project writes for a person or a later run (frames, indexes, checkpoints, tables, pictures) goes
through :func:`atomic_path`: the bytes land under a hidden temporary name beside the target and are renamed onto
it only when complete. ``os.replace`` is atomic on POSIX within one filesystem, so a reader sees the old file or
the new one, never a torn one. On any failure the temporary file is removed; a full disk is named as such.
"""

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

#: Temporary names are ``.tmp-<pid>-<name>``: hidden, and the pid says whether the writer is still alive.
_TEMPORARY = re.compile(r"^\.tmp-(\d+)-")


class DiskFullError(OSError):
    """No space left while writing a file; the message names the file."""


def temporary_name(path: str | os.PathLike) -> Path:
    """The hidden sibling ``.tmp-<pid>-<name>`` that :func:`atomic_path` writes before renaming."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def _is_disk_full(error: BaseException) -> bool:
    # torch.save reports ENOSPC from its zip writer as a RuntimeError ("enforce fail at inline_container.cc").
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, RuntimeError) and ("inline_container" in str(error) or "No space left" in str(error))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed onto ``path``, on any failure removed.

    Example:
        >>> with atomic_path("results.csv") as tmp:  # doctest: +SKIP
        ...     tmp.write_text(text)

    Raises:
        DiskFullError: the filesystem ran out of space (the temporary file is gone, ``path`` is untouched).
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(error):
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}") from error
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data, **kwargs) -> Path:
    """Write ``json.dumps(data, **kwargs)`` to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(data, **kwargs))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clear_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of writers that died (killed mid-write, or a full disk); returns them.

    A file is stale when its name carries the pid of a process that no longer runs, or this process's own pid (a
    previous attempt of this process that failed). Files of live writers are left alone.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and path.is_file():
            pid = int(match.group(1))
            if pid == os.getpid() or not _alive(pid):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


__all__ = ["DiskFullError", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "clear_stale_temporaries", "temporary_name"]
