"""Reading pickles that may only hold numpy arrays and plain containers, without running code from them.

Unpickling calls whatever globals the file names, so a pickle can run arbitrary code. Two kinds of
file the project reads are pickles of data only: the on-the-fly SBIR coordinate files (a dict of
numpy arrays) and the weights of a trained RLModule (RLlib's `module_state.pkl`, an OrderedDict of
numpy arrays and floats). `load_numpy_pickle` reads both through `NumpyOnlyUnpickler`, which
resolves only the globals that rebuild numpy arrays, numpy scalars and builtin containers and
refuses any other by name before anything runs.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from sketch_env.errors import DataError

# The functions numpy's own pickles name, taken from numpy itself so that both module spellings
# (numpy.core before 2.0, numpy._core since) resolve without importing the deprecated alias.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 rebuilds arrays from a buffer
_SCALAR = np.float64(0).__reduce__()[0]


def _latin1_encode(text: str, encoding: str) -> bytes:
    """How pickle protocols 0-2 store bytes (`_codecs.encode(text, "latin1")`), with no other codec."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed with 'latin1', got {encoding!r}")
    return text.encode("latin1")


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): OrderedDict,  # what torch's state_dict() returns
    # Containers, under their Python 3 and (in protocol 0-2 pickles) Python 2 module names.
    **{(module, c.__name__): c for module in ("builtins", "__builtin__") for c in (dict, list, tuple, set, frozenset)},
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays, numpy scalars and builtin containers.

    path: the file, named in errors; what: what kind of file it is, for the error ("coordinate pickle").
    """

    def __init__(self, file, path: Path, what: str):
        super().__init__(file)
        self._path = path
        self._what = what

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: refusing to load the pickle: it asks for the global {module}.{name}, "
                f"but the {self._what} may only hold numpy arrays and plain containers"
            ) from None


def load_numpy_pickle(path: str | Path, what: str) -> Any:
    """The object pickled in `path`, rebuilt by `NumpyOnlyUnpickler`.

    what: what kind of file it is ("coordinate pickle"), for the errors. Raises DataError naming the file
    when it is missing, truncated or corrupt, or names any global beyond numpy arrays and containers.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        try:
            return NumpyOnlyUnpickler(f, path, what).load()
        except DataError:
            raise
        except Exception as e:  # a corrupt pickle can fail with almost any exception type
            raise DataError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from None
