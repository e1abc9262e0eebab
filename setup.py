"""Build of the one optional C extension; everything else is declared in pyproject.toml.

``vllm_consolidate._castkernel`` (the float32 -> bfloat16 cast, see its source) is ``optional``: where no C compiler
or Python headers exist, the install goes on without it and ``vllm_consolidate.casts`` casts with numpy instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vllm_consolidate._castkernel",
            ["src/vllm_consolidate/_castkernel.c"],
            optional=True,
            extra_compile_args=["-O3"],
        )
    ]
)
