"""The op registry ``avpt_kernels.ops.OPS`` is the one list of ops, and each op's files are found
by its name: the package ``avpt_kernels/ops/<op>/`` (kernels, launchers, custom op), its
``reference.py`` and ``spec.py``, ``tests/ops/test_<op>.py`` and ``benchmarks/ops/test_<op>.py``
(docs/adding-an-op.md). Nothing loads a module by a name string (import cycles:
``tests/test_layout.py``)."""
import os

import pytest

import avpt_kernels
from avpt_kernels import aot
from avpt_kernels.ops import OPS

# The GPU tier leaves these out: file layout and import structure, no device path.
pytestmark = pytest.mark.cpu_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = ("avpt", "avpt_kernels", "benchmarks", "tests")


def _python_files(*dirs):
    for top in dirs:
        for folder, subdirs, files in os.walk(os.path.join(ROOT, top)):
            subdirs[:] = [d for d in subdirs if not d.startswith((".", "__pycache__"))]
            yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


@pytest.mark.parametrize("name", list(OPS))
def test_each_op_is_found_by_its_name(name):
    package = OPS[name]
    assert package.__name__ == f"avpt_kernels.ops.{name}"
    assert package.SPEC.name == name
    assert callable(getattr(avpt_kernels, name)), f"avpt_kernels.{name}: the public op"
    assert package.aot_configs(), f"{name}: no AOT configurations"
    for path in (f"avpt_kernels/ops/{name}/op.py", f"avpt_kernels/ops/{name}/reference.py",
                 f"avpt_kernels/ops/{name}/spec.py", f"tests/ops/test_{name}.py",
                 f"benchmarks/ops/test_{name}.py"):
        assert os.path.isfile(os.path.join(ROOT, path)), f"{name}: {path} missing"


def test_the_aot_list_is_the_registrys():
    assert len(aot.collect()) == sum(len(op.aot_configs()) for op in OPS.values())


def test_no_module_is_loaded_by_a_name_string():
    needle = "importlib" + ".import_module"  # spelt apart: this file is scanned too
    found = [os.path.relpath(p, ROOT) for p in _python_files(*SOURCE_DIRS)
             if needle in open(p, encoding="utf-8").read()]
    assert not found, f"{needle} in {found}: go through avpt_kernels.ops.OPS"
