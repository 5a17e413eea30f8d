"""The per-record work of preprocessing in C (data_pipeline/_native.c, built by setup.py), or
None: where it was not built (no C compiler at install), or LLM_JEPA_PURE_PYTHON=1 asks for the
Python paths. Both give the same bytes; the C one spares a Python call per record."""

import os

__all__ = ["native"]

native = None
if os.environ.get("LLM_JEPA_PURE_PYTHON") != "1":
    try:
        from data_pipeline import _native as native
    except ImportError:
        pass
