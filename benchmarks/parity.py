"""The quick parity tests (tests/test_gpu_quick.py) in parallel pytest processes, each under a time limit.

    python -m benchmarks.parity --backends triton --jobs 8 --timeout-s 150 --log OUT/tests.log

Compiling the kernels is what takes the time of a first GPU run, one compilation after another in one process;
here each process gets whole kernel variants (a test id without its shape: the tests of one variant share its
compilations), so the variants compile side by side. No test stops the others: a failure is reported and the
rest run on; a process that passes its limit is killed and reported, and every other process's results stand.
The log gets each process's output as it ends, then a summary; the exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEST_FILE = "tests/test_gpu_quick.py"
ROOT = Path(__file__).resolve().parents[1]


def collect(backends: list[str], env: dict[str, str]) -> list[str]:
    """The node ids of the quick parity tests of `backends`."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", TEST_FILE, "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    ids = [line for line in done.stdout.splitlines() if line.startswith(TEST_FILE + "::")]
    if done.returncode != 0 or not ids:
        raise RuntimeError(f"collecting {TEST_FILE} for {','.join(backends)} failed:\n{done.stdout}{done.stderr}")
    return ids


def variant(node_id: str) -> str:
    """The kernel variant of a test: its id without the trailing shape."""
    return node_id.rsplit("-", 1)[0]


def split(node_ids: list[str], jobs: int) -> list[list[str]]:
    """At most `jobs` disjoint lists of node ids, whole variants each, balanced by test count."""
    groups: dict[str, list[str]] = {}
    for node_id in node_ids:
        groups.setdefault(variant(node_id), []).append(node_id)
    buckets: list[list[str]] = [[] for _ in range(min(jobs, len(groups)))]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(buckets, key=len).extend(group)
    return buckets


def _outcome(output: str, returncode: int | None) -> str:
    """pytest's last summary line, or why there is none."""
    if returncode is None:
        return "killed at the time limit: the tests listed as PASSED or FAILED above finished, the rest did not"
    lines = [line for line in output.splitlines() if line.strip()]
    return f"exit {returncode}: {lines[-1].strip('= ') if lines else 'no output'}"


def run(backends: list[str], jobs: int, timeout_s: float, log: Path) -> bool:
    """Run the quick parity tests of `backends` in up to `jobs` processes; True if all passed in time."""
    env = {**os.environ, "VDVAE_FAST_QUICK_BACKENDS": ",".join(backends), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    buckets = split(collect(backends, env), jobs)
    with tempfile.TemporaryDirectory() as scratch, log.open("a") as out:
        out.write(
            f"=== quick parity tests of {','.join(backends)}: {len(buckets)} processes, limit {timeout_s:.0f} s\n"
        )
        running = []
        for i, bucket in enumerate(buckets):
            path = Path(scratch) / f"{i}.log"
            command = [sys.executable, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", *bucket]
            with path.open("w") as sink:
                process = subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
                )
            running.append((i, process, path, len(bucket)))
        deadline = started + timeout_s
        ok = True
        for i, process, path, count in running:
            try:
                returncode: int | None = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                returncode = None
            output = path.read_text(errors="replace")
            summary = _outcome(output, returncode)
            ok = ok and returncode == 0
            out.write(f"--- process {i} ({count} tests): {summary}\n{output}\n")
            out.flush()
            print(f"  parity {','.join(backends)} process {i} ({count} tests): {summary}", flush=True)
        elapsed = time.monotonic() - started
        verdict = "all passed" if ok else "FAILURES or time-outs (see above)"
        out.write(f"=== quick parity tests of {','.join(backends)}: {verdict} in {elapsed:.0f} s\n")
    return ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends", required=True, help="comma-separated fused backends to test, e.g. triton, cuda or cpu"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel pytest processes")
    parser.add_argument(
        "--timeout-s", type=float, default=300.0, help="wall-clock limit of the whole run; later processes are killed"
    )
    parser.add_argument("--log", type=Path, required=True, help="file the tests' output is appended to")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    backends = [b for b in args.backends.split(",") if b]
    raise SystemExit(0 if run(backends, args.jobs, args.timeout_s, args.log) else 1)


if __name__ == "__main__":
    main()
