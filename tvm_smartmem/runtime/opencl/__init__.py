"""The OpenCL runtime the PyPI TVM wheel lacks: build it (once, cached), pick a device, load it.

The C++ sources next to this file implement TVM's ``DeviceAPI`` for OpenCL (buffers, RGBA
image2d-array textures for the ``global.texture*`` scopes, copies, sync) and the ``opencl``
module (build kernels from TVM's generated source, launch them with the sizes the host code
passes).  They are compiled against the headers shipped inside the installed ``apache-tvm`` and
``apache-tvm-ffi`` wheels, into ``<cache>/opencl-<hash>/libtvm_runtime_opencl.so``; the hash
covers the sources and the TVM / ffi versions, so an upgrade rebuilds.

Device choice.  The library loads an OpenCL ICD loader at run time (no link-time dependency):
``TVM_SMARTMEM_OPENCL_LIB`` if set, else the system's ``libOpenCL.so.1``, else the loader bundled
with ``pyopencl``.  It then prefers a vendor GPU platform (NVIDIA, Qualcomm, ARM...) and falls
back to PoCL's CPU device (``pip install "pyopencl[pocl]"``) on machines without one;
``TVM_SMARTMEM_OPENCL_PLATFORM=<substring>`` forces a platform.  Unless the user set them,
``OCL_ICD_VENDORS`` (a directory naming PoCL and the system's vendors by absolute path) and
``POCL_CACHE_DIR`` (under the cache, not ``$HOME``) are set here.

``TVM_SMARTMEM_OPENCL=0`` disables all of this.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from ...errors import OpenCLError

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("cl_api.cc", "device_api.cc", "module.cc", "allocator.cc")
HEADERS = ("cl_api.h", "opencl_runtime.h", "shim/tvm/support/io.h",
           "shim/tvm/support/serializer.h")
LIB_NAME = "libtvm_runtime_opencl.so"


def cache_dir() -> Path:
    """``$TVM_SMARTMEM_CACHE``, else ``$XDG_CACHE_HOME/tvm_smartmem``, else ``~/.cache/...``."""
    if os.environ.get("TVM_SMARTMEM_CACHE"):
        return Path(os.environ["TVM_SMARTMEM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tvm_smartmem"


def _site_dirs() -> tuple[Path, Path]:
    import tvm
    import tvm_ffi

    return Path(tvm.__file__).resolve().parent, Path(tvm_ffi.__file__).resolve().parent


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise OpenCLError(
            "cannot build the OpenCL runtime: no C++ compiler found (install g++ or set CXX)"
        )
    return cxx


def build_key() -> str:
    """Hash of everything the library depends on: sources, TVM and ffi versions, platform."""
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        h.update(f"{dist}={_version(dist)}".encode())
    h.update(f"{sys.platform}-{os.uname().machine}".encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    return cache_dir() / f"opencl-{build_key()}" / LIB_NAME


def build(force: bool = False, quiet: bool = False) -> Path:
    """Compile the runtime into the cache (atomically, under a lock); return its path."""
    target = library_path()
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tvm_dir, ffi_dir = _site_dirs()
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() and not force:
            return target
        if not quiet:
            print(f"tvm-smartmem: building the OpenCL runtime into {target.parent} (once)",
                  file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / LIB_NAME
            cmd = [
                _compiler(), "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall",
                f"-I{tvm_dir / 'include'}", f"-I{ffi_dir / 'include'}",
                # after the wheel's headers: stands in for the one header it lacks
                f"-I{SOURCE_DIR / 'shim'}",
                *[str(SOURCE_DIR / s) for s in SOURCES],
                "-o", str(out),
                f"-L{tvm_dir / 'lib'}", f"-L{ffi_dir / 'lib'}", "-ltvm_runtime", "-ltvm_ffi",
                "-ldl", "-lpthread",
                f"-Wl,-rpath,{tvm_dir / 'lib'}:{ffi_dir / 'lib'}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
                raise OpenCLError(f"building the OpenCL runtime failed:\n{tail}")
            os.replace(out, target)
    return target


# -- environment -------------------------------------------------------------------------------


def _pyopencl_dir() -> Path | None:
    spec = None
    with contextlib.suppress(ImportError, ValueError):
        import importlib.util

        spec = importlib.util.find_spec("pyopencl")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).resolve().parent


def _first(pattern: str) -> str | None:
    hits = sorted(glob.glob(pattern))
    return hits[0] if hits else None


def _system_loader() -> str | None:
    name = ctypes.util.find_library("OpenCL")
    for candidate in filter(None, (name, "libOpenCL.so.1")):
        try:
            ctypes.CDLL(candidate)
            return candidate
        except OSError:
            continue
    return None


def pocl_library() -> str | None:
    """Absolute path of PoCL's ICD library from the pyopencl[pocl] wheels, if installed."""
    pyocl = _pyopencl_dir()
    if pyocl is None:
        return None
    return _first(str(pyocl / ".libs" / "libpocl*.so*")) or _first(
        str(pyocl.parent / "pocl_binary_distribution" / ".libs" / "libpocl*.so*")
    )


