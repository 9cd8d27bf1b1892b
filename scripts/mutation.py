"""`make mutation`: mutmut over the modules that decide verdicts and keep data, then one line:

    mutation score: K/T killed (P%) in <modules>

K counts mutants a test caught (failed, hung past mutmut's limit, or died, as a test run would)
plus the mutants reviewed as equivalent in tests/mutation_equivalent.txt (a
change no input can observe, each listed with its reason). Every other mutant is printed: a
test is missing. The modules and the tests run against them are pyproject's [tool.mutmut].

Torch in forked workers: one intra-op thread (a fork inherits no thread pool, and mutmut's
CPU-time limit then measures one test's own time), mutmut forks each worker from a process that ran no torch op.
"""

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "tests" / "mutation_equivalent.txt"
# mutmut's statuses for a mutant a test run detects: a failure, a hang, or the test process dying
# (a mutant that makes the crash-test hook SIGKILL its own process shows as "segfault").
CAUGHT = {"killed", "timeout", "segfault"}


def main() -> int:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    mutmut = [sys.executable, "-m", "mutmut"]
    started = time.monotonic()
    run = subprocess.run([*mutmut, "run", "--max-children", str(os.cpu_count() or 1)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL)  # fmt: skip
    if run.returncode != 0:
        print(f"mutmut run failed (exit {run.returncode})", file=sys.stderr)
        return 2
    results = subprocess.run([*mutmut, "results", "--all", "true"], cwd=ROOT, env=env, capture_output=True, text=True)
    statuses = dict(_parse(results.stdout))
    equivalent = _equivalent()
    stale = sorted(set(equivalent) - set(statuses))
    missed = {name: st for name, st in statuses.items() if st not in CAUGHT and name not in equivalent}
    for name, status in sorted(missed.items()):
        print(f"{status:10s} {name}")
    for name in stale:
        print(f"stale entry in {EQUIVALENT.name} (no such mutant now): {name}")
    killed = sum(st in CAUGHT for st in statuses.values()) + sum(n in statuses and statuses[n] not in CAUGHT
                                                                   for n in equivalent)  # fmt: skip
    total = len(statuses)
    modules = ", ".join(_modules())
    minutes = (time.monotonic() - started) / 60
    print(f"mutation score: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%) in {modules} "
          f"[{minutes:.0f} min]")  # fmt: skip
    return 0 if total and killed / total >= 0.9 else 1


def _parse(text: str):
    """`mutmut results --all true` lines: '    <mutant name>: <status>'."""
    for line in text.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            yield name, status.strip()


def _equivalent() -> dict[str, str]:
    """Reviewed equivalent mutants: '<mutant name>  # <why no input can tell it apart>'."""
    entries = {}
    for line in EQUIVALENT.read_text().splitlines() if EQUIVALENT.exists() else []:
        name, _, why = line.partition("#")
        if name.strip():
            entries[name.strip()] = why.strip()
    return entries


def _modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return [Path(p).name for p in config["only_mutate"]]


if __name__ == "__main__":
    sys.exit(main())
