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
        dry = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True).stderr
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
                # a rebuilt object must relink the extension (build_ext looks at sources and
                # depends only)
                ext.depends = list(ext.depends) + objects
                ext.define_macros = list(ext.define_macros) + [("LUTFLASH_WITH_CUDA", "1")]
                ext.library_dirs = list(ext.library_dirs) + [cudart_static_dir(nvcc)]
                ext.extra_link_args = list(ext.extra_link_args) + [
                    "-lcudart_static", "-lrt", "-lpthread", "-ldl", "-lstdc++"]
        else:
            print("lutflash: nvcc not found (or LUTFLASH_CUDA=0): building the CPU-only extension")
        super().build_extension(ext)

    def compile_cuda(self, nvcc):
        """Objects live in build/cuda-<archs>/ of the checkout (not the build folder of the
        moment, which pip makes afresh for every install), so a second install recompiles only
        the sources whose own text, included headers (nvcc -MD) or command line changed."""
        sources = sorted((ROOT / "cuda").glob("*.cu"))
        if not sources:
            return []
        archs = cuda_archs()
        build_dir = ROOT / "build" / ("cuda-" + "-".join(archs))
        build_dir.mkdir(parents=True, exist_ok=True)
        # paths relative to the checkout (nvcc runs there): the recorded command and the
        # dependency lists then hold for a copy of the tree elsewhere too
        common = [
            "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-lineinfo", "--use_fast_math",
            "-Xptxas=--warn-on-spills", "-I", "cuda", "-I", "csrc", "--expt-relaxed-constexpr",
        ]
        jobs, objects = [], []
        for src in sources:
            gencode = gencode_flags(archs, hopper_only=src.stem.endswith("_sm90"))
            if not gencode:
                continue
            obj = build_dir / (src.stem + ".o")
            deps, cmd_file = obj.with_suffix(".d"), obj.with_suffix(".cmd")
            objects.append(str(obj))
            rel = lambda p: str(p.relative_to(ROOT))  # noqa: E731
            flags = [*common, *gencode, "-MD", "-MF", rel(deps), "-c", rel(src), "-o", rel(obj)]
            if self._stale(obj, deps, cmd_file, " ".join(flags)):
                jobs.append(([nvcc, *flags], cmd_file))
        parallel = max(1, min(len(jobs), os.cpu_count() or 1))
        running = []
        for cmd, cmd_file in jobs:
            print(" ".join(cmd))
            running.append((subprocess.Popen(cmd, cwd=ROOT), cmd_file))
            if len(running) >= parallel:
                self._wait(*running.pop(0))
        for proc, cmd_file in running:
            self._wait(proc, cmd_file)
        return objects

    @staticmethod
    def _stale(obj, deps, cmd_file, cmd):
        """True unless obj exists, was built with the same flags, and is newer than every
        file of the checkout that its dependency list names (the source and our headers;
        the toolkit's headers are left out)."""
        try:
            if cmd_file.read_text() != cmd:
                return True
            built = obj.stat().st_mtime
            text = deps.read_text().replace("\\\n", " ")
            files = [f for f in text.split(":", 1)[1].split() if not os.path.isabs(f)]
            return not files or any((ROOT / f).stat().st_mtime > built for f in files)
        except (OSError, IndexError):
            return True

    @staticmethod
    def _wait(proc, cmd_file):
        if proc.wait() != 0:
            cmd_file.unlink(missing_ok=True)
            sys.exit(f"lutflash: nvcc failed: {' '.join(proc.args)}")
        cmd_file.write_text(" ".join(proc.args[1:]))


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
