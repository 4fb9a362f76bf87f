"""The pytest plugin, tested as users use it: pytester runs example test files in a fresh pytest, with
the fixtures on SQLite files and on PostgreSQL (``--litemultistep-postgres``)."""

from __future__ import annotations

import re

import pytest
import xdist  # noqa: F401  (part of the test extra: its absence must fail, not skip)
from conftest import ROOT, need_postgres

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> list[str]:
    """The inner pytest's arguments: the plugin's fixtures on SQLite files, then on PostgreSQL."""
    return [] if request.param == "sqlite" else ["--litemultistep-postgres", need_postgres()]

README = ROOT / "README.md"


def readme_example() -> dict[str, str]:
    """The files of the README's "Testing your code" example, by name."""
    text = README.read_text()
    found = re.findall(r"<!-- testing-example: (\S+) -->\s*```python\n(.*?)```", text, re.S)
    assert [name for name, _ in found] == ["jobs.py", "test_jobs.py"]
    return dict(found)


def test_readme_example_passes(pytester, backend):
    for name, code in readme_example().items():
        pytester.makepyfile(**{name[:-3]: code})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *backend)
    result.assert_outcomes(passed=2)


def test_failing_job_fails_the_test_readably(pytester, backend):
    pytester.makepyfile(
        userjobs="""
            def parse(value):
                return int(value)
        """,
        test_user="""
            from litemultistep import MultiStepTask
            import userjobs

            def test_parse(litemultistep_db, litemultistep_drain):
                with MultiStepTask.create("parse") as task:
                    task.add_job(userjobs.parse, "not a number")
                litemultistep_drain(raise_on_failure=True)
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *backend)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ValueError: invalid literal for int() with base 10: 'not a number'*",
                                 "*userjobs.py*"])


def test_drain_summary_and_sync_fixture(pytester, backend):
    pytester.makepyfile(
        userjobs="""
            def ok(x):
                return x
            def bad():
                raise KeyError("missing")
        """,
        test_user="""
            import litemultistep
            from litemultistep import MultiStepTask

            import userjobs

            def test_summary(litemultistep_db, litemultistep_drain):
                with MultiStepTask.create("s") as task:
                    task.add_job(userjobs.ok, 1)
                    task.add_job(userjobs.bad)
                summary = litemultistep_drain()
                assert (summary.completed, summary.failed, summary.finalized) == (1, 1, [])
                assert (summary.completed_jobs, summary.failed_attempts, summary.failed_jobs) == (1, 1, 1)
                assert summary.failures[0].exc_type == "KeyError"
                assert isinstance(summary.failures[0], litemultistep.FailedAttempt)

            def test_sync(litemultistep_db, litemultistep_sync):
                task = MultiStepTask.create("now")
                task.add_job(userjobs.ok, 2)
                assert task.completed_count == 1
        """,
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider", *backend).assert_outcomes(passed=2)


def test_fixtures_leak_nothing_between_tests(pytester, backend):
    pytester.makepyfile(
        test_leak="""
            import os
            import pytest
            import litemultistep
            from litemultistep import config

            seen = []

            def test_a(litemultistep_db, litemultistep_sync):
                assert config.mode() == "sync"
                assert config.resolve_db().target == litemultistep_db
                seen.append(litemultistep_db)

            def test_b():
                assert config.mode() == "async"
                with pytest.raises(litemultistep.NoDatabaseConfigured):
                    config.resolve_db()
                assert "LITEMULTISTEP_CRASH_FILE" not in os.environ

            def test_c(litemultistep_db, tmp_path):
                # a new database each time: a file in the test's tmp_path, or a new PostgreSQL schema
                assert litemultistep_db not in seen
                assert litemultistep_db.startswith((str(tmp_path), "postgresql://"))
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *backend, "-p", "no:randomly")
    result.assert_outcomes(passed=3)


def test_worker_fixture_runs_real_processes(pytester, backend):
    pytester.makepyfile(
        userjobs="""
            import os
            def where(path):
                with open(path, "a") as f:
                    f.write(f"{os.getpid()}\\n")
        """,
        test_user="""
            import os
            from litemultistep import MultiStepTask
            import userjobs

            def test_worker(litemultistep_worker, tmp_path):
                out = tmp_path / "pids"
                with MultiStepTask.create("w") as task:
                    for _ in range(4):
                        task.add_job(userjobs.where, str(out))
                    task.add_finalization_job(userjobs.where, str(out))
                progress = litemultistep_worker.wait(task, timeout=60)
                assert progress.finished and progress.completed_count == 5
                pids = set(out.read_text().split())
                assert str(os.getpid()) not in pids
        """,
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider", *backend).assert_outcomes(passed=1)


def test_works_under_xdist(pytester, backend):
    pytester.makepyfile(
        userjobs="""
            def ok(x):
                return x
        """,
        test_user="""
            import pytest
            from litemultistep import MultiStepTask
            import userjobs

            @pytest.mark.parametrize("n", range(6))
            def test_each(litemultistep_db, litemultistep_drain, n):
                with MultiStepTask.create(f"x{n}") as task:
                    for i in range(n):
                        task.add_job(userjobs.ok, i)
                assert litemultistep_drain().completed == n
        """,
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider", *backend, "-n", "2").assert_outcomes(passed=6)
