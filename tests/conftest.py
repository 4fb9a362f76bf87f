"""Shared helpers: real worker processes, the real command, job logs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import litemultistep
from litemultistep import config

TESTS = Path(__file__).resolve().parent
LMS = shutil.which("litemultistep", path=os.path.dirname(sys.executable)) or "litemultistep"


def env_for_workers() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    env.pop("LITEMULTISTEP_CRASH_FILE", None)
    return env


def cli(*args: str, timeout: float = 60, input: str | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run the real ``litemultistep`` console script."""
    return subprocess.run([LMS, *args], capture_output=True, text=True, timeout=timeout, input=input,
                          env=env or env_for_workers())


def lines(path: str | Path) -> list[str]:
    p = Path(path)
    return p.read_text().splitlines() if p.exists() else []


def wait_for(predicate: Callable[[], object], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Spawner:
    """Starts ``litemultistep worker`` processes as a user does, and cleans them all up."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, db: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log_path = self.tmp / f"worker-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([LMS, "worker", db, *args], stdout=log, stderr=subprocess.STDOUT,
                                    env=env or env_for_workers(), start_new_session=True)
        proc.log_path = str(log_path)  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log_path).read_text()  # type: ignore[attr-defined]

    def cleanup(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.cleanup()


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A database path (not the default one: tests name it with db=)."""
    return str(tmp_path / "test.sqlite")


@pytest.fixture
def log_path(tmp_path: Path) -> str:
    return str(tmp_path / "jobs.log")


@pytest.fixture(autouse=True)
def _clean_settings() -> Iterator[None]:
    """No test leaks its mode or default database into the next."""
    saved = (config._settings.db, config._settings.mode)
    yield
    config._settings.db, config._settings.mode = saved


@pytest.fixture
def sync_mode() -> Iterator[None]:
    litemultistep.configure(mode="sync")
    yield


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB filesystem (tmpfs), so a full disk is a real ENOSPC. Mounting needs root, as CI runs."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(directory: Path) -> Path:
    """Take every free byte of the filesystem holding ``directory``; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler
