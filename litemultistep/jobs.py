"""Turning a callable into ``module:qualname`` and back, and job arguments into exact JSON.

A job is stored as the import path of its callable and its arguments as JSON: nothing is ever
pickled, so a worker runs only code it can import itself. Whatever a worker could not import, or JSON
could not carry exactly, is refused at ``add_job`` time, where the mistake is, not at run time.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import sys
import weakref
from collections.abc import Callable
from typing import Any

from .errors import ArgumentNotSerializable, JobNotImportable, ResultNotSerializable

_paths: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_resolved: dict[str, Callable[..., Any]] = {}


def callable_path(fn: Callable[..., Any]) -> str:
    """The ``module:qualname`` a worker imports ``fn`` by; raises :class:`JobNotImportable`."""
    try:
        return _paths[fn]
    except (KeyError, TypeError):
        pass
    path = _compute_path(fn)
    try:
        _paths[fn] = path
    except TypeError:
        pass  # not weak-referenceable (a builtin): checked again next time, which is cheap
    return path


def _describe(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _compute_path(fn: Any) -> str:
    if not callable(fn):
        raise JobNotImportable(f"a job must be a function or other callable, not {type(fn).__name__} {fn!r}")
    if inspect.ismethod(fn) and not inspect.isclass(fn.__self__):
        raise JobNotImportable(
            f"{_describe(fn)} is a method bound to an instance: a worker cannot import the instance. "
            "Use a module-level function (or a classmethod/staticmethod) and pass the instance's data as "
            "arguments"
        )
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname:
        raise JobNotImportable(f"{fn!r} has no module and qualified name, so a worker cannot import it; "
                               "use a function defined at the top level of a module")
    if "<lambda>" in qualname:
        raise JobNotImportable(f"a lambda cannot be a job ({module}:{qualname}): a worker cannot import "
                               "it; define a function at the top level of a module")
    if "<locals>" in qualname:
        raise JobNotImportable(f"{qualname} is defined inside a function (a closure, or a decorator's wrapper "
                               "without functools.wraps), so a worker cannot import it; move it to the top "
                               "level of a module")
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is None or not spec.name or spec.name == "__main__":
            raise JobNotImportable(
                f"{qualname} is defined in the __main__ script, which a worker cannot import; move it "
                "into a module of its own (e.g. jobs.py beside the script) and import it from there"
            )
        # Run with -m: workers import it by its real name. Importing it here would run the script's
        # top level a second time, so look the callable up in the running __main__ instead.
        path = f"{spec.name}:{qualname}"
        if _lookup(main, qualname) is not fn:
            raise JobNotImportable(f"{qualname} is not reachable by that name in {spec.name}")
        return path
    path = f"{module}:{qualname}"
    try:
        found = resolve(path)
    except JobNotImportable as e:
        raise JobNotImportable(f"{_describe(fn)} cannot be imported back as {path}: {e}") from None
    found_func = getattr(found, "__func__", None)
    same_method = found_func is not None and found_func is getattr(fn, "__func__", None)
    if found is not fn and not same_method:
        raise JobNotImportable(
            f"importing {path} gives {found!r}, not the callable passed ({fn!r}); a decorator that does "
            "not keep __qualname__ (functools.wraps) or a re-bound name is the usual cause"
        )
    return path


def resolve(path: str) -> Callable[..., Any]:
    """Import the callable stored as ``module:qualname``; raises :class:`JobNotImportable`."""
    fn = _resolved.get(path)
    if fn is not None:
        return fn
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise JobNotImportable(f"{path!r} is not a 'module:qualname' job path")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise JobNotImportable(f"cannot import module {module_name!r} for job {path}: {e}") from e
    except Exception as e:
        raise JobNotImportable(
            f"importing module {module_name!r} for job {path} raised {type(e).__name__}: {e}") from e
    try:
        obj = _lookup(obj, qualname)
    except AttributeError:
        raise JobNotImportable(f"module {module_name!r} has no {qualname!r} (job {path}); was it "
                               "renamed or removed since the job was queued?") from None
    if not callable(obj):
        raise JobNotImportable(f"{path} is a {type(obj).__name__}, not a callable")
    _resolved[path] = obj
    return obj  # type: ignore[no-any-return]


def _in_modules(module: str, allow: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in allow)


def allowed_or_why(path: str, allow: list[str]) -> str | None:
    """None when the callable at ``path`` is defined in a module of ``allow`` (or a submodule);
    else why it is refused. The attribute path may not leave the module (``mod:os.system``), and the
    resolved object's own ``__module__`` must be allowed, so an imported name cannot pass for local."""
    module_name, _, qualname = path.partition(":")
    listed = ", ".join(allow)
    if not _in_modules(module_name, allow):
        return f"module {module_name!r} is not allowed by --allow-module ({listed}); the worker did not run {path}"
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
            if inspect.ismodule(obj):
                return (f"{path} reaches into the module {obj.__name__!r} through {module_name!r}: an attribute "
                        f"path may not leave its module under --allow-module ({listed}); the worker did not run it")
    except Exception as e:  # noqa: BLE001 - the job fails with this text instead of running
        return f"cannot check {path} for --allow-module: {type(e).__name__}: {e}"
    defined_in = getattr(obj, "__module__", None)
    if not isinstance(defined_in, str) or not _in_modules(defined_in, allow):
        return (f"{path} is defined in {defined_in!r}, not in a module allowed by --allow-module ({listed}); "
                "the worker did not run it")
    return None


