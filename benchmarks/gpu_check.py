"""One prepared command for one device call (issue 24): the GPU tier of the test suite, then the
benchmarks, then the profile, each under its own time limit, so that a slow phase never hides
the others; results, logs, every failure's traceback and a summary land in one folder.

    python -m benchmarks.gpu_check [--out DIR] [--tier-s S] [--bench-s S] [--profile-s S]
    python -m benchmarks.gpu_check --dry [--out DIR]     # the plumbing on a CPU (CI runs it)

Phases (``make gpu-check``; defaults sized for one 10-minute call, at most ``--total-s`` 525 s):
  setup    the wheels of .whl/ (``make gpu-wheels``: pytest-xdist, open_clip, ...) into a
           private site folder, for a GPU machine without a registry (skipped without .whl/)
  tier     ``pytest -m "not cpu_only" tests`` on every core (pytest-xdist when installed):
           every device-path test, on CUDA tensors with the compiled kernels, the ``extended``
           cases included (the model shapes, cheap on a GPU)
  bench    ``pytest benchmarks``: Table 10 rows, op rows, compiled/graphed rows, launch rows
  profile  ``python -m benchmarks.gpu_profile``: wall vs GPU-busy time, top kernels
A phase past its limit gets SIGINT (pytest then still writes its JSON and summary), then
SIGTERM and SIGKILL, to its whole process group; the next phase starts either way.

The folder (``--out``, default ``$OUT`` where the device tool collects files, else
benchmarks/results/) gets ``gpu-check_<device>_<date>/`` holding SUMMARY.md and summary.json
(pass counts, failures with their last line, the time of each phase and of each test file),
gpu-tier.log, gpu-tier-results.jsonl, gpu-failures.log (every traceback, as it happened),
gpu-bench.log, the benchmark JSON and TABLE10.md, gpu-profile.txt and environment.txt; copy it
under benchmarks/results/ as it is. The exit status is 0 only if every phase passed.

``--dry`` checks this plumbing without a GPU, in well under a minute: three tests for the tier,
one benchmark row, one small CPU part of the profile (the backbone's inference),
the same folder and summary.
"""
import argparse
import datetime as dt
import glob
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = "/tmp/avpt-site"  # the carried wheels, installed with --target (no venv on a GPU machine)
TOTAL_S = 525            # under 9 minutes in all: one 10-minute device call with room to spare
RESERVE_S = 30           # kept for each later phase, whatever an earlier one takes
GRACE_S = (15, 5)        # after the limit: SIGINT, then SIGTERM after 15 s, SIGKILL after 5 more

# --dry: the same commands on selections that take seconds on 2 CPU cores.
# (test_metrics.py is cpu_only: the tier's marker must leave its dice test out)
DRY_TIER = ["tests/test_modules.py", "tests/test_metrics.py", "-k",
            "packs_its_weights or loads_a_state_dict or backend_switch or dice_iou_known"]
DRY_BENCH = ["benchmarks/ops/test_region_pool.py", "-k", "host_time"]
DRY_PROFILE = ["backbone", "--parts", "infer"]  # one small CPU smoke part of the profile


@dataclass
class Phase:
    name: str
    argv: List[str]
    limit_s: float
    log: str
    env: Dict[str, str] = field(default_factory=dict)
    skip: Optional[str] = None  # why it does not run


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _device_name(dry: bool) -> str:
    if dry or not _has_cuda():
        return "cpu-dry" if dry else "cpu"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()
    return (out[0] if out else "cuda").replace("NVIDIA ", "").replace(" ", "-").lower()


def _has_module(name: str, python: str, site: str) -> bool:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(
        None, [ROOT, site, os.environ.get("PYTHONPATH")])))
    return subprocess.run([python, "-c", f"import {name}"], env=env, cwd=ROOT,
                          capture_output=True).returncode == 0


