"""Build driver: setuptools hands the native part to CMake (CMakeLists.txt is the single source of
the C++ build flags). Works for ``pip install .`` and ``pip install -e .``."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path = ROOT):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("MISA_FAST_BUILD_TYPE", "Release")
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            "-DMISA_FAST_BUILD_TESTS=OFF",
        ]
        try:
            import ninja  # noqa: F401

            cmake_args += ["-G", "Ninja"]
        except ImportError:
            pass
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", ext.source_dir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


setup(
    packages=find_packages(include=["misa_fast", "misa_fast.*"]) + ["misa_fast.kernels"],
    package_dir={"misa_fast.kernels": "kernels"},
    package_data={"misa_fast": ["assets/*"]},
    ext_modules=[CMakeExtension("misa_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
