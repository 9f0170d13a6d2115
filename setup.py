"""Build the optional Cython relay extension.

``KUBERUN_NO_EXTENSIONS=1`` skips it (the pure-Python relay is then used).
``KUBERUN_DEBUG=1`` adds annotations and line tracing for coverage.
If ``kuberun/_relay.c`` exists (as in the sdist) it is compiled without Cython.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
NO_EXTENSIONS = os.environ.get("KUBERUN_NO_EXTENSIONS", "") not in ("", "0")
DEBUG = os.environ.get("KUBERUN_DEBUG", "") not in ("", "0")


def _extensions() -> list[Extension]:
    if NO_EXTENSIONS or sys.implementation.name != "cpython":
        return []
    pyx = HERE / "kuberun" / "_relay.pyx"
    c_file = HERE / "kuberun" / "_relay.c"
    if not pyx.exists() and not c_file.exists():
        return []
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
    cflags = ["-O2"] if not DEBUG else ["-O0", "-g"]
    use_cython = pyx.exists() and (
        DEBUG
        or not c_file.exists()
        or c_file.stat().st_mtime < pyx.stat().st_mtime
    )
    if use_cython:
        from Cython.Build import cythonize

        directives = {
            "language_level": "3",
            "embedsignature": True,
            "freethreading_compatible": True,
        }
        if DEBUG:
            directives["linetrace"] = True
        ext = Extension(
            "kuberun._relay",
            ["kuberun/_relay.pyx"],
            extra_compile_args=cflags,
            define_macros=macros,
        )
        return list(cythonize([ext], compiler_directives=directives, annotate=DEBUG))
    return [
        Extension(
            "kuberun._relay",
            ["kuberun/_relay.c"],
            extra_compile_args=cflags,
            define_macros=macros,
        )
    ]


setup(ext_modules=_extensions())