def configure_environment() -> dict[str, str]:
    """Choose the ICD loader and vendor list (keeping whatever the user set); return the choice."""
    env = os.environ
    chosen: dict[str, str] = {}
    pyocl = _pyopencl_dir()
    if not env.get("TVM_SMARTMEM_OPENCL_LIB"):
        loader = _system_loader()
        if loader is None and pyocl is not None:
            loader = _first(str(pyocl / ".libs" / "libOpenCL*.so*"))
        if loader:
            env["TVM_SMARTMEM_OPENCL_LIB"] = loader
    loader = env.get("TVM_SMARTMEM_OPENCL_LIB", "")
    chosen["loader"] = loader
    if pyocl is not None and str(pyocl) in loader:
        # pyopencl's patched ocl-icd reads this and crashes without it
        env.setdefault("PYOPENCL_HOME", str(pyocl))
    if not env.get("OCL_ICD_VENDORS"):
        vendors = _vendor_dir()
        if vendors is not None:
            env["OCL_ICD_VENDORS"] = str(vendors)
    chosen["vendors"] = env.get("OCL_ICD_VENDORS", "/etc/OpenCL/vendors")
    env.setdefault("POCL_CACHE_DIR", str(cache_dir() / "pocl"))
    return chosen


def _vendor_dir() -> Path | None:
    """A directory of .icd files: the system's vendors plus PoCL, all by absolute path."""
    entries: dict[str, str] = {}
    for icd in sorted(glob.glob("/etc/OpenCL/vendors/*.icd")):
        with contextlib.suppress(OSError):
            entries[Path(icd).name] = Path(icd).read_text().strip()
    pocl = pocl_library()
    if pocl:
        entries["tvm-smartmem-pocl.icd"] = pocl
    if not entries:
        return None
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / f"icd-{digest}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            for name, lib in entries.items():
                (Path(tmp) / name).write_text(lib + "\n")
            with contextlib.suppress(OSError):  # another process made it first
                os.rename(tmp, out)
                os.mkdir(tmp)  # TemporaryDirectory cleans this up
    return out


# -- loading -----------------------------------------------------------------------------------

_STATE: dict[str, object] = {}


def disabled() -> bool:
    return os.environ.get("TVM_SMARTMEM_OPENCL", "1") == "0"


def is_loaded() -> bool:
    import tvm

    return tvm.get_global_func("device_api.opencl", allow_missing=True) is not None


def load(build_if_missing: bool = True, quiet: bool = False) -> bool:
    """Make the OpenCL runtime available to TVM; True when it is loaded (a device may still be
    missing: see :func:`describe`)."""
    if disabled():
        return False
    if is_loaded():
        return True
    configure_environment()
    path = library_path()
    if not path.exists():
        if not build_if_missing:
            return False
        path = build(quiet=quiet)
    try:
        lib = ctypes.CDLL(str(path), ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise OpenCLError(f"cannot load {path}: {err}") from None
    from tvm.base import _LOADED_LIBS

    _LOADED_LIBS["tvm_runtime_opencl"] = lib
    _STATE["path"] = str(path)
    return True


def describe() -> dict:
    """What the runtime found: loader, platforms, the selected platform's devices and limits."""
    if not load():
        return {"loader": "", "error": "the OpenCL runtime is disabled (TVM_SMARTMEM_OPENCL=0)",
                "platform": "", "devices": [], "platforms": []}
    import tvm

    return json.loads(tvm.get_global_func("smartmem.opencl.describe")())


def require_device(index: int = 0):
    """``tvm.opencl(index)``, or :class:`OpenCLError` saying why there is none."""
    import tvm

    load()
    dev = tvm.opencl(index)
    if not dev.exist:
        info = describe()
        reason = info.get("error") or f"OpenCL device {index} does not exist"
        raise OpenCLError(f"no OpenCL device: {reason}")
    return dev


def image_info(tensor) -> dict:
    """How a tensor on OpenCL is stored: ``{"image": bool, "width", "height", "depth"}``."""
    import tvm

    kind, w, h, d = tvm.get_global_func("smartmem.opencl.image_info")(tensor)
    return {"image": bool(kind), "width": int(w), "height": int(h), "depth": int(d)}
