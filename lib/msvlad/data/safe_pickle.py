"""Restricted unpickling for ground-truth and training-db pickles (gnd_*.pkl, SfM-120k db).

Those files are plain dicts of lists, strings, numbers and numpy arrays, so the unpickler admits
only the globals needed to rebuild them; anything else (``os.system``, ``subprocess.Popen``,
``builtins.eval``...) raises `UnsafePickleError` before it can run.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
from pathlib import Path
from typing import Any

from msvlad.errors import InputError

# (module, name) pairs the unpickler may resolve. numpy 2 moved `numpy.core` to `numpy._core`;
# pickles written by either generation name one or the other, so both spellings are listed.
_NUMPY_NAMES = {
    "multiarray._reconstruct",
    "multiarray.scalar",
    "numeric._frombuffer",  # protocol-5 pickles of contiguous arrays
}
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", name)
        for name in (
            "set",
            "frozenset",
            "list",
            "dict",
            "tuple",
            "str",
            "bytes",
            "bytearray",
            "int",
            "float",
            "complex",
            "bool",
            "slice",
        )
    }
    | {
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
    | {
        (f"{pkg}.{name.rsplit('.', 1)[0]}", name.rsplit(".", 1)[1])
        for pkg in ("numpy.core", "numpy._core")
        for name in _NUMPY_NAMES
    }
    | {
        (f"{pkg}.multiarray", name)
        for pkg in ("numpy.core", "numpy._core")
        for name in ("ndarray", "dtype")
    }
)


class UnsafePickleError(InputError, pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list (it may execute code)."""


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` admits only plain containers and numpy arrays."""

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<pickle>", **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """Resolve `module.name` only if it is on the allow-list, else raise UnsafePickleError."""
        if (module, name) not in ALLOWED_GLOBALS:
            # Python 2 names (__builtin__.set, ...), as the base class would map them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.source}: refused to unpickle global {module}.{name} "
                "(only plain containers, numbers, strings and numpy arrays are allowed)"
            )
        if module.startswith("numpy.core"):
            # numpy >= 2 keeps the implementation in numpy._core; importing the old alias warns
            import numpy as np

            if hasattr(np, "_core"):
                module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def loads_pickle(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle bytes through the restricted unpickler (Python 2 pickles are decoded as latin-1)."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except UnicodeDecodeError:
        # Python 2 str objects (and numpy buffers inside them) need latin-1 to round-trip bytes
        return RestrictedUnpickler(io.BytesIO(data), source=source, encoding="latin1").load()


def load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle file that may only hold plain containers and numpy arrays."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    try:
        return loads_pickle(data, source=str(path))
    except UnsafePickleError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
    ) as err:
        raise InputError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
