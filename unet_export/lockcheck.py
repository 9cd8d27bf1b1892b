"""Installed packages against the project's lock (requirements/lock.txt).

Standard library only: `make test` runs it right after installing, and `unet-export doctor`
reports it. A difference in any package is drift: release CI must run on exactly the locked set.
"""

import re
import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "lock.txt"
# Installed by the venv itself or by the project's own editable install, never locked.
UNLOCKED = {"unet-export"}


def canonical(name: str) -> str:
    """PEP 503 normalised name: 'Typing_Extensions' and 'typing-extensions' are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path}: '{line}' is not an exact pin (name==version)")
        pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def drift(path: Path = LOCK, have: dict[str, str] | None = None) -> list[str]:
    """One line per package whose installed version differs from the lock, is missing, or is
    installed without being locked. Empty when the environment is exactly the lock."""
    want, have = read_lock(path), installed() if have is None else have
    lines = [f"{name} {have[name]} is installed, the lock says {version}"
             for name, version in want.items() if name in have and have[name] != version]  # fmt: skip
    lines += [f"{name} {version} is locked but not installed" for name, version in want.items() if name not in have]
    lines += [f"{name} {version} is installed but not in the lock"
              for name, version in sorted(have.items()) if name not in want and name not in UNLOCKED]  # fmt: skip
    return lines


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else LOCK
    problems = drift(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        print(f"venv differs from {path.name}: {problems[0]}{more}; rebuild it: rm -rf .venv && make test", file=sys.stderr)
        return 1
    print(f"venv matches {path.name} ({len(read_lock(path))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
