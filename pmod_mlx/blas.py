"""Give MLX's CPU backend a fast BLAS on Linux.

Why this exists
---------------
The Linux wheel of MLX (``mlx[cpu]``, the ``mlx-cpu`` distribution) links
``libmlx.so`` against a *reference* BLAS/LAPACK (netlib, Fortran) that auditwheel
bundled in ``site-packages/mlx_cpu.libs/`` next to its ``libgfortran`` and
``libquadmath``. Every float32 matmul goes through ``cblas_sgemm`` of that library,
single threaded and unblocked: 3-7 GFLOP/s, some 25-60x slower than a tuned BLAS
on the same two cores. On macOS MLX uses Apple's Accelerate and Metal, and nothing
here applies.

The fix: open an optimised BLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is
imported. Objects loaded with ``RTLD_GLOBAL`` join the process's global lookup
scope, which the dynamic linker searches before a library's own dependencies, so
when Python then opens ``mlx.core`` (and with it ``libmlx.so``, bound immediately
since Python opens extensions with ``RTLD_NOW``), ``cblas_sgemm`` and the LAPACK
entry points (``sgetrf_``, ...) resolve to the fast library. Once ``mlx.core`` is
loaded it is too late: its symbols are already bound to the bundled copy.

The library we load is OpenBLAS from the ``ngsolve-openblas`` wheel (Linux x86_64,
one file, ~40 MB installed, ``DYNAMIC_ARCH`` so it picks kernels for the CPU it
runs on, plain ``cblas_sgemm``/``sgemm_`` symbols, pthreads). It needs
``libgfortran.so.5``, which a bare Debian/Ubuntu image lacks; the MLX wheel ships
one under an auditwheel-mangled name (``libgfortran-<hash>.so.5.0.0``) whose
SONAME does not match. The library's RPATH is ``$ORIGIN``, and glibc takes
``$ORIGIN`` from the path an object was opened by, without resolving symlinks, so
we open it through a private temporary directory holding two symlinks
(``libopenblas...so`` and ``libgfortran.so.5`` -> MLX's bundled copy, loaded first
by its real path so the dynamic linker recognises it by inode and reuses it). The
directory is removed right after ``dlopen``.

Other BLAS wheels on PyPI were measured and rejected: ``mkl`` (+ ``intel-openmp``,
``tbb``, ...) adds over 800 MB for less speed; ``cmeel-openblas`` is built for one
CPU (SKYLAKEX, AVX-512 only, ``MAX_THREADS=4``) and has no RPATH for the
gfortran trick; ``scipy-openblas32/64`` prefix every symbol with ``scipy_`` so
MLX cannot bind to them.

Usage: ``pmod_mlx/__init__.py`` calls :func:`load_fast_blas` before anything
imports ``mlx.core``; code that imports ``mlx.core`` itself should import
``pmod_mlx`` (or call :func:`load_fast_blas`) first. :func:`blas_info` says what
was loaded, or why MLX is on its reference BLAS. This module uses only the
standard library, so it can be loaded on its own, before any of the runtime.

Environment:

``PMOD_BLAS``
    unset / ``auto``: load the fast BLAS if one is installed (default);
    ``reference`` (or ``off``, ``0``, ``none``): leave MLX on its bundled BLAS
    (for benchmarks and bisecting);
    a path to a shared library exporting ``cblas_sgemm`` (an OpenBLAS, BLIS or
    ``libmkl_rt.so``): load that one instead.
``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS``
    read by OpenBLAS itself when it loads; unset, it uses every CPU this process
    may run on (``os.sched_getaffinity``), capped at a cgroup CPU quota if the
    container has one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import platform
import shutil
import struct
import sys
import tempfile
import threading

__all__ = ["load_fast_blas", "blas_info", "mlx_sgemm_provider", "ENV_VAR", "PACKAGE"]

ENV_VAR = "PMOD_BLAS"
#: the PyPI package that provides the fast BLAS (see the ``mlx`` extra)
PACKAGE = "ngsolve-openblas"
_PACKAGE_MODULE = "ngsolve_openblas"  # found with find_spec, never imported
_OFF = {"reference", "ref", "off", "0", "none", "no", "false", "mlx"}
_AUTO = {"", "auto", "1", "on", "yes", "true", "fast", "openblas"}

#: wheels that bundle a libgfortran.so.5 (auditwheel-renamed) we can lend to OpenBLAS
_GFORTRAN_DONORS = (("mlx", "mlx_cpu.libs"), ("numpy", "numpy.libs"))

#: read by OpenBLAS / MKL themselves; when one is set we leave the thread count alone
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_lock = threading.RLock()
_info: dict | None = None
_keep: list = []  # CDLL handles kept alive for the life of the process


# --------------------------------------------------------------------------- API


def load_fast_blas() -> dict:
    """Load the fast BLAS into the global symbol scope, once; return :func:`blas_info`.

    Must run before ``import mlx.core``. Idempotent and thread-safe; never raises:
    on any failure MLX keeps its bundled reference BLAS and ``blas_info()["reason"]``
    says why. A no-op on macOS (Accelerate) and on other systems.
    """
    global _info
    with _lock:
        if _info is None:
            try:
                _info = _load()
            except Exception as e:  # never let BLAS selection break an import
                _info = _reference(f"unexpected error while loading a fast BLAS: {e!r}")
        return dict(_info)


def blas_info() -> dict:
    """What BLAS MLX's CPU backend uses in this process.

    Keys: ``name`` ("openblas 0.3.33", "mkl 2025.x", "reference", "accelerate"),
    ``path`` (real path of the library, or None), ``reason`` (why not a fast
    BLAS; None when one is loaded), ``threads`` (None if unknown), ``loaded``
    (True if this module loaded a library), ``detail`` (build string / core),
    ``source`` (where it was found), ``gfortran`` (the libgfortran lent to it,
    if any). Calls :func:`load_fast_blas` if nothing did yet.
    """
    info = load_fast_blas()
    lib = _keep[-1] if (info.get("loaded") and _keep) else None
    if lib is not None:  # threads may be changed at run time: ask again
        t = _threads_of(lib)
        if t is not None:
            info["threads"] = t
    return info


def set_threads(n: int) -> bool:
    """Set the loaded BLAS's thread count (e.g. one per process when several processes
    share the cores); False when there is no loaded BLAS that can be told."""
    lib = _keep[-1] if (load_fast_blas().get("loaded") and _keep) else None
    for sym in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
        if lib is not None and hasattr(lib, sym):
            getattr(lib, sym)(ctypes.c_int(int(n)))
            return True
    return False


def mlx_sgemm_provider() -> str | None:
    """Real path of the library that MLX's own ``cblas_sgemm`` call is bound to.

    Reads the GOT slot of ``cblas_sgemm`` in ``libmlx.so`` (after a tiny CPU matmul
    so that a lazily bound slot is filled) and maps the address to a file via
    ``/proc/self/maps``. This is the proof that the interposition worked. Imports
    ``mlx.core``; Linux only; returns None when it cannot tell. Never raises.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import mlx.core as mx

        a = mx.ones((8, 8), dtype=mx.float32)
        mx.eval(mx.matmul(a, a, stream=mx.cpu))
        maps = _read_maps()
        mlx_dir = os.path.dirname(os.path.realpath(mx.__file__))
        for path, bias in _mapped_elves(maps, under=mlx_dir):
            slot = _got_offset(path, "cblas_sgemm")
            if slot is None:
                continue
            addr = ctypes.c_void_p.from_address(bias + slot).value
            return _file_of(addr, maps) if addr else None
    except Exception:
        return None
    return None


