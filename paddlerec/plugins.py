"""Load the model file and reader file named in the config, by path.

An error inside such a file surfaces at once as one line with the file and line it
happened on — never as a later `NoneType` failure — and a file that lacks what the
contract requires says which name is missing.
"""

import hashlib
import importlib.util
import os
import sys
import traceback

from .errors import PluginError, UserError


_cache = {}


def where(exc, path):
    """file:line of the innermost frame of `exc` inside `path` (or the innermost frame)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if os.path.abspath(f.filename) == path]
    frame = (inside or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame else path


def load_file(path: str, role: str, key: str, required=()):
    """Import the Python file at `path` as a fresh module and check it defines `required`.

    `role` ("model file", "reader file") and `key` (the config key that named it) make
    the error message point at what to fix.
    """
    path = os.path.abspath(path)
    if path in _cache:
        return _cache[path]
    digest = hashlib.sha1(path.encode()).hexdigest()[:10]
    name = f"paddlerec_plugin_{os.path.splitext(os.path.basename(path))[0]}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{key}: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except UserError:
        sys.modules.pop(name, None)
        raise
    except Exception as exc:  # the file's own bug: report where, not a later NoneType error
        sys.modules.pop(name, None)
        raise PluginError(f"{key}: the {role} failed to load at {where(exc, path)}: "
                          f"{type(exc).__name__}: {exc}") from None
    missing = [attr for attr in required if not hasattr(module, attr)]
    if missing:
        raise PluginError(f"{key}: the {role} {path} does not define {', '.join(missing)} "
                          f"(see README, 'The model contract')")
    _cache[path] = module
    return module
