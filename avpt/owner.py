"""Output folders with an owner: every folder the CLI writes records what made it, and no command
writes into a folder that another kind of command, or another run, made.

``OUT/.avpt-owner.json`` holds the kind (``train``, ``transfer``, ``eval``, ``explain``, ``cv``,
``demo``), an identity (a hash of what makes the output what it is: a training run's
results-changing settings, an evaluation's model and data, ...), a short description and the
command line. ``check_owner`` (before anything is loaded or written) refuses, in one line that
says how to proceed (a new ``--out``, or ``--overwrite``):

* a folder of another kind (``avpt eval --out`` over a training run, ``avpt cv --out`` over a
  demo, ...);
* a folder of the same kind made by another run (another evaluation's ``metrics.json``);
* a non-empty folder that avpt did not make (a folder of the user's own files).

Folders written before markers existed are recognised by their files (``checkpoint.pt`` or
``model/``: a training run; ``cv_metrics.json``: a cross-validation; ...). ``claim`` writes the
marker once the run holds the folder's lock. A folder holding only a marker and the lock file
(a run that stopped before writing anything) is free. The same command run again (a resume, a
re-evaluation) is always accepted. The package's own folders (shipped weights, configs) are never
an output (``check_not_in_package``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from typing import Dict, Optional

MARKER = ".avpt-owner.json"
_BOOKKEEPING = (MARKER, ".avpt.lock", "folds.json")  # (a folds file may be put there first)
_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # a write in progress (avpt_kernels._files)
WHAT = {"train": "a training run", "transfer": "a transfer run", "eval": "an evaluation",
        "explain": "explanation figures", "cv": "a cross-validation", "demo": "a demo"}
# files that tell what an unmarked (older) avpt folder holds, first match wins
_LEGACY = (("checkpoint.pt", "train"), (os.path.join("model", "trainable.safetensors"), "train"),
           ("cv_metrics.json", "cv"), ("ablation.json", "cv"), ("comparison.json", "demo"),
           ("explain.html", "explain"), ("metrics.json", "eval"))
PACKAGE_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) for m in
                     (sys.modules[__name__.rsplit(".", 1)[0]],))


def identity(obj) -> str:
    """A short hash of a JSON-able description of a run (sorted keys)."""
    from .run_io import jsonable

    text = json.dumps(jsonable(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_owner(out: str) -> Optional[Dict]:
    """What made ``out``: its marker, else the kind its files show (``id`` None), else
    ``{"kind": None, "entry": NAME}`` for a non-empty folder avpt did not make; None for a
    missing or (but for bookkeeping) empty folder."""
    if not os.path.isdir(out):
        return None
    entries = sorted(e for e in os.listdir(out) if e not in _BOOKKEEPING and not _TEMP.match(e))
    if not entries:
        return None
    try:
        with open(os.path.join(out, MARKER)) as f:
            owner = json.load(f)
        if isinstance(owner, dict) and owner.get("kind") in WHAT:
            return owner
    except (OSError, ValueError):
        pass
    for name, kind in _LEGACY:
        if os.path.isfile(os.path.join(out, name)):
            return {"kind": kind, "id": None, "what": "made before folders had owners"}
    return {"kind": None, "entry": entries[0], "entries": len(entries)}


def check_not_in_package(path: str, flag: str = "--out") -> None:
    """Nothing the CLI writes lands inside the installed package (its shipped weights and
    configs are read-only to the CLI)."""
    from .errors import ConfigError

    real = os.path.realpath(path)
    for pkg in PACKAGE_DIRS:
        if real == pkg or real.startswith(pkg + os.sep):
            raise ConfigError(f"{flag} {path!r} is inside the installed avpt package ({pkg}), whose "
                              f"shipped files the CLI never replaces: give a path outside it")


def check_owner(out: str, kind: str, ident: Optional[str], overwrite: bool = False,
                flag: str = "--out") -> None:
    """``out`` may take the output of ``kind`` (identity ``ident``; None: any of that kind), or a
    one-line ``ConfigError`` saying how to proceed. ``overwrite``: the user allows it."""
    from .errors import ConfigError

    check_not_in_package(out, flag)
    if overwrite:
        return
    owner = read_owner(out)
    if owner is None:
        return
    fix = "give a new --out, or pass --overwrite to replace what is there"
    if owner["kind"] is None:
        raise ConfigError(f"{flag} {out!r} is a folder avpt did not make ({owner['entries']} "
                          f"entries, e.g. {owner['entry']!r}); avpt {kind} writes its files "
                          f"there: give a new or empty folder, or pass --overwrite")
    if owner["kind"] != kind:
        raise ConfigError(f"{flag} {out!r} holds {WHAT[owner['kind']]} (avpt {owner['kind']}), "
                          f"which avpt {kind} would overwrite: {fix}")
    if ident is not None and owner.get("id") not in (None, ident):
        made = f": {owner['what']}" if owner.get("what") else ""
        raise ConfigError(f"{flag} {out!r} holds another {WHAT[kind].split(' ', 1)[1]}{made}; "
                          f"avpt {kind} with these settings would replace it: {fix}")


def claim(out: str, kind: str, ident: Optional[str], what: str = "") -> None:
    """Write ``OUT/.avpt-owner.json`` (atomically): this folder is ``kind``'s, run ``ident``."""
    from .run_io import write_json

    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, MARKER), {
        "kind": kind, "id": ident, "what": what, "command": " ".join(["avpt"] + sys.argv[1:]),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
