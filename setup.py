"""Build hook for the optional C extension (runtime/_cext). Metadata lives in pyproject.toml.

    pip install -e .        # builds runtime/_fastnorm*.so in place (needs a C compiler)

The extension is optional: without a compiler the install still succeeds with a warning and
runtime.preprocess uses its exact numpy twin (same float32 results, slower).
"""
import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    # /fp:precise never contracts a*b+c into an FMA (MSVC contracts only under /fp:contract or /fp:fast).
    cflags = ["/O2", "/fp:precise"]
else:
    # -ffp-contract=off: x*scale+bias must round twice, exactly as numpy does (no FMA fusion).
    cflags = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c11"]

setup(
    ext_modules=[
        Extension(
            "runtime._fastnorm",
            sources=["runtime/_cext/fastnorm.c"],
            depends=["runtime/_cext/fastnorm_tile.h", "runtime/_cext/fastnorm_planar.h",   # included fragments
                     "runtime/_cext/fastnorm_neon.h"],
            extra_compile_args=cflags,
            optional=True,
        )
    ]
)
