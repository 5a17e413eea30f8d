"""The C part of the package (everything else is in pyproject.toml): data_pipeline/_native.c,
the per-record work of preprocessing. Optional: without a C compiler the install still succeeds
and preprocessing runs the same computations in Python (slower, same bytes)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "data_pipeline._native",
            ["data_pipeline/_native.c"],
            extra_compile_args=["-O3", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
