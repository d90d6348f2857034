"""Run tiny-matrix optimisers with a single BLAS thread.

scipy's L-BFGS-B calls BLAS on 5x5-sized problems thousands of times per fit; a multithreaded
OpenBLAS wakes its thread pool for each call, which on a busy machine made one approach-3 fit 60x
slower (1.4 s instead of 23 ms, measured). threadpoolctl does this properly when it is installed;
otherwise the OpenBLAS libraries loaded in this process are asked directly through their C API.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_")
_GETTERS = ("openblas_get_num_threads", "scipy_openblas_get_num_threads", "scipy_openblas_get_num_threads64_")


def _loaded_openblas() -> list[tuple[object, object]]:
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:  # not Linux: leave threading alone
        return []
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, s) for s in _SETTERS if hasattr(lib, s)), None)
        getter = next((getattr(lib, g) for g in _GETTERS if hasattr(lib, g)), None)
        if setter is not None and getter is not None:
            found.append((setter, getter))
    return found


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Context manager: BLAS limited to one thread while it is open (threadpoolctl when installed,
    else the usual environment variables); the vectorised bootstrap is faster that way on few cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
        return
    libs = _loaded_openblas()
    previous = [getter() for _, getter in libs]
    for setter, _ in libs:
        setter(1)
    try:
        yield
    finally:
        for (setter, _), n in zip(libs, previous):
            setter(n)
