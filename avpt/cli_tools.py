"""``avpt params`` and ``avpt compare``: commands with their own parsers (every option passes
through to ``avpt.params`` / ``avpt_kernels.compare``), checked here first."""
from __future__ import annotations


def cmd_params(args) -> int:
    from .params import main as params_main

    return params_main(args.rest)


# ``avpt compare``'s integer options (those of ``python -m avpt_kernels.compare``): name, default,
# least value, what it is; the parser and the range check are both made from this one table.
COMPARE_SIZES = (("batch", 2, 1, "batch size B"), ("tokens", 197, 2, "tokens T"),
                 ("dim", 768, 1, "width D"), ("prompts", 6, 1, "prompt tokens K"))


def compare_parser():
    """``avpt compare``'s options (those of ``python -m avpt_kernels.compare``), checked here."""
    from .validate import OneLineParser

    ap = OneLineParser(prog="avpt compare", description="op-level backend comparison: every "
                       "backend of every op against the fp64 reference (avpt_kernels.compare)")
    for name, default, least, what in COMPARE_SIZES:
        ap.add_argument(f"--{name}", type=int, default=default,
                        help=f"{what} >= {least} (default {default})")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return ap


def cmd_compare(args) -> int:
    from .errors import ConfigError
    from .validate import check_device

    ns = compare_parser().parse_args(args.rest)
    for name, _, least, _ in COMPARE_SIZES:
        if getattr(ns, name) < least:
            raise ConfigError(f"--{name} must be an integer >= {least}, got {getattr(ns, name)}")
    if ns.device is not None:
        if ns.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {ns.device!r}")
        check_device(ns.device)
    from avpt_kernels import compare

    return compare.main(args.rest)