def _lookup(obj: Any, qualname: str) -> Any:
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


_SCALARS = (str, bool, type(None))
#: the most digits an int may have: Python's default limit on turning an int into text and back
#: (``sys.get_int_max_str_digits``), which every process that reads the JSON applies, whatever this one does
INT_DIGITS = 4300
_INT_LIMIT = 10**INT_DIGITS


def _check_value(value: Any, where: str, depth: int) -> None:
    kind = type(value)
    if kind in _SCALARS:
        if kind is str and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ArgumentNotSerializable(
                    f"{where} is a string with a lone surrogate, which is not valid text; "
                    "pass bytes-like data as base64 or a list of numbers") from None
        return
    if kind is int:
        if not -_INT_LIMIT < value < _INT_LIMIT:
            raise ArgumentNotSerializable(
                f"{where} is an int of more than {INT_DIGITS:,} digits, which Python refuses to read back "
                "from JSON (its int-to-text limit); pass it as a string of digits")
        return
    if kind is float:
        if not math.isfinite(value):
            raise ArgumentNotSerializable(f"{where} is {value!r}: JSON has no NaN or infinity; "
                                          "pass None or a string instead")
        return
    if depth > 100:
        raise ArgumentNotSerializable(f"{where} is nested more than 100 levels deep")
    if kind is list:
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]", depth + 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ArgumentNotSerializable(
                    f"{where} has the key {key!r} ({type(key).__name__}); JSON object keys are strings "
                    "only, so it would come back as a string: use string keys")
            _check_value(item, f"{where}[{key!r}]", depth + 1)
        return
    hints: dict[type, str] = {
        tuple: "a tuple would come back as a list: pass a list",
        set: "pass a sorted list",
        frozenset: "pass a sorted list",
        bytes: "pass base64 text or a list of numbers",
    }
    hint = hints.get(kind, "pass JSON types only: str, int, float, bool, None, list, dict with string keys")
    raise ArgumentNotSerializable(f"{where} is of type {kind.__name__} ({_shown(value)}), which JSON cannot "
                                  f"carry exactly; {hint}")


def _shown(value: Any) -> str:
    """The start of ``repr(value)`` for a message, even when the object's own ``__repr__`` raises."""
    try:
        return f"{value!r:.60}"
    except Exception as e:  # noqa: BLE001 - a job's object cannot turn a clear refusal into a crash
        return f"its repr() raised {type(e).__name__}"


#: the largest JSON a job's arguments may take: big data belongs in a file whose path the job gets
MAX_ARGS_BYTES = 8 * 1024 * 1024


def encode_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """JSON for a job's arguments; raises :class:`ArgumentNotSerializable` naming the argument."""
    for i, value in enumerate(args):
        _check_value(value, f"argument {i + 1}", 0)
    for key, value in kwargs.items():
        _check_value(value, f"keyword argument {key!r}", 0)
    text = json.dumps([list(args), kwargs], ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    if len(text) > MAX_ARGS_BYTES:
        raise ArgumentNotSerializable(
            f"the job's arguments take {len(text) / 2**20:.1f} MiB as JSON, over the {MAX_ARGS_BYTES // 2**20} MiB "
            "limit: every worker reads them from the database; write the data to a file and pass its path")
    return text


def encode_result(value: Any) -> str:
    """JSON for a job's return value; raises :class:`ResultNotSerializable` naming what JSON cannot carry,
    and nothing else, whatever the job returned."""
    try:
        _check_value(value, "the return value", 0)
        return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except ArgumentNotSerializable as e:
        hint = str(e).replace("; pass ", "; return ")
        raise ResultNotSerializable(f"{hint} (its task keeps results, so the return value is stored)") from None
    except Exception as e:  # noqa: BLE001 - whatever the checks above missed is still the return value's fault
        raise ResultNotSerializable(f"the return value cannot be stored as JSON ({type(e).__name__}: {e}); return "
                                    "JSON types only (its task keeps results, so the return value is stored)") from None


def decode_args(text: str) -> tuple[list[Any], dict[str, Any]]:
    """The ``(args, kwargs)`` of a stored job."""
    args, kwargs = json.loads(text)
    return args, kwargs


def describe_call(func: str, args_json: str, limit: int = 120) -> str:
    """A one-line, log-safe rendering of a job call (control characters escaped, long ones cut)."""
    text = f"{func}{args_json}"
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."