# ---------------------------------------------------------------------- loading


def _reference(reason: str, name: str = "reference") -> dict:
    return {
        "name": name,
        "path": _bundled("libblas") if name == "reference" else None,
        "reason": reason,
        "threads": 1 if name == "reference" else None,
        "loaded": False,
        "detail": None,
        "source": "bundled with mlx" if name == "reference" else None,
        "gfortran": None,
    }


def _load() -> dict:
    if sys.platform == "darwin":
        return _reference("macOS: MLX uses Apple Accelerate; nothing to do", name="accelerate")
    if not sys.platform.startswith("linux"):
        return _reference(f"no fast-BLAS loader for {sys.platform}")
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() in _OFF:
        return _reference(f"disabled by {ENV_VAR}={setting}")
    if "mlx.core" in sys.modules:
        return _too_late()

    if setting.lower() in _AUTO:
        candidates = _candidates()
    else:
        candidates = iter([(setting, ENV_VAR)])

    errors = []
    for path, source in candidates:
        try:
            return _open_blas(path, source)
        except Exception as e:
            errors.append(f"{path}: {e}")
    if errors:
        return _reference("could not load a fast BLAS: " + "; ".join(errors))
    machine = platform.machine()
    hint = (
        f"pip install {PACKAGE} (or pmod[mlx])"
        if machine in ("x86_64", "AMD64")
        else f"{PACKAGE} has no wheel for {machine}; set {ENV_VAR}=/path/to/libopenblas.so"
    )
    return _reference(f"no fast BLAS installed: {hint}")


def _too_late() -> dict:
    info = _reference(
        "too late: mlx.core was imported before load_fast_blas(), so MLX is bound to "
        "its bundled reference BLAS; import pmod_mlx (or call "
        "pmod_mlx.blas.load_fast_blas()) before mlx.core"
    )
    # something else (LD_PRELOAD, another package) may still have put a BLAS first
    addr = _global_symbol("cblas_sgemm")
    path = _file_of(addr) if addr else None
    if path:
        info.update(name=f"unknown ({os.path.basename(path)})", path=path, threads=None)
        info["reason"] += f"; note: cblas_sgemm resolves globally to {path}"
    return info


