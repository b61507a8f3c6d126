"""Builds mpq's compiled part through the project's one CMake description (CMakeLists.txt):
libmpq_ops.so and the stub mpq._C. Everything else (name, version, dependencies, packages,
package data) is in pyproject.toml.

    pip install --no-build-isolation -e .      # editable: libmpq_ops.so and _C land in python/mpq/
    pip wheel --no-build-isolation --no-deps -w dist .   # a wheel (scripts/wheel_check.sh tests one)

Environment: MPQ_ENABLE_CUDA=0 skips the CUDA kernels; MPQ_CUDA_ARCHITECTURES overrides the
architecture list (default "90": sm_90 code plus compute_90 PTX); MPQ_BUILD_DIR keeps the CMake
build tree in a known place (default: build/python, which scripts/setup.sh builds and
scripts/test.sh and scripts/wheel_check.sh reuse: a second build compiles only what changed).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cmake_executable() -> str:
    # The pip cmake beside this Python first: the system one may be older than 3.26.
    local = Path(sys.executable).parent / "cmake"
    return str(local) if local.exists() else (shutil.which("cmake") or "cmake")


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("MPQ_BUILD_DIR", ROOT / "build" / "python"))
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'lib'}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DMPQ_ENABLE_CUDA={'OFF' if os.environ.get('MPQ_ENABLE_CUDA', '1') == '0' else 'ON'}",
        ]
        if "MPQ_CUDA_ARCHITECTURES" in os.environ:
            args.append(f"-DMPQ_CUDA_ARCHITECTURES={os.environ['MPQ_CUDA_ARCHITECTURES']}")
        ninja = shutil.which("ninja", path=str(Path(sys.executable).parent)) or shutil.which("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        cmake = _cmake_executable()
        subprocess.check_call([cmake, str(ROOT), *args], cwd=build_dir)
        jobs = os.environ.get("MPQ_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(
            [cmake, "--build", ".", "--target", "mpq_ops", "mpq_python", "--parallel", jobs], cwd=build_dir
        )
        # The stub finds libmpq_ops.so beside itself ($ORIGIN). An editable install imports
        # from python/mpq/, so the library goes there as well as into the build tree.
        targets = {out_dir}
        if getattr(self, "editable_mode", False) or self.inplace:
            targets.add(ROOT / "python" / "mpq")
        built = build_dir / "lib"
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built / "libmpq_ops.so", target / "libmpq_ops.so")
            stub = next(built.glob("_C.*.so"))
            shutil.copy2(stub, target / Path(self.get_ext_fullpath(ext.name)).name)


setup(
    ext_modules=[CMakeExtension("mpq._C")],
    cmdclass={"build_ext": CMakeBuild},
)
