"""Builds core/_fastpath.pyx into core._fastpath and says which build it made.

SNSBUS_DEBUG_BUILD=1 builds with assertions, bounds checks and an annotated
HTML report (core/_fastpath.html) for reading the generated C.
"""

import os
import sys

from setuptools import setup

DEBUG = bool(os.environ.get("SNSBUS_DEBUG_BUILD"))


def extensions():
    from Cython.Build import cythonize
    from setuptools import Extension

    directives = {"language_level": "3", "embedsignature": True}
    if DEBUG:
        directives.update(boundscheck=True, wraparound=True, initializedcheck=True)
        cflags = ["-O0", "-g"]
    else:
        directives.update(boundscheck=False, wraparound=False, initializedcheck=False)
        cflags = ["-O3"]
    ext = Extension(
        "core._fastpath",
        ["core/_fastpath.pyx"],
        extra_compile_args=cflags,
        libraries=["dl"],
    )
    return cythonize([ext], compiler_directives=directives, annotate=DEBUG, quiet=True)


exts = extensions()
print(
    f"snsbus: building core._fastpath from core/_fastpath.pyx ({'debug' if DEBUG else 'release'} build)",
    file=sys.stderr,
)
setup(ext_modules=exts)
