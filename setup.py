from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gobo._native",
            sources=["src/gobo/csrc/native.c", "src/gobo/csrc/kernels.c", "src/gobo/csrc/qgemm.c"],
            depends=["src/gobo/csrc/gobo_api.h", "src/gobo/csrc/qmat.h"],
            extra_compile_args=["-O3", "-std=c11", "-fvisibility=hidden", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ]
)