def _kill(proc: subprocess.Popen) -> None:
    """SIGINT to the phase's process group (pytest finishes its session: JSON, summary), then
    SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, GRACE_S[0]), (signal.SIGTERM, GRACE_S[1]),
                      (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_phase(phase: Phase, out_dir: str) -> Dict:
    """Run one phase to its log under its limit; its record for the summary."""
    record = dict(name=phase.name, limit_s=round(phase.limit_s), log=phase.log,
                  command=shlex.join(phase.argv))
    if phase.skip:
        with open(os.path.join(out_dir, phase.log), "w") as log:
            log.write(f"skipped: {phase.skip}\n")
        return dict(record, status="skipped", reason=phase.skip, seconds=0.0, rc=None)
    start = time.monotonic()
    env = dict(os.environ, **phase.env)
    with open(os.path.join(out_dir, phase.log), "w") as log:
        log.write(f"$ {record['command']}\n")
        log.flush()
        proc = subprocess.Popen(phase.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=ROOT, start_new_session=True)  # its own process group
        try:
            rc = proc.wait(timeout=max(1.0, phase.limit_s))
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc, status = proc.returncode, "timeout"
    seconds = time.monotonic() - start
    with open(os.path.join(out_dir, phase.log), "a") as log:
        log.write(f"\n[gpu_check] phase {phase.name}: {status} (rc {rc}) after {seconds:.1f} s "
                  f"of {phase.limit_s:.0f} s\n")
    return dict(record, status=status, rc=rc, seconds=round(seconds, 1))


def count_results(path: str) -> Dict:
    """Per-test outcomes from a tests/run_log.py results file (what finished, even if cut)."""
    collected, tests, seconds = None, {}, {}
    if os.path.exists(path):
        for line in open(path):
            row = json.loads(line)
            if "collected" in row:
                collected = row["collected"]
                continue
            nodeid, when, outcome = row["nodeid"], row["when"], row["outcome"]
            part = nodeid.split("::")[0]
            seconds[part] = seconds.get(part, 0.0) + row["duration"]
            state = tests.setdefault(nodeid, {"outcome": None, "message": None})
            if outcome == "failed":
                state["outcome"] = "failed" if when == "call" else "error"
                state["message"] = row.get("message")
            elif state["outcome"] not in ("failed", "error"):
                if row.get("xfail"):
                    state["outcome"] = "xfailed" if outcome == "skipped" else "xpassed"
                elif outcome == "skipped":
                    state["outcome"] = "skipped"
                elif when == "call":
                    state["outcome"] = "passed"
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    for state in tests.values():
        if state["outcome"]:
            counts[state["outcome"]] += 1
    finished = sum(counts.values())
    failures = [dict(test=n, kind=s["outcome"], message=s["message"]) for n, s in tests.items()
                if s["outcome"] in ("failed", "error")]
    parts = sorted(seconds.items(), key=lambda kv: -kv[1])
    return dict(collected=collected, finished=finished,
                not_run=(collected - finished) if collected is not None else None,
                counts=counts, failures=failures,
                seconds_per_file={k: round(v, 1) for k, v in parts})


def build_phases(args, out_dir: str, python: str) -> List[Phase]:
    site = SITE if os.path.isdir(SITE) or glob.glob(os.path.join(ROOT, ".whl", "*.whl")) else ""
    path = os.pathsep.join(filter(None, [ROOT, site, os.environ.get("PYTHONPATH")]))
    base_env = dict(PYTHONPATH=path, PYTHONUNBUFFERED="1", AVPT_PART_TIMES="1")
    if not _has_cuda():  # the kernels through the interpreter (the test conftests do the same)
        base_env["TRITON_INTERPRET"] = "1"
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    setup = Phase("setup", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            "--no-compile", "--no-cache-dir", "--upgrade", "--target", SITE,
                            *wheels], args.setup_s, "gpu-setup.log",
                  skip="dry run: nothing installed" if args.dry else
                  None if wheels else "no .whl/ folder (make gpu-wheels makes one)")
    log = lambda name: os.path.join(out_dir, name)  # noqa: E731
    tier_env = dict(base_env, AVPT_FAILURE_LOG=log("gpu-failures.log"),
                    AVPT_RESULTS_LOG=log("gpu-tier-results.jsonl"))
    tier = [python, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--tb=short", "-rfE",
            "--durations=30", "-m", "not cpu_only" + ("" if args.extended else " and not extended")]
    tier += DRY_TIER if args.dry else ["tests"]
    bench_env = dict(base_env, AVPT_BENCH_RESULTS=out_dir,
                     AVPT_FAILURE_LOG=log("gpu-failures.log"),
                     AVPT_RESULTS_LOG=log("gpu-bench-results.jsonl"))
    bench = [python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.run_log", "-v",
             "--tb=short", "-rfE"] + (DRY_BENCH + ["--benchmark-disable"] if args.dry
                                      else ["benchmarks"])
    profile = [python, "-m", "benchmarks.gpu_profile"] + (DRY_PROFILE if args.dry else [])
    return [setup,
            Phase("tier", tier, args.tier_s, "gpu-tier.log", tier_env),
            Phase("bench", bench, args.bench_s, "gpu-bench.log", bench_env),
            Phase("profile", profile, args.profile_s, "gpu-profile.txt", base_env)]


def _environment(python: str) -> str:
    probe = ("import sys, torch; print('python', sys.version.split()[0]); print('torch', "
             "torch.__version__, 'cuda', torch.version.cuda, 'available', "
             "torch.cuda.is_available());\ntry:\n import triton; print('triton', "
             "triton.__version__)\nexcept ImportError: print('triton missing')")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout \
        if shutil.which("nvidia-smi") else "no nvidia-smi\n"
    return (f"host {platform.node()} {platform.platform()}, {os.cpu_count()} cores\n"
            f"{out.stdout}{out.stderr[-2000:]}\n{smi}")


def write_summary(out_dir: str, device: str, records: List[Dict], tier: Dict, bench: Dict,
                  dry: bool) -> Dict:
    summary = dict(device=device, dry=dry, started=records[0].get("started"), phases=records,
                   tier=tier, bench=bench,
                   total_s=round(sum(r["seconds"] for r in records), 1))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [f"# gpu-check on {device}" + (" (dry run: plumbing only)" if dry else ""), "",
             "| phase | status | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} | {r['limit_s']} |" for r in records]
    lines += ["", f"Total {summary['total_s']} s."]
    for label, res in (("GPU tier", tier), ("Benchmarks", bench)):
        c = res["counts"]
        done = ", ".join(f"{v} {k}" for k, v in c.items() if v) or "no test finished"
        collected = ("(collection not finished)" if res["collected"] is None
                     else f"of {res['collected']} collected")
        lines += ["", f"## {label}: {done} {collected}"
                  + (f" ({res['not_run']} not run: cut by the time limit)" if res["not_run"]
                     else "")]
        lines += [f"- {f['kind']}: `{f['test']}`: {f['message']}" for f in res["failures"]]
        if res["seconds_per_file"]:
            lines += ["", "Time per file (summed over its tests):", ""]
            lines += [f"- {s} s `{p}`" for p, s in list(res["seconds_per_file"].items())[:12]]
    lines += ["", "Tracebacks: gpu-failures.log; logs: gpu-tier.log, gpu-bench.log, "
              "gpu-profile.txt; environment.txt."]
    with open(os.path.join(out_dir, "SUMMARY.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
        ROOT, "benchmarks", "results"), help="folder that gets gpu-check_<device>_<date>/")
    parser.add_argument("--dry", action="store_true", help="plumbing check on a CPU")
    parser.add_argument("--setup-s", type=float, default=30)
    parser.add_argument("--tier-s", type=float, default=230)
    parser.add_argument("--bench-s", type=float, default=180)
    parser.add_argument("--profile-s", type=float, default=45)
    parser.add_argument("--total-s", type=float, default=TOTAL_S)
    parser.add_argument("--workers", type=int, default=None,
                        help="pytest-xdist workers for the tier (default: every core, 1 dry)")
    parser.add_argument("--no-extended", dest="extended", action="store_false",
                        help="leave the extended cases out of the tier")
    args = parser.parse_args(argv)
    start = time.monotonic()
    python = sys.executable
    device = _device_name(args.dry)
    started = dt.datetime.now(dt.timezone.utc)
    out_dir = os.path.join(os.path.abspath(args.out),
                           f"gpu-check_{device}_{started:%Y-%m-%d_%H%M}")
    os.makedirs(out_dir, exist_ok=True)
    if not _has_cuda() and not args.dry:
        print("gpu_check: no CUDA device here: the phases run on the CPU (use --dry for the "
              "plumbing check)", file=sys.stderr)
    with open(os.path.join(out_dir, "environment.txt"), "w") as f:
        f.write(_environment(python))
    phases = build_phases(args, out_dir, python)
    records = []
    for i, phase in enumerate(phases):
        later = sum(1 for p in phases[i + 1:] if not p.skip)
        left = args.total_s - (time.monotonic() - start) - later * RESERVE_S - sum(GRACE_S)
        phase.limit_s = max(5.0, min(phase.limit_s, left))
        if phase.name == "tier":  # after setup, which may have brought pytest-xdist
            workers = args.workers
            if workers is None:
                workers = 1 if args.dry or not _has_module("xdist", python, SITE) \
                    else (os.cpu_count() or 1)
            if workers > 1:
                at = phase.argv.index("-m", phase.argv.index("pytest") + 1)
                phase.argv[at:at] = ["-n", str(workers), "--dist", "worksteal"]
        record = run_phase(phase, out_dir)
        print(f"gpu_check: {record['name']}: {record['status']} in {record['seconds']} s "
              f"(limit {record['limit_s']} s)", flush=True)
        records.append(record)
    records[0]["started"] = started.isoformat(timespec="seconds")
    tier = count_results(os.path.join(out_dir, "gpu-tier-results.jsonl"))
    bench = count_results(os.path.join(out_dir, "gpu-bench-results.jsonl"))
    summary = write_summary(out_dir, device, records, tier, bench, args.dry)
    with open(os.path.join(out_dir, "SUMMARY.md")) as f:  # also in the device call's output
        print(f.read() + f"\ngpu_check: {out_dir}, total {summary['total_s']} s")
    return 0 if all(r["status"] in ("passed", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
