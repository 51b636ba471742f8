"""Whole-file writes that cannot leave half a file, a stray temporary file, or replace what is
not a regular file: ``write_atomic(path, write)``."""
from __future__ import annotations

import errno
import os
import secrets
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


class OutputError(OSError):
    """A file could not be written (disk full, no permission, not a regular file, ...): one
    line naming the file the caller asked for (never the temporary one) and what to do."""

    def __str__(self) -> str:  # the message alone, without "[Errno N]"
        return self.strerror or super().__str__()


def _hint(code) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some space (or raise the file size limit) or write elsewhere"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "give a folder you may write in"
    return "check the path"


def check_regular_target(path: PathLike) -> str:
    """The real path a write to ``path`` replaces (symlinks followed); an ``OutputError`` when
    it exists and is not a regular file (a device, pipe, socket or folder)."""
    real = os.path.realpath(os.fspath(path))
    if os.path.lexists(real) and not os.path.isfile(real):
        kind = "a folder" if os.path.isdir(real) else "not a regular file (a device, pipe or socket)"
        raise OutputError(errno.EEXIST, f"{os.fspath(path)} is {kind}: it is not replaced; give "
                                        f"the path of a file")
    return real


def write_atomic(path: PathLike, write: Callable[[str], None], fsync: bool = True) -> str:
    """``write(tmp)`` fills a new temporary file beside ``path``, which is then fsynced and
    renamed onto ``path`` (``os.replace``): ``path`` is the old file or the whole new one,
    whatever happens (a kill, a full disk). On any failure the temporary file is removed and an
    ``OSError`` becomes an ``OutputError`` naming ``path``. Refuses a ``path`` that is not a
    regular file (``check_regular_target``). Returns ``path``."""
    shown = os.fspath(path)
    real = check_regular_target(shown)
    folder, base = os.path.split(real)
    tmp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            reason = exc.strerror or str(exc)
            raise OutputError(exc.errno, f"cannot write {shown}: {reason}; {_hint(exc.errno)}") \
                from None
        raise
    return shown


def write_bytes_atomic(path: PathLike, data: bytes) -> str:
    """``write_atomic`` of ``data``."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return write_atomic(path, write)
