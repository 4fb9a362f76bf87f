"""Refusing, at add_job time and with a clear message, what a worker could not import or JSON could not
carry exactly."""

from __future__ import annotations

import datetime
import functools
import subprocess
import sys
import textwrap

import jobfuncs
import pytest

from litemultistep import ArgumentNotSerializable, JobNotImportable, MultiStepTask
from litemultistep.jobs import callable_path, decode_args, encode_args, resolve


@pytest.fixture
def task(db):
    return MultiStepTask.create("jobs", db=db)


def _undecorated(fn):
    def wrapper(*a):  # no functools.wraps: the name no longer leads back to it
        return fn(*a)
    return wrapper


@_undecorated
def badly_decorated():
    pass


def _wrapped(fn):
    @functools.wraps(fn)
    def wrapper(*a):
        return fn(*a)
    return wrapper


@_wrapped
def well_decorated(path, tag):
    jobfuncs.record(path, tag)


class TestCallables:
    def test_module_function_round_trips(self):
        assert callable_path(jobfuncs.record) == "jobfuncs:record"
        assert resolve("jobfuncs:record") is jobfuncs.record

    def test_lambda_refused(self, task):
        with pytest.raises(JobNotImportable, match="a lambda cannot be a job"):
            task.add_job(lambda: None)

    def test_nested_function_refused(self, task):
        def inner():
            pass
        with pytest.raises(JobNotImportable, match="defined inside a function"):
            task.add_job(inner)

    def test_bound_method_refused(self, task):
        with pytest.raises(JobNotImportable, match="method bound to an instance"):
            task.add_job(jobfuncs.Holder().method)

    def test_not_callable_refused(self, task):
        with pytest.raises(JobNotImportable, match="not int 42"):
            task.add_job(42)

    def test_decorator_without_wraps_refused(self, task):
        with pytest.raises(JobNotImportable, match="decorator's wrapper without functools.wraps"):
            task.add_job(badly_decorated)

    def test_decorator_with_wraps_accepted(self, task, db, log_path):
        task.add_job(well_decorated, log_path, "w")

    def test_builtin_accepted(self, task):
        task.add_job(print, "hello")
        assert callable_path(print) == "builtins:print"

    def test_main_script_function_refused(self, tmp_path, db):
        script = tmp_path / "script.py"
        script.write_text(textwrap.dedent(f"""
            from litemultistep import MultiStepTask, JobNotImportable
            def work():
                pass
            task = MultiStepTask.create("main", db={db!r})
            try:
                task.add_job(work)
            except JobNotImportable as e:
                print("REFUSED:", e)
        """))
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
        assert "REFUSED: work is defined in the __main__ script" in out.stdout, out.stderr

    def test_main_module_run_with_dash_m_accepted(self, tmp_path, db):
        (tmp_path / "mymain.py").write_text(textwrap.dedent(f"""
            from litemultistep import MultiStepTask
            def work():
                pass
            if __name__ == "__main__":
                task = MultiStepTask.create("main", db={db!r})
                task.add_job(work)
                print("STORED", task.normal_job_count)
        """))
        out = subprocess.run([sys.executable, "-m", "mymain"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert "STORED 1" in out.stdout, out.stderr

    @pytest.mark.parametrize("path, message", [
        ("nomodule_xyz:f", "cannot import module 'nomodule_xyz'"),
        ("jobfuncs:missing", "has no 'missing'"),
        ("jobfuncs", "not a 'module:qualname'"),
        ("jobfuncs:os", "not a callable"),
    ])
    def test_resolve_errors(self, path, message):
        with pytest.raises(JobNotImportable, match=message):
            resolve(path)

    def test_module_whose_import_raises(self, tmp_path, monkeypatch):
        (tmp_path / "explodes_on_import.py").write_text("raise RuntimeError('import side effect')\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(JobNotImportable, match="raised RuntimeError: import side effect"):
            resolve("explodes_on_import:f")


class TestArguments:
    @pytest.mark.parametrize("value, message", [
        (float("nan"), "argument 1 is nan: JSON has no NaN"),
        (float("inf"), "argument 1 is inf"),
        ({1, 2}, "argument 1 is of type set"),
        ((1, 2), "a tuple would come back as a list"),
        (datetime.datetime(2026, 1, 1), "argument 1 is of type datetime"),
        (b"raw", "argument 1 is of type bytes"),
        ({1: "a"}, "argument 1 has the key 1 \\(int\\)"),
        ({"a": [1, {"b": object()}]}, "argument 1\\['a'\\]\\[1\\]\\['b'\\] is of type object"),
        ("lone \udc80 surrogate", "lone surrogate"),
        # an id of its own: pytest cannot show such an int either
        pytest.param(10**5000, "argument 1 is an int of more than 4,300 digits, which Python refuses to read",
                     id="int-of-5001-digits"),
        pytest.param({"n": [-(10**4300)]}, "argument 1\\['n'\\]\\[0\\] is an int of more than 4,300 digits",
                     id="nested-int-of-4301-digits"),
    ])
    def test_refused_with_the_argument_named(self, task, value, message):
        with pytest.raises(ArgumentNotSerializable, match=message):
            task.add_job(jobfuncs.noop, value)
        assert task.normal_job_count == 0

    def test_keyword_argument_named(self, task):
        with pytest.raises(ArgumentNotSerializable, match="keyword argument 'when' is of type date"):
            task.add_job(jobfuncs.noop, when=datetime.date.today())

    def test_an_int_too_long_for_text_is_refused_by_name(self, task):
        with pytest.raises(ArgumentNotSerializable, match="keyword argument 'n' is an int of more than 4,300 digits"):
            task.add_job(jobfuncs.noop, 1, n=10**5000)
        longest = 10**4300 - 1  # 4,300 digits: what every process reads back
        assert decode_args(encode_args((longest,), {})) == ([longest], {})
        assert task.add_job(jobfuncs.noop, longest, -longest).job_id is not None

    def test_deep_nesting_refused(self, task):
        value: list = []
        for _ in range(200):
            value = [value]
        with pytest.raises(ArgumentNotSerializable, match="nested more than 100 levels"):
            task.add_job(jobfuncs.noop, value)

    def test_oversized_arguments_refused(self, task):
        with pytest.raises(ArgumentNotSerializable, match="50.0 MiB as JSON, over the 8 MiB limit"):
            task.add_job(jobfuncs.noop, "x" * (50 * 2**20))
        assert task.normal_job_count == 0

    def test_exact_values_round_trip(self):
        args = (2**64, -(2**70), 1.5, "unicode ✓ 日本", None, True, [1, [2, {"k": "v"}]], {"": 0})
        assert decode_args(encode_args(args, {"x": 3})) == (list(args), {"x": 3})

    def test_errors_are_also_type_errors(self, task):
        with pytest.raises(TypeError):
            task.add_job(jobfuncs.noop, {1, 2})
        with pytest.raises(TypeError):
            task.add_job(lambda: 0)
