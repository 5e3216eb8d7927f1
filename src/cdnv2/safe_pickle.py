"""Read pickles without running any code from them.

``pickle.load`` calls whatever callable a file names (``os.system``, ``eval``, ...), so a
downloaded dataset folder could run code on the machine that reads it. The CIFAR
python batches are pickles of plain data: dicts, lists, strings, ints and numpy
``uint8`` arrays. :func:`load_plain_data` unpickles with an allowlist of exactly the
globals those need (numpy's array and dtype reconstruction, and the builtin container
types); any other global stops the read before it is called, with
:class:`ForbiddenGlobal` naming it as ``module.name``.

:func:`pickled_globals` lists the globals a pickle stream names, by parsing its opcodes
(``pickletools``) without unpickling: what a refused checkpoint would have called.
"""
from __future__ import annotations

import pickle
import pickletools
from typing import Any, BinaryIO, Iterator


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist (``self.name``: ``module.name``)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"forbidden global {name}")
        self.name = name


_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import builtins
    import codecs

    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 writes Python 3 bytes
    }
    # Files written by numpy 1.x (and Python 2, as the originals were) name numpy.core.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer  # protocol 5 arrays
    for module in ("builtins", "__builtin__"):  # __builtin__: Python 2's name
        allowed.update({(module, name): getattr(builtins, name) for name in _BUILTINS})
    return allowed


class _PlainDataUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 str (the originals) -> str
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"{module}.{name}") from None


def load_plain_data(file: BinaryIO) -> Any:
    """Unpickle ``file`` allowing only plain data and numpy arrays; raise
    :class:`ForbiddenGlobal` before any other global is looked up, let alone called."""
    return _PlainDataUnpickler(file, _allowed_globals()).load()


_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
            "BINUNICODE8"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


def pickled_globals(file: BinaryIO) -> Iterator[str]:
    """``module.name`` of each global the pickles in ``file`` name, in order; parses the
    opcodes only (nothing is imported or called) and stops quietly at bytes that are not
    a pickle (e.g. the raw tensor data after a legacy ``torch.save`` file's pickles)."""
    while True:
        try:
            yield from _globals_of_one_pickle(file)
        except (ValueError, EOFError):
            return


def _globals_of_one_pickle(file: BinaryIO) -> Iterator[str]:
    memo: dict[int, Any] = {}
    strings: list[Any] = []  # values pushed by string and memo-get opcodes, the latest last
    last: Any = None  # the value the latest pushing opcode left on top of the stack
    ops = 0
    for op, arg, _ in pickletools.genops(file):
        ops += 1
        name = op.name
        if name in ("GLOBAL", "INST"):
            yield arg.replace(" ", ".", 1)
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            yield f"{strings[-2]}.{strings[-1]}"
        if name in _STRINGS or name in _GETS:
            last = arg if name in _STRINGS else memo.get(arg)
            strings.append(last)
        elif name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in _PUTS:
            memo[arg] = last
        elif op.stack_after:
            last = None
    if not ops:
        raise EOFError
