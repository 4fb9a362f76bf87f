"""Jobs of the benchmark (importable by the worker processes it starts)."""

from __future__ import annotations

import os
import time


def noop(i: int) -> None:
    return None


def _append(path: str, line: str) -> None:
    """Append one line to a file, in one write (lines of concurrent processes never mix)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def stamp(path: str, tag: str) -> None:
    """Append ``tag time`` to a file: when a job ran, to the microsecond."""
    _append(path, f"{tag} {time.time():.6f}")


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def burn(seconds: float) -> None:
    """About ``seconds`` of CPU work, in Python."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def echo(i: int) -> int:
    return i


def final(path: str) -> None:
    """A finalizer that says how many jobs of its task completed before it."""
    import litemultistep

    stamp(path, f"final-{litemultistep.current_task().progress().completed_count}")


def burn_job(i: int, seconds: float) -> None:
    """Job ``i`` of a fan-out: about ``seconds`` of CPU work."""
    burn(seconds)


def sha(rounds: int) -> bytes:
    """A fixed amount of CPU work: ``rounds`` chained sha256 digests of a 64-byte block."""
    import hashlib

    digest = bytes(64)
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest() * 2
    return digest[:32]


def sha_cpu(rounds: int, path: str) -> None:
    """:func:`sha`, then append the CPU seconds it took to ``path`` (how fast the machine ran it)."""
    cpu = time.thread_time()
    sha(rounds)
    _append(path, f"{time.thread_time() - cpu:.6f}")


def boom(i: int) -> None:
    """A job that fails."""
    raise RuntimeError(f"job {i} fails")
