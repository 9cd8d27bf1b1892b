"""The lock check: any difference between the venv and requirements/lock.txt is named in one line."""

import subprocess
import sys

import pytest

from unet_export import lockcheck


@pytest.fixture
def lock(tmp_path):
    path = tmp_path / "lock.txt"
    path.write_text("# header\nTorch==2.14.1\ntyping_extensions==4.16.0  # why\nnumpy==2.4.6\n")
    return path


def test_reads_exact_pins_with_canonical_names(lock):
    assert lockcheck.read_lock(lock) == {"torch": "2.14.1", "typing-extensions": "4.16.0", "numpy": "2.4.6"}


def test_a_range_is_not_a_lock(tmp_path):
    (tmp_path / "lock.txt").write_text("torch>=2.9\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        lockcheck.read_lock(tmp_path / "lock.txt")


def test_exact_match_has_no_drift(lock):
    have = {"torch": "2.14.1", "typing-extensions": "4.16.0", "numpy": "2.4.6", "unet-export": "0.1.0"}
    assert lockcheck.drift(lock, have) == []


def test_every_kind_of_drift_is_named(lock):
    have = {"torch": "2.15.0", "typing-extensions": "4.16.0", "rich": "15.0.0"}
    assert lockcheck.drift(lock, have) == [
        "torch 2.15.0 is installed, the lock says 2.14.1",
        "numpy 2.4.6 is locked but not installed",
        "rich 15.0.0 is installed but not in the lock",
    ]


def test_cli_fails_with_one_line_naming_the_package(lock):
    proc = subprocess.run([sys.executable, "-m", "unet_export.lockcheck", str(lock)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("venv differs from lock.txt: ")
    assert "rebuild it: rm -rf .venv" in lines[0]
