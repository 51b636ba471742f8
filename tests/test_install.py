"""What each install brings. `pip install avpt-kernels` declares only torch, triton, numpy and
safetensors: importing and running the kernels must need nothing of the [train] extra (the
model, trainer and CLI), and the `avpt` command without that extra is one line naming it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from avpt import console

pytestmark = pytest.mark.cpu_only

REPO = Path(__file__).resolve().parents[1]
KERNEL_DISTRIBUTIONS = ("torch", "triton", "numpy", "safetensors")  # pyproject's dependencies
# Modules of the [train] and [dev] extras, and the model package itself. tqdm is not listed:
# torch imports it on its own when it is installed.
NOT_FOR_KERNELS = ("open_clip", "yaml", "skimage", "sklearn", "scipy", "PIL", "pydicom",
                   "matplotlib", "openpyxl", "tensorboard", "timm", "transformers", "avpt")

# Imports the kernels, runs every op family once on CPU tensors (the torch backend, and the
# Triton kernels too when TRITON_INTERPRET=1), prints the modules above that got imported.
KERNEL_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import avpt_kernels as ak
    import avpt_kernels.inject, avpt_kernels.testing  # noqa: F401  (inject_pim, the test helpers)

    backends = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for backend in backends:
        pooled = ak.region_pool(torch.randn(2, 17, 32), torch.rand(2, 16, 3), backend=backend)
        bank = ak.LowRankPromptBank(dim=32, num_regions=3, tokens_per_region=2, rank=4,
                                    num_layers=2, num_stages=1, backend=backend)
        prompts = bank(pooled)
        pim = ak.PromptTokenInteraction(dim=32, num_heads=2, head_dim=8, gate_hidden=8,
                                        backend=backend)
        z_out, p_tilde = pim(torch.randn(2, 17, 32, requires_grad=True), prompts[0])
        z_out.sum().backward()
        assert z_out.shape == (2, 17, 32) and torch.isfinite(z_out).all()
    print(json.dumps({"file": ak.__file__, "backends": backends,
                      "imported": [m for m in NAMES if m in sys.modules]}))
""")


def _run_kernel_script(python, cwd, env) -> dict:
    script = f"NAMES = {NOT_FOR_KERNELS!r}\n" + KERNEL_SCRIPT
    done = subprocess.run([python, "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_import_nothing_of_the_train_extra(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="1")
    result = _run_kernel_script(sys.executable, tmp_path, env)
    assert result["backends"] == ["torch", "triton"]
    assert result["imported"] == [], (
        f"importing/running avpt_kernels imported {result['imported']}: the kernels-only install "
        f"(pyproject's dependencies) does not bring them")


def test_console_without_the_train_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(console, "find_spec", lambda name: None if name in ("yaml", "scipy") else 1)
    assert console.main(["--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "missing: pyyaml, scipy" in err and "pip install 'avpt-kernels[train]'" in err


def test_console_names_every_train_extra_module():
    # every distribution of pyproject's [train] extra is looked for by the console script
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    train = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["train"]
    declared = {r.split(">")[0].split("=")[0].strip().lower() for r in train}
    assert declared == {d.lower() for d in console.TRAIN_EXTRA_MODULES.values()}


def _requirement_closure(names) -> list:
    """The installed distributions that `names` need, with theirs (markers of this interpreter)."""
    from packaging.requirements import Requirement

    seen, todo = {}, list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement this machine does not have
        seen[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _link_distributions(dists, into: Path) -> None:
    """Symlink each distribution's top-level files and folders (from its RECORD) into `into`."""
    into.mkdir()
    for dist in dists:
        for file in dist.files or []:
            top = Path(file).parts[0]
            source = Path(dist.locate_file(top))
            if top == ".." or (into / top).exists() or not source.exists():
                continue
            (into / top).symlink_to(source)


def test_kernels_only_install_in_a_fresh_venv(tmp_path):
    """A venv without system site packages, given only torch, triton, numpy, safetensors and what
    they require (linked from this interpreter's site-packages), then `pip install --no-deps` of
    this project's wheel: the kernels import and run on CPU, and `avpt` names the missing extra."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = tmp_path / "kernel-deps"
    _link_distributions(_requirement_closure(KERNEL_DISTRIBUTIONS), deps)
    (site / "kernel-deps.pth").write_text(f"{deps}\n")

    # The wheel is built here (this venv's setuptools, offline) from a copy of the sources, so
    # the working tree gets no build/ folder; the fresh venv installs it without dependencies.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("avpt_kernels", "avpt"):
        shutil.copytree(REPO / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, timeout=300)
    wheel = next(wheels.glob("avpt_kernels-*.whl"))
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True, timeout=300)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONNOUSERSITE="1", TRITON_INTERPRET="1")
    result = _run_kernel_script(python, tmp_path, env)
    assert Path(result["file"]).is_relative_to(site), result["file"]  # the installed copy
    assert result["backends"] == ["torch", "triton"] and result["imported"] == []

    cli = subprocess.run([str(venv / "bin" / "avpt"), "demo"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2, cli.stderr
    assert cli.stderr.count("\n") == 1 and "pip install 'avpt-kernels[train]'" in cli.stderr
    assert "open_clip_torch" in cli.stderr and "Traceback" not in cli.stderr
