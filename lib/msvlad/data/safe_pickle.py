"""Restricted unpickling for ground-truth and training-db pickles (gnd_*.pkl, SfM-120k db).

Those files are plain dicts of lists, strings, numbers and numpy arrays, so the unpickler admits
only the globals needed to rebuild them; anything else (``os.system``, ``subprocess.Popen``,
``builtins.eval``...) raises `UnsafePickleError` before it can run.

A pickle is also held to the size of its file, so that a few kilobytes cannot ask for gigabytes:

- Allocation: every allowed constructor whose argument is a size (``bytearray(n)``,
  ``numpy.ndarray(shape)``, numpy's ``_reconstruct``/``scalar``/``dtype`` and an array's state)
  is charged the bytes it would allocate, against `load_budget` of the file size in total, before
  it runs. An object array's state must hold exactly one object per element (numpy itself reads
  past a shorter list and crashes).
- Elements: the loaded object is walked as the tree that code reading it sees, a reference shared
  by memo counted once per place it appears (a list of 1000 references to a list of 1000
  references to a list of 1000 numbers is 10^9 elements, as `copy`, `dataclasses.asdict` or
  `numpy.asarray` would make it), and refused past `load_budget` elements; so are objects that
  contain themselves and nesting deeper than `MAX_DEPTH`.
- Opcodes that build objects without going through an allowed callable (NEWOBJ, INST, OBJ) are
  refused; BUILD (``__setstate__``) is admitted only for numpy arrays and dtypes, with its state
  checked as above.

The unpickler is the pure-Python `pickle._Unpickler` (its opcode table is what the checks above
hook into); ground-truth and training-db pickles are a few MB at most.
"""

from __future__ import annotations

import _compat_pickle
import io
import itertools
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from msvlad.errors import InputError

# numpy >= 2 keeps the implementation in numpy._core; importing the old alias warns
_NUMPY_CORE = getattr(np, "_core", None) or np.core

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

MIN_BUDGET = 1 << 20  # elements (and bytes allocated) any pickle may produce
BUDGET_PER_BYTE = 16  # plus this many per byte of the file
MAX_DEPTH = 100  # containers nested deeper than this are refused (a gnd file nests 4 deep)
# the text encodings `_codecs.encode` may apply (protocol-2 bytes are latin-1 text)
_CODECS = frozenset({"latin1", "latin_1", "iso8859_1", "iso_8859_1", "l1", "utf8", "utf_8"})
_REFUSED_OPCODES = {
    pickle.NEWOBJ[0]: "NEWOBJ",
    pickle.NEWOBJ_EX[0]: "NEWOBJ_EX",
    pickle.INST[0]: "INST",
    pickle.OBJ[0]: "OBJ",
}


def load_budget(size: int) -> int:
    """Most elements, and most bytes allocated by constructors, a `size`-byte pickle may make."""
    return MIN_BUDGET + BUDGET_PER_BYTE * size