def _candidates():
    """(path, source) of the BLAS libraries to try, best first; looked up lazily."""
    spec = importlib.util.find_spec(_PACKAGE_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            for p in sorted(glob.glob(os.path.join(d, "libopenblas*.so*"))):
                yield p, f"{PACKAGE} wheel"
    system = ctypes.util.find_library("openblas")  # e.g. Debian's libopenblas0
    if system:
        yield system, "system library"


def _open_blas(path: str, source: str) -> dict:
    rtld_local = os.RTLD_NOW | os.RTLD_LOCAL
    gfortran = None
    try:
        lib = ctypes.CDLL(path, mode=rtld_local)
        opened_as = path
    except OSError as e:
        if "libgfortran.so.5" not in str(e):
            raise
        gfortran = _bundled("libgfortran", ".so.5", donors=_GFORTRAN_DONORS)
        if gfortran is None:
            raise OSError(f"{e} (and no libgfortran.so.5 bundled with mlx or numpy)") from None
        lib, opened_as = _open_with_gfortran(path, gfortran)

    try:
        for sym in ("cblas_sgemm", "sgemm_"):
            if not hasattr(lib, sym):
                raise OSError(f"exports no {sym} (symbol-prefixed builds such as scipy-openblas can't serve MLX)")
        # promote to the global scope: from now on the dynamic linker prefers it
        glob_lib = ctypes.CDLL(opened_as, mode=os.RTLD_NOW | os.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0))
        _keep.extend([lib, glob_lib])
    finally:
        if gfortran:  # the symlinks have done their job once dlopen returned
            shutil.rmtree(os.path.dirname(opened_as), ignore_errors=True)

    _fit_threads(lib)
    real = _file_of(ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value) or os.path.realpath(path)
    info = {
        "name": "unknown",
        "path": real,
        "reason": None,
        "threads": _threads_of(lib),
        "loaded": True,
        "detail": None,
        "source": source,
        "gfortran": gfortran,
    }
    info.update(_describe(lib, real))
    winner = _file_of(_global_symbol("cblas_sgemm"))
    if winner and winner != real:  # e.g. an LD_PRELOADed BLAS comes first
        info["reason"] = f"loaded {real}, but cblas_sgemm resolves globally to {winner}"
        info["name"] = f"unknown ({os.path.basename(winner)})"
        info["path"] = winner
    return info


def _open_with_gfortran(path: str, gfortran: str):
    """Open ``path`` (RPATH ``$ORIGIN``) through a temp dir that also holds libgfortran.so.5."""
    # Load the bundled gfortran by its real path first: its own RPATH finds its
    # libquadmath, and the symlink below then matches it by inode (one copy).
    _keep.append(ctypes.CDLL(gfortran, mode=os.RTLD_NOW | os.RTLD_LOCAL))
    tmp = tempfile.mkdtemp(prefix="pmod-blas-")
    try:
        link = os.path.join(tmp, os.path.basename(path))
        os.symlink(os.path.realpath(path), link)
        os.symlink(gfortran, os.path.join(tmp, "libgfortran.so.5"))
        return ctypes.CDLL(link, mode=os.RTLD_NOW | os.RTLD_LOCAL), link
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _describe(lib, path: str) -> dict:
    if hasattr(lib, "openblas_get_config"):
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = (lib.openblas_get_config() or b"").decode(errors="replace").strip()
        core = None
        if hasattr(lib, "openblas_get_corename"):
            lib.openblas_get_corename.restype = ctypes.c_char_p
            core = (lib.openblas_get_corename() or b"").decode(errors="replace").strip()
        words = config.split()
        version = words[1] if len(words) > 1 and words[0].lower() == "openblas" else "?"
        detail = config + (f" (core {core})" if core and core not in config else "")
        return {"name": f"openblas {version}", "detail": detail}
    if hasattr(lib, "MKL_Get_Version_String"):
        buf = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(buf, len(buf))
        text = buf.value.decode(errors="replace").strip()
        ver = next((w.split("-")[0] for w in text.split() if w[:1].isdigit()), "?")
        return {"name": f"mkl {ver}", "detail": text}
    if hasattr(lib, "bli_info_get_version_str"):
        lib.bli_info_get_version_str.restype = ctypes.c_char_p
        return {"name": f"blis {lib.bli_info_get_version_str().decode()}", "detail": None}
    return {"name": f"unknown ({os.path.basename(path)})", "detail": None}


