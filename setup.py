"""Build the optional Cython relay extension.

``KUBERUN_NO_EXTENSIONS=1`` skips it (the pure-Python relay is then used).
``KUBERUN_DEBUG=1`` adds annotations and line tracing for coverage.

``kuberun/_relay.c`` is generated (and git-ignored). The sdist ships a non-tracing copy
generated from the current ``.pyx`` (regenerated whenever Cython is at hand), so building
from the sdist compiles that C and needs no Cython: Cython is requested as a build dependency
(``setup_requires``, which PEP 517 frontends turn into a dynamic build requirement) only
when the C file is missing, older than the ``.pyx``, or from a line-tracing debug build.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext
from setuptools.command.sdist import sdist as _sdist

HERE = Path(__file__).parent
PYX = HERE / "kuberun" / "_relay.pyx"
C_FILE = HERE / "kuberun" / "_relay.c"
CYTHON_REQUIREMENT = "Cython>=3.1,<3.4"  # keep _have_cython() in step
NO_EXTENSIONS = os.environ.get("KUBERUN_NO_EXTENSIONS", "") not in ("", "0")
DEBUG = os.environ.get("KUBERUN_DEBUG", "") not in ("", "0")


def _directives(debug: bool) -> dict[str, object]:
    directives: dict[str, object] = {
        "language_level": "3",
        "embedsignature": True,
        "freethreading_compatible": True,
    }
    if debug:
        directives["linetrace"] = True
    return directives


def _c_is_traced() -> bool:
    """Whether the existing C file came from a ``KUBERUN_DEBUG=1`` (line-tracing) build."""
    return C_FILE.exists() and b"__Pyx_TraceLine" in C_FILE.read_bytes()


def _c_is_usable() -> bool:
    """Whether ``_relay.c`` can be compiled as it is: present, not older than the ``.pyx``
    (when there is one) and not a tracing build."""
    if not C_FILE.exists():
        return False
    if PYX.exists() and C_FILE.stat().st_mtime < PYX.stat().st_mtime:
        return False
    return not _c_is_traced()


def _cythonize(debug: bool, force: bool) -> None:
    """Regenerate ``kuberun/_relay.c`` from the ``.pyx``."""
    from Cython.Build import cythonize

    cythonize(
        [Extension("kuberun._relay", [str(PYX.relative_to(HERE))])],
        compiler_directives=_directives(debug),
        annotate=debug,
        force=force,
    )


def _have_cython() -> bool:
    """Whether a Cython within ``CYTHON_REQUIREMENT`` is installed (without importing it)."""
    try:
        version = metadata.version("Cython")
    except metadata.PackageNotFoundError:
        return False
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (3, 1) <= major_minor < (3, 4)


def _needs_cython() -> bool:
    if NO_EXTENSIONS or sys.implementation.name != "cpython" or not PYX.exists():
        return False
    return DEBUG or not _c_is_usable()


def _extensions() -> list[Extension]:
    if NO_EXTENSIONS or sys.implementation.name != "cpython":
        return []
    if not PYX.exists() and not C_FILE.exists():
        return []
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
    cflags = ["-O0", "-g"] if DEBUG else ["-O2"]
    return [
        Extension(
            "kuberun._relay",
            ["kuberun/_relay.c"],
            extra_compile_args=cflags,
            define_macros=macros,
        )
    ]


class build_ext(_build_ext):
    """Regenerate ``_relay.c`` when needed right before compiling it, so that computing the
    build requirements never imports Cython."""

    def run(self) -> None:
        if self.extensions and _needs_cython():
            # A debug build always regenerates (an up-to-date release C has no tracing
            # calls); a release build after a debug one must drop them again.
            _cythonize(debug=DEBUG, force=DEBUG or _c_is_traced())
        super().run()


class sdist(_sdist):
    """Ship a freshly generated, non-tracing ``_relay.c`` so the sdist builds without Cython."""

    def run(self) -> None:
        if PYX.exists():
            if _have_cython():
                _cythonize(debug=False, force=True)
            elif not _c_is_usable():
                raise RuntimeError(
                    f"building the sdist needs {CYTHON_REQUIREMENT} to generate "
                    "kuberun/_relay.c (it is missing, stale or a KUBERUN_DEBUG build)"
                )
        if not C_FILE.exists():
            raise RuntimeError("kuberun/_relay.c is missing; the sdist must ship it")
        super().run()


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": build_ext, "sdist": sdist},
    # Only when missing: PEP 517 frontends then install it into the build environment; a
    # direct `setup.py build_ext` with Cython at hand (make build) gets no deprecation noise.
    setup_requires=[CYTHON_REQUIREMENT] if _needs_cython() and not _have_cython() else [],
)
