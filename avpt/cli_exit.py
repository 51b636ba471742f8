"""How the CLI ends: SIGTERM unwinds like Ctrl-C (``Terminated``), a file-system failure is one
line naming the path (``os_error_line``), and the exit codes (``exit_code``)."""
from __future__ import annotations

import os


def interrupted(args, what: str = "interrupted") -> str:
    out = getattr(args, "out", None)
    ckpt = os.path.join(out, "checkpoint.pt") if out else None
    if args.command in ("train", "transfer") and ckpt and os.path.isfile(ckpt):
        return (f"{what}; {ckpt} keeps the last finished epoch (log.csv agrees): run the same "
                f"command again to resume")
    if args.command in ("cv", "demo"):
        return (f"{what}; finished runs under {out} are kept: run the same command again to "
                f"go on from them")
    return f"{what}; nothing half-written is left: run the same command again"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``docker stop``, a SLURM preemption), raised where the program is, so
    that it unwinds as Ctrl-C does: temporary files removed, the lock released, the last
    checkpoint and log.csv as the last finished epoch left them."""


def on_sigterm(signum, frame):
    raise Terminated()


def os_error_line(exc: OSError) -> str:
    """One line for a file-system failure: the path and the reason (never a bare errno)."""
    from avpt_kernels._files import OutputError, _hint

    if isinstance(exc, OutputError) or exc.filename is None:
        return " ".join(str(exc).split()) or type(exc).__name__
    reason = exc.strerror or type(exc).__name__
    return f"{exc.filename}: {reason}; {_hint(exc.errno)}"


def exit_code(exc: BaseException) -> int:
    """2: a setting, file or folder the user gave (also one they may not write in); 1: the
    disk is full or another I/O failure."""
    import errno

    if isinstance(exc, OSError) and exc.errno not in (None, errno.EACCES, errno.EPERM,
                                                      errno.EROFS, errno.EEXIST, errno.ENOENT,
                                                      errno.ENOTDIR, errno.EISDIR):
        return 1
    return 2


def error_line(prog: str, exc: Exception) -> int:
    """A user's mistake (ValueError) or an I/O failure (OSError) as one line ``PROG: error:
    MESSAGE`` on stderr; returns the exit code (``exit_code``). ``AVPT_TRACEBACK=1`` re-raises."""
    import sys

    if os.environ.get("AVPT_TRACEBACK"):
        raise exc
    msg = os_error_line(exc) if isinstance(exc, OSError) else \
        (" ".join(str(exc).split()) or type(exc).__name__)
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return exit_code(exc)