def _fit_threads(lib) -> None:
    """Cap the thread count at a container's CPU quota, unless the user chose one.

    OpenBLAS and MKL start one thread per CPU of the affinity mask, which is already
    right on a plain machine (2 here); under a cgroup CPU quota (``docker --cpus``,
    Kubernetes limits) that mask can be far wider than the CPU time the process gets.
    """
    if any(os.environ.get(v) for v in _THREAD_VARS):
        return
    quota = _cgroup_cpu_quota()
    if quota is None:
        return
    current = _threads_of(lib)
    if current is None or current <= quota:
        return
    for sym in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
        if hasattr(lib, sym):
            getattr(lib, sym)(ctypes.c_int(quota))
            return


def _cgroup_cpu_quota(root: str = "/sys/fs/cgroup", proc: str = "/proc/self/cgroup") -> int | None:
    """CPUs' worth of CPU time a cgroup (v2 or v1) quota allows, rounded up; None if unlimited."""
    try:
        rel = "/"
        with open(proc) as f:
            for line in f:
                hid, ctrl, path = line.rstrip("\n").split(":", 2)
                if hid == "0" and ctrl == "":
                    rel = path
        for d in (os.path.join(root, rel.lstrip("/")), root):
            try:
                with open(os.path.join(d, "cpu.max")) as f:
                    q, period = f.read().split()[:2]
                if q != "max":
                    return max(1, -(-int(q) // int(period)))
                return None
            except OSError:
                continue
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            q = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return max(1, -(-q // period)) if q > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _threads_of(lib) -> int | None:
    for sym in ("openblas_get_num_threads", "MKL_Get_Max_Threads", "bli_thread_get_num_threads"):
        if hasattr(lib, sym):
            try:
                f = getattr(lib, sym)
                f.restype = ctypes.c_int
                return int(f())
            except Exception:
                return None
    return None


# ------------------------------------------------------------------- utilities


def _wheel_libs_dir(package: str, libs: str) -> str | None:
    """auditwheel's ``site-packages/<libs>`` folder next to ``package``, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for d in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(os.path.dirname(os.path.realpath(d)), libs)
        if os.path.isdir(path):
            return path
    return None


def _bundled(stem: str, contains: str = ".so", donors=(("mlx", "mlx_cpu.libs"),)) -> str | None:
    """A library bundled in a wheel's ``.libs`` folder, e.g. MLX's ``libblas-<hash>.so.3``."""
    for package, libs in donors:
        d = _wheel_libs_dir(package, libs)
        if not d:
            continue
        hits = sorted(p for p in glob.glob(os.path.join(d, stem + "*")) if contains in os.path.basename(p))
        if hits:
            return hits[0]
    return None


def _global_symbol(name: str) -> int | None:
    """Address ``dlsym(RTLD_DEFAULT, name)`` gives, i.e. what a new library binds to."""
    try:
        return ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None


def _read_maps() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of the file-backed mappings of this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, int(parts[2], 16), parts[5].rstrip("\n").removesuffix(" (deleted)")))
    return out


def _file_of(addr: int | None, maps=None) -> str | None:
    if not addr:
        return None
    try:
        for lo, hi, _, path in maps if maps is not None else _read_maps():
            if lo <= addr < hi:
                return path
    except OSError:
        pass
    return None


def _mapped_elves(maps, under: str):
    """(path, load bias) of each shared object mapped from below ``under``."""
    seen = set()
    for lo, _, off, path in maps:
        if off == 0 and path.startswith(under) and ".so" in path and path not in seen:
            seen.add(path)
            first_vaddr = _first_load_vaddr(path)
            if first_vaddr is not None:
                yield path, lo - first_vaddr


def _elf64(path: str) -> bytes | None:
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit little-endian only
        return None
    return data


def _first_load_vaddr(path: str) -> int | None:
    data = _elf64(path)
    if data is None:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr = struct.unpack_from("<IIQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_offset == 0:  # PT_LOAD mapping the file start
            return p_vaddr & ~0xFFF
    return None


def _got_offset(path: str, symbol: str) -> int | None:
    """Offset (from the load bias) of the GOT slot a relocation for ``symbol`` fills."""
    data = _elf64(path)
    if data is None:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    want = symbol.encode()
    for sh in sections:
        if sh[1] != 4:  # SHT_RELA
            continue
        symtab = sections[sh[6]]
        if symtab[1] != 11:  # SHT_DYNSYM
            continue
        strtab = sections[symtab[6]]
        for r in range(sh[5] // 24):
            r_offset, r_info = struct.unpack_from("<QQ", data, sh[4] + r * 24)
            sym = r_info >> 32
            if not sym:
                continue
            st_name, = struct.unpack_from("<I", data, symtab[4] + sym * 24)
            start = strtab[4] + st_name
            if data[start : start + len(want) + 1] == want + b"\0":
                return r_offset
    return None
