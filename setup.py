"""Build lutflash._C from C11 sources (and CUDA sources when nvcc is found).

No torch at build time. Environment:
  LUTFLASH_CUDA=0          CPU-only build even where nvcc exists.
  LUTFLASH_CUDA_ARCHS      semicolon list of targets, default "80;90". Files named
                           *_sm90.cu are built only for 90a (when 90 is listed).
  CUDA_HOME / PATH         where nvcc is looked for, in that order.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def find_nvcc():
    if os.environ.get("LUTFLASH_CUDA", "1") == "0":
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidate = Path(cuda_home) / "bin" / "nvcc"
        if candidate.exists():
            return str(candidate)
    return shutil.which("nvcc")


def cudart_static_dir(nvcc):
    """The folder holding libcudart_static.a. nvcc may be a wrapper script elsewhere on PATH,
    so its own report of the toolkit root (TOP in a dry run) comes first."""
    roots = [Path(nvcc).resolve().parent.parent]
    try:
        dry = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True).stderr
        roots = [Path(line.split("=", 1)[1]).resolve() for line in dry.splitlines()
                 if line.startswith("#$ TOP=")] + roots
    except OSError:
        pass
    for root in roots + [Path("/usr/local/cuda")]:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (root / sub / "libcudart_static.a").exists():
                return str(root / sub)
    sys.exit(f"lutflash: found {nvcc} but no libcudart_static.a next to it; set CUDA_HOME "
             "or build CPU-only with LUTFLASH_CUDA=0")


def cuda_archs():
    raw = os.environ.get("LUTFLASH_CUDA_ARCHS", "80;90")
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs:
        raise RuntimeError("LUTFLASH_CUDA_ARCHS is empty")
    return archs


def gencode_flags(archs, hopper_only):
    """Machine code for each target, plus PTX of the newest so that later GPUs can run it."""
    numbers = sorted({arch.rstrip("a") for arch in archs}, key=int)
    if hopper_only:
        return ["-gencode=arch=compute_90a,code=sm_90a"] if "90" in numbers else []
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in numbers]
    return flags + [f"-gencode=arch=compute_{numbers[-1]},code=compute_{numbers[-1]}"]


class BuildExtWithCuda(build_ext):
    """Compiles cuda/*.cu with nvcc into objects linked into the C extension."""

    def build_extension(self, ext):
        nvcc = find_nvcc()
        if nvcc is not None:
            objects = self.compile_cuda(nvcc)
            if objects:
                ext.extra_objects = list(ext.extra_objects) + objects
                ext.define_macros = list(ext.define_macros) + [("LUTFLASH_WITH_CUDA", "1")]
                ext.library_dirs = list(ext.library_dirs) + [cudart_static_dir(nvcc)]
                ext.extra_link_args = list(ext.extra_link_args) + [
                    "-lcudart_static", "-lrt", "-lpthread", "-ldl", "-lstdc++"]
        else:
            print("lutflash: nvcc not found (or LUTFLASH_CUDA=0): building the CPU-only extension")
        super().build_extension(ext)

    def compile_cuda(self, nvcc):
        sources = sorted((ROOT / "cuda").glob("*.cu"))
        if not sources:
            return []
        archs = cuda_archs()
        build_dir = Path(self.build_temp) / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        include = sysconfig.get_paths()["include"]
        common = [
            "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-lineinfo", "--use_fast_math",
            "-Xptxas=--warn-on-spills", "-I", str(ROOT / "cuda"), "-I", str(ROOT / "csrc"),
            "-I", include, "--expt-relaxed-constexpr",
        ]
        jobs, objects = [], []
        # CUDA sources include the plain-C headers of csrc/ (parameter structs) too.
        headers = [*(ROOT / "cuda").glob("*.cuh"), *(ROOT / "cuda").glob("*.h"),
                   *(ROOT / "csrc").glob("*.h")]
        for src in sources:
            gencode = gencode_flags(archs, hopper_only=src.stem.endswith("_sm90"))
            if not gencode:
                continue
            obj = build_dir / (src.stem + ".o")
            objects.append(str(obj))
            stale = not obj.exists() or any(
                p.stat().st_mtime > obj.stat().st_mtime for p in [src, *headers])
            if stale:
                jobs.append([nvcc, *common, *gencode, "-c", str(src), "-o", str(obj)])
        parallel = max(1, min(len(jobs), os.cpu_count() or 1))
        running = []
        for cmd in jobs:
            print(" ".join(cmd))
            running.append(subprocess.Popen(cmd))
            if len(running) >= parallel:
                self._wait(running.pop(0))
        for proc in running:
            self._wait(proc)
        return objects

    @staticmethod
    def _wait(proc):
        if proc.wait() != 0:
            sys.exit(f"lutflash: nvcc failed: {' '.join(proc.args)}")


extension = Extension(
    "lutflash._C",
    sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c")),
    include_dirs=[str(ROOT / "csrc"), str(ROOT / "cuda")],
    extra_compile_args=["-std=c11", "-O3", "-fopenmp", "-Wall", "-Wextra", "-Werror",
                        "-Wno-missing-field-initializers", "-fno-strict-aliasing"],
    extra_link_args=["-fopenmp"],
)

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtWithCuda},
)
