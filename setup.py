from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gobo._native",
            sources=["src/gobo/csrc/native.c", "src/gobo/csrc/kernels.c"],
            extra_compile_args=["-O3", "-std=c11", "-fvisibility=hidden"],
        )
    ]
)
