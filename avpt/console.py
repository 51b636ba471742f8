"""The ``avpt`` console script. ``pip install avpt-kernels`` installs the kernels only; the model,
trainer and CLI need the ``[train]`` extra. Without it the command says so in one line (exit code
2) instead of a traceback from deep inside an import."""
from __future__ import annotations

import sys
from importlib.util import find_spec

# What the CLI imports, by import name, with the distribution of the [train] extra that brings it.
TRAIN_EXTRA_MODULES = {
    "open_clip": "open_clip_torch",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "PIL": "pillow",
    "pydicom": "pydicom",
    "openpyxl": "openpyxl",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
}

INSTALL_HINT = "pip install 'avpt-kernels[train]' (in a checkout: pip install '.[train]')"


def missing_train_packages() -> list:
    """The distributions of the [train] extra whose modules cannot be found (nothing is imported)."""
    return [dist for module, dist in TRAIN_EXTRA_MODULES.items() if find_spec(module) is None]


def main(argv=None) -> int:
    missing = missing_train_packages()
    if missing:
        print(f"avpt: error: the model, trainer and CLI need the [train] extra "
              f"(missing: {', '.join(missing)}): {INSTALL_HINT}", file=sys.stderr)
        return 2
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
