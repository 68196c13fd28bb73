"""Builds the optional native extension ``lora_ipc._native`` (csrc/); all metadata is in pyproject.toml.

The extension needs only a C compiler: no CUDA toolkit, no torch headers (the driver is loaded at run
time, see csrc/vmm.c). It is optional: where it does not compile, the install goes on without it and
lora_ipc says once, at run time, that the CUDA VMM backend is unavailable (lora_ipc/core/memory/native.py).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A failed compile or link warns and leaves the package without ``_native`` instead of failing."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler at all
            self.warn(f"lora_ipc: native extension not built ({exc}); the Python paths will be used")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self.warn(f"lora_ipc: native extension {ext.name} not built ({exc}); the Python paths will be used")


setup(
    ext_modules=[
        Extension(
            "lora_ipc._native",
            sources=["csrc/vmm.c"],
            libraries=["dl"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
            py_limited_api=True,
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
