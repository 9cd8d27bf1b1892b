"""Drop known-false alarms that C++ code writes straight to file descriptor 2.

Ray 2.60's core worker prints, on every `predict --ray`, an error line about actor restarts
(ray-project/ray#57733): Ray Data itself passes its actors ObjectRefs and restarts them
(`max_restarts=-1`), so the line fires on every pipeline and says nothing the user can act on.
It comes from C++ in this process, past Python's logging and sys.stderr, so only the file
descriptor can hold it back. Turning restarts off (`map_batches(max_restarts=0)`) would silence
it too, at the cost of Ray Data's fault tolerance on a cluster (an actor lost with its node is
restarted elsewhere).
RAY_BACKEND_LOG_LEVEL=fatal would hide every other Ray error, and prints a line of its own."""

import os
import re
import sys
import threading
from contextlib import contextmanager

RAY_ACTOR_RESTART_WARNING = re.compile(
    rb"^\[[^\]]*\] core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
    rb"and max_restarts > 0\. ")  # fmt: skip


@contextmanager
def dropping_stderr_lines(pattern: re.Pattern[bytes]):
    """While inside, fd 2 is a pipe: a thread copies every line to the real stderr except those
    that ``pattern`` matches. Every other line gets through, in order (a last line without its
    newline too, at the end)."""
    sys.stderr.flush()
    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    copier = threading.Thread(target=_copy_lines, args=(read, os.dup(real), pattern), daemon=True)
    copier.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # fd 2 was the pipe's last write end here: the copier reads to the end
        os.close(real)
        # A process started inside (it inherits fd 2) keeps the pipe open: then the copier stays
        # behind as a daemon thread, and the rest of its lines go when that process ends.
        copier.join(timeout=5)


def _copy_lines(read: int, out: int, pattern: re.Pattern[bytes]) -> None:
    pending, broken = b"", False
    try:
        while chunk := os.read(read, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not pattern.search(line))
            broken = broken or not _write_all(out, kept)  # a closed stderr: read on, so writers never block
        if pending and not pattern.search(pending) and not broken:
            _write_all(out, pending)
    finally:
        os.close(read)
        os.close(out)


def _write_all(fd: int, data: bytes) -> bool:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    return True