class UnsafePickleError(InputError, pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list (it may execute code) or past its size."""


class RestrictedUnpickler(pickle._Unpickler):
    """`pickle._Unpickler` that admits only plain containers and numpy arrays, within a budget."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(
        self,
        file: io.BufferedIOBase,
        *,
        source: str = "<pickle>",
        budget: int = MIN_BUDGET,
        **kwargs: Any,
    ) -> None:
        super().__init__(file, **kwargs)
        self.source = source
        self.budget = budget
        self.allocated = 0
        # guarded constructors by (last module component, name); one ndarray wrapper per load,
        # so that `_reconstruct` can tell the subtype it is given is the one find_class returned
        self._ndarray_guard = self._ndarray
        self._guards: dict[tuple[str, str], Callable[..., Any]] = {
            ("builtins", "bytes"): self._guard_bytes(bytes),
            ("builtins", "bytearray"): self._guard_bytes(bytearray),
            ("builtins", "str"): self._str,
            ("_codecs", "encode"): self._encode,
            ("numpy", "ndarray"): self._ndarray_guard,
            ("multiarray", "ndarray"): self._ndarray_guard,
            ("numpy", "dtype"): self._dtype,
            ("multiarray", "dtype"): self._dtype,
            ("multiarray", "_reconstruct"): self._reconstruct,
            ("multiarray", "scalar"): self._scalar,
            ("numeric", "_frombuffer"): self._frombuffer,
        }

    # ------------------------------------------------------------------ errors and accounting

    def refuse(self, what: str) -> UnsafePickleError:
        """The one-line error naming this pickle's file."""
        return UnsafePickleError(f"{self.source}: {what}")

    def charge(self, nbytes: int, what: str) -> None:
        """Count `nbytes` about to be allocated by `what`; refuse past the file's budget."""
        if nbytes > self.budget - self.allocated:
            raise self.refuse(
                f"{what} would allocate {nbytes} bytes, past the budget of this pickle "
                f"({self.budget} bytes in total for its size; refused)"
            )
        self.allocated += nbytes

    def _count(self, shape: Any, what: str) -> int:
        """Elements of an array `shape` (non-negative integers), refused if absurd."""
        dims = shape if isinstance(shape, tuple | list) else (shape,)
        if not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in dims):
            raise self.refuse(f"{what}: shape {shape!r} is not a tuple of integers (refused)")
        if any(d < 0 for d in dims):
            raise self.refuse(f"{what}: shape {shape!r} has a negative size (refused)")
        return math.prod(int(d) for d in dims)

    def _charge_array(self, shape: Any, dtype: Any, what: str) -> int:
        """Charge an array of `shape` and `dtype`; returns its element count."""
        n = self._count(shape, what)
        self.charge(n * np.dtype(dtype).itemsize, f"{what} of shape {shape!r}")
        return n

    # ------------------------------------------------------------------ guarded constructors

    def _guard_bytes(self, cls: type) -> Callable[..., Any]:
        def make(*args: Any) -> Any:
            if args and isinstance(args[0], int | np.integer):
                self.charge(args[0], f"{cls.__name__}({args[0]})")
            return cls(*args)

        return make

    def _str(self, *args: Any) -> str:
        # str() of a container is its repr, which expands every shared reference
        if args and not isinstance(args[0], str | bytes | bytearray | int | float):
            raise self.refuse(f"str() of a {type(args[0]).__name__} (refused)")
        return str(*args)

    def _encode(self, obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        import codecs

        if not isinstance(obj, str) or not isinstance(encoding, str):
            raise self.refuse("_codecs.encode of something other than text (refused)")
        if encoding.lower().replace("-", "_") not in _CODECS:
            raise self.refuse(f"_codecs.encode with encoding {encoding!r} (refused)")
        return codecs.encode(obj, encoding, errors)

    def _ndarray(self, shape: Any, dtype: Any = float, *rest: Any) -> np.ndarray:
        if rest:  # buffer, offset, strides, order: views of memory no gnd file needs
            raise self.refuse("numpy.ndarray over a buffer (refused)")
        self._charge_array(shape, dtype, "numpy.ndarray")
        return np.ndarray(shape, dtype)

    def _dtype(self, *args: Any) -> np.dtype:
        dt = np.dtype(*args)
        if dt.itemsize > self.budget:
            raise self.refuse(f"numpy.dtype of {dt.itemsize} bytes per element (refused)")
        return dt

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not self._ndarray_guard:
            raise self.refuse(f"_reconstruct of {subtype!r}, not numpy.ndarray (refused)")
        self._charge_array(shape, dtype, "numpy _reconstruct")
        return _NUMPY_CORE.multiarray._reconstruct(np.ndarray, shape, dtype)

    def _scalar(self, dtype: Any, *args: Any) -> Any:
        if not isinstance(dtype, np.dtype):
            raise self.refuse(f"numpy scalar of {type(dtype).__name__}, not a dtype (refused)")
        self.charge(dtype.itemsize, f"numpy scalar of dtype {dtype}")
        return _NUMPY_CORE.multiarray.scalar(dtype, *args)

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        n = self._count(shape, "numpy _frombuffer")
        if n * np.dtype(dtype).itemsize != self._nbytes(buf, "numpy _frombuffer"):
            raise self.refuse(f"numpy _frombuffer: shape {shape!r} does not fit the buffer")
        return _NUMPY_CORE.numeric._frombuffer(buf, dtype, shape, order)

    def _nbytes(self, data: Any, what: str) -> int:
        """Length in bytes of raw data (bytes-like, or latin-1 text from a Python 2 pickle)."""
        if isinstance(data, str):
            return len(data)
        try:
            return memoryview(data).nbytes
        except TypeError:
            raise self.refuse(f"{what}: data is a {type(data).__name__}, not bytes") from None

    # ------------------------------------------------------------------ globals and opcodes

    def find_class(self, module: str, name: str) -> Any:
        """Resolve `module.name` only if it is on the allow-list, else raise UnsafePickleError."""
        if (module, name) not in ALLOWED_GLOBALS:
            # Python 2 names (__builtin__.set, ...), as the base class would map them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) not in ALLOWED_GLOBALS:
            raise self.refuse(
                f"refused to unpickle global {module}.{name} "
                "(only plain containers, numbers, strings and numpy arrays are allowed)"
            )
        guard = self._guards.get((module.rsplit(".", 1)[-1], name))
        if guard is not None:
            return guard
        if module.startswith("numpy.core"):
            module = _NUMPY_CORE.__name__ + module[len("numpy.core") :]
        return super().find_class(module, name)

    def _build(self) -> None:
        state = self.stack[-1]
        inst = self.stack[-2]
        if isinstance(inst, np.ndarray):
            self._check_array_state(state)
        elif isinstance(inst, np.dtype):
            self._check_plain(state, "numpy.dtype state")
        else:
            raise self.refuse(f"setting the state of a {type(inst).__name__} (refused)")
        pickle._Unpickler.load_build(self)
        if isinstance(inst, np.dtype) and inst.itemsize > self.budget:
            raise self.refuse(f"numpy.dtype of {inst.itemsize} bytes per element (refused)")

    def _check_array_state(self, state: Any) -> None:
        """An array state (version, shape, dtype, fortran, data) whose data fits its shape."""
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise self.refuse("numpy array state is not a 4- or 5-tuple (refused)")
        shape, dtype, _, data = state[-4:]
        if not isinstance(dtype, np.dtype):
            raise self.refuse("numpy array state without a dtype (refused)")
        n = self._charge_array(shape, dtype, "numpy array")
        if dtype.hasobject:
            if dtype.kind != "O" or dtype.fields:
                raise self.refuse(f"numpy array of structured dtype {dtype} with objects (refused)")
            if not isinstance(data, list) or len(data) != n:
                raise self.refuse(
                    f"numpy object array of shape {shape!r} with "
                    f"{len(data) if isinstance(data, list) else 'no list of'} objects (refused)"
                )
            return
        have = self._nbytes(data, "numpy array state")
        if have != n * dtype.itemsize:
            raise self.refuse(
                f"numpy array of shape {shape!r}, dtype {dtype}: {have} bytes of data (refused)"
            )

    def _check_plain(self, value: Any, what: str, depth: int = 0) -> None:
        """Only None, numbers, strings, dtypes and tuples/lists/dicts of them, ints bounded."""
        if depth > MAX_DEPTH:
            raise self.refuse(f"{what} nested too deep (refused)")
        if isinstance(value, tuple | list):
            for v in value:
                self._check_plain(v, what, depth + 1)
        elif isinstance(value, dict):
            for v in itertools.chain.from_iterable(value.items()):
                self._check_plain(v, what, depth + 1)
        elif isinstance(value, int) and abs(value) > self.budget:
            raise self.refuse(f"{what} holds the size {value} (refused)")
        elif not (value is None or isinstance(value, bool | int | float | str | bytes | np.dtype)):
            raise self.refuse(f"{what} holds a {type(value).__name__} (refused)")


def _opcode_refuser(name: str) -> Callable[[RestrictedUnpickler], None]:
    def refuse(self: RestrictedUnpickler) -> None:
        raise self.refuse(f"pickle opcode {name} (builds objects outside the allow-list; refused)")

    return refuse


for _code, _name in _REFUSED_OPCODES.items():
    RestrictedUnpickler.dispatch[_code] = _opcode_refuser(_name)
RestrictedUnpickler.dispatch[pickle.BUILD[0]] = RestrictedUnpickler._build


# ----------------------------------------------------------------------------- element budget


def _children(obj: Any, refuse: Callable[[str], Exception]) -> Iterable[Any] | None:
    """What `obj` holds as code reading it sees it, or None for a leaf."""
    if isinstance(obj, dict):
        return itertools.chain.from_iterable(obj.items())
    if isinstance(obj, list | tuple | set | frozenset):
        return obj
    if isinstance(obj, slice):
        return (obj.start, obj.stop, obj.step)
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        if obj.dtype.kind != "O" or obj.dtype.fields:
            raise refuse(f"numpy array of structured dtype {obj.dtype} with objects (refused)")
        return obj.ravel().tolist()
    return None


def check_tree_size(obj: Any, limit: int, source: str) -> int:
    """Elements of `obj` as a tree (shared references counted where they appear); refuse > limit.

    Linear in the distinct containers (sizes are memoised by identity); refuses an object that
    contains itself and nesting deeper than MAX_DEPTH. Returns the count.
    """

    def refuse(what: str) -> UnsafePickleError:
        return UnsafePickleError(f"{source}: {what}")

    def leaf(x: Any) -> int | None:
        if isinstance(x, np.ndarray) and not x.dtype.hasobject:
            return max(1, x.size)
        return None

    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    # frames: [object, iterator over its children, size so far]
    frames: list[list[Any]] = []

    def enter(x: Any) -> int | None:
        """The size of `x` if known now; else push a frame for it and return None."""
        size = leaf(x)
        if size is not None:
            return size
        key = id(x)
        if key in sizes:
            return sizes[key]
        kids = _children(x, refuse)
        if kids is None:
            return 1
        if key in on_path:
            raise refuse(f"a {type(x).__name__} that contains itself (refused)")
        if len(frames) >= MAX_DEPTH:
            raise refuse(f"containers nested deeper than {MAX_DEPTH} (refused)")
        on_path.add(key)
        frames.append([x, iter(kids), 1])
        return None

    total = enter(obj)
    while frames:
        frame = frames[-1]
        for child in frame[1]:
            size = enter(child)
            if size is None:
                break  # descend into the child first
            frame[2] += size
            if frame[2] > limit:
                raise refuse(
                    f"holds more than {limit} elements once shared references are expanded "
                    "(the budget for its size; refused)"
                )
        else:
            frames.pop()
            key = id(frame[0])
            on_path.discard(key)
            sizes[key] = frame[2]
            if frames:
                frames[-1][2] += frame[2]
                if frames[-1][2] > limit:
                    raise refuse(
                        f"holds more than {limit} elements once shared references are expanded "
                        "(the budget for its size; refused)"
                    )
            else:
                total = frame[2]
    assert total is not None
    if total > limit:
        raise refuse(f"holds {total} elements, past the budget of {limit} for its size (refused)")
    return total


# ----------------------------------------------------------------------------- entry points


def loads_pickle(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle bytes through the restricted unpickler, within the budget of their size.

    Python 2 pickles are decoded as latin-1.
    """
    budget = load_budget(len(data))
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), source=source, budget=budget).load()
    except UnicodeDecodeError:
        # Python 2 str objects (and numpy buffers inside them) need latin-1 to round-trip bytes
        obj = RestrictedUnpickler(
            io.BytesIO(data), source=source, budget=budget, encoding="latin1"
        ).load()
    check_tree_size(obj, budget, source)
    return obj


def load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle file that may only hold plain containers and numpy arrays."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a pickle file") from None
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
        KeyError,
        OverflowError,
        MemoryError,
        RecursionError,
        struct.error,
    ) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise InputError(f"{path}: not a readable pickle ({reason[:300]})") from None
