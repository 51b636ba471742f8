"""Issue 27: preemption- and fault-safe runs. SIGTERM (kill, docker stop, SLURM preemption) is
handled like Ctrl-C: one line, exit code 143, no temporary file, a whole checkpoint, and log.csv
never ahead of it, so that the same command resumes without a duplicated row; a kill between the
checkpoint and the log is repaired on resume. A full disk (a real file size limit in a
subprocess, or an ENOSPC write) and a folder one may not write in end in one line naming the
path, with no temporary file left behind."""
import builtins
import csv
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from avpt.cli import main
from avpt.train import run

from .test_cli_errors import CPU, FAST, ROOT, _cmd, _train_args
from .test_train import tiny_cfg


def _rows(out):
    with open(out / "log.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _temp_files(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
            if ".tmp" in f]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("AVPT_TRACEBACK", None)
    return env


def test_sigterm_is_one_line_exit_143_and_the_run_resumes_without_a_duplicate_row(tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(out, 100000)
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (out / "checkpoint.pt").exists(), proc.stderr.read()[-2000:] if proc.poll() else "timeout"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("avpt train: terminated (SIGTERM);") and "resume" in last, last
    assert not _temp_files(out)
    done = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    rows = _rows(out)
    assert rows == list(range(1, done + 1))  # the log and the checkpoint agree
    # the same command resumes (one more epoch, then a stop): no row twice, none missing
    assert main(cmd[3:] + ["--set", f"stop_after_epoch={done + 1}"]) == 0
    assert _rows(out) == list(range(1, done + 2))


def test_log_is_never_ahead_of_the_checkpoint_and_is_repaired_on_resume(tmp_path, monkeypatch):
    """A kill while the 2nd checkpoint is written: log.csv has the 1st epoch only. A kill after
    the checkpoint, before the log: the resume rewrites the log from the checkpoint."""
    import avpt.train as train

    real_save, real_csv = train.atomic_save, train.write_csv
    calls = {"save": 0, "csv": 0}

    def killed_save(obj, path):
        calls["save"] += 1
        if calls["save"] == 2:
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(train, "atomic_save", killed_save)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(tmp_path / "a", epochs=3))
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert _rows(tmp_path / "a") == [1] and not _temp_files(tmp_path / "a")

    def killed_log(path, rows):
        calls["csv"] += 1
        if calls["csv"] == 2:
            raise KeyboardInterrupt
        real_csv(path, rows)

    monkeypatch.setattr(train, "atomic_save", real_save)
    monkeypatch.setattr(train, "write_csv", killed_log)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(tmp_path / "b", epochs=3))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert _rows(tmp_path / "b") == [1]                       # behind, never ahead
    monkeypatch.setattr(train, "write_csv", real_csv)
    run(tiny_cfg(tmp_path / "b", epochs=3))
    assert _rows(tmp_path / "b") == [1, 2, 3]


def test_a_file_size_limit_mid_training_is_one_line_and_leaves_no_temp_file(tmp_path):
    """A real limit (``ulimit -f``): the checkpoint cannot be written whole."""
    import resource

    out = tmp_path / "run"
    limit = 32 * 1024  # the lock, owner and log files fit; a checkpoint does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(_cmd(out, 2), env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=240, preexec_fn=small_files)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith(f"avpt train: error: cannot write {out / 'checkpoint.pt'}: "
                               f"File too large; free some space"), lines[0]
    assert not _temp_files(out) and not (out / "checkpoint.pt").exists()


def _full_disk(monkeypatch, name, code=errno.ENOSPC):
    """Writes into the temporary file of ``name`` fail with ``code`` (ENOSPC: the disk fills up
    while the command's result is written, after the work)."""
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        base = os.path.basename(str(file))
        if any(c in mode for c in "wa") and base.startswith(f".{name}.") and base.endswith(".tmp"):
            def write(data):
                raise OSError(code, os.strerror(code))
            f.write = write
        return f

    monkeypatch.setattr(builtins, "open", full_open)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(_train_args(out)) == 0
    return out


@pytest.mark.parametrize("command", ["eval", "explain", "pretrain"])
def test_a_full_disk_is_one_line_naming_the_file(run_dir, tmp_path, command, capsys,
                                                 monkeypatch):
    monkeypatch.delenv("AVPT_TRACEBACK", raising=False)
    out = tmp_path / "out"
    name = {"eval": "metrics.json", "explain": "explain.html", "pretrain": "w.safetensors"}[command]
    argv = {"eval": ["eval", "--checkpoint", str(run_dir), "--out", str(out), *CPU, *FAST[:2]],
            "explain": ["explain", "--checkpoint", str(run_dir), "--out", str(out), "--num", "1",
                        *CPU, *FAST[:2]],
            "pretrain": ["pretrain", "--out", str(out / "w.safetensors"), "--patients", "4",
                         "--views", "1", "--epochs", "1", "--batch-size", "4", "--threads", "1"],
            }[command]
    _full_disk(monkeypatch, name)
    rc = main(argv)
    monkeypatch.undo()
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "phantom images" not in line]   # pretrain's progress bar
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"avpt {command}: error: cannot write {out / name}: No space left "
                             f"on device; free some space"), err
    assert ".tmp" not in err[0] and not _temp_files(out)


def test_an_output_folder_one_may_not_write_in_is_one_line(tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc = main(_train_args(locked / "run"))
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no permission to write" in err[0], err


def test_a_folder_that_cannot_be_made_is_one_line_not_a_bare_errno(capsys, monkeypatch):
    monkeypatch.delenv("AVPT_TRACEBACK", raising=False)
    rc = main(_train_args("/proc/avpt-test-run"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "/proc/avpt-test-run" in err[0], err
    assert not err[0].split("error: ", 1)[1].startswith("[Errno"), err


def test_a_write_that_is_not_permitted_is_one_line_exit_2(run_dir, tmp_path, capsys, monkeypatch):
    """EACCES on the result (what a read-only share or a root-owned folder gives; tests run as
    root here, so chmod cannot make one)."""
    monkeypatch.delenv("AVPT_TRACEBACK", raising=False)
    out = tmp_path / "out"
    _full_disk(monkeypatch, "metrics.json", errno.EACCES)
    rc = main(["eval", "--checkpoint", str(run_dir), "--out", str(out), *CPU, *FAST[:2]])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"avpt eval: error: cannot write {out / 'metrics.json'}: Permission denied; "
                      f"give a folder you may write in"), err
    assert not _temp_files(out)
