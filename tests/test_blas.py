"""pmod_mlx.blas: MLX's CPU backend on a fast BLAS (Linux), and still correct without it.

Every check runs in a fresh interpreter: the BLAS has to be chosen before mlx.core
is imported, and this pytest process may have imported mlx.core already.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BLAS_PY = ROOT / "pmod_mlx" / "blas.py"

# Looked up, not imported: importing mlx.core here would bind this pytest process to
# the reference BLAS before pmod_mlx gets to load the fast one for the other tests.
if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx.core") is None:
    pytest.skip("mlx is not installed", allow_module_level=True)

LINUX_X86 = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
HAS_PACKAGE = importlib.util.find_spec("ngsolve_openblas") is not None
needs_fast = pytest.mark.skipif(
    not (LINUX_X86 and HAS_PACKAGE),
    reason="the fast BLAS is Linux x86_64 only and needs the ngsolve-openblas package (pmod[mlx])",
)
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS", "PMOD_BLAS")

# Runs in a subprocess: loads blas.py standalone (as pmod_mlx/__init__ would, first),
# then optionally mlx, computes each case and prints one JSON line.
WORKER = r"""
import importlib.util, json, sys
mode, blas_py = sys.argv[1], sys.argv[2]
out = {}
if mode == "mlx-first":
    import mlx.core  # noqa: F401  (the wrong order on purpose)
spec = importlib.util.spec_from_file_location("pmod_mlx.blas", blas_py)
blas = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = blas
spec.loader.exec_module(blas)
info = blas.load_fast_blas()
out["info"] = info
out["heavy_imports"] = sorted(m for m in ("mlx.core", "numpy") if m in sys.modules)
kept = len(blas._keep)
out["idempotent"] = blas.load_fast_blas() == info and blas.blas_info() == info and len(blas._keep) == kept
if mode in ("cases", "cases-small"):
    import numpy as np
    import mlx.core as mx
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)
    cases = {}
    def case(name, k, fn, *arrays, ref=None):  # k: the contraction length
        cases[name] = (k, fn, ref or fn, arrays)
    case("square_64", 64, lambda a, b: a @ b, r(64, 64), r(64, 64))
    case("odd_257x129x65", 129, lambda a, b: a @ b, r(257, 129), r(129, 65))
    case("threaded_384x512x320", 512, lambda a, b: a @ b, r(384, 512), r(512, 320))
    case("a_transposed", 130, lambda a, b: a.T @ b, r(130, 70), r(130, 90))
    case("b_transposed", 130, lambda a, b: a @ b.T, r(70, 130), r(90, 130))
    case("both_transposed", 130, lambda a, b: a.T @ b.T, r(130, 70), r(90, 130))
    case("strided_slices", 50, lambda a, b: a[::2, 1::3] @ b[::3, ::2], r(200, 150), r(150, 120))
    case("batched", 47, lambda a, b: a @ b, r(4, 33, 47), r(4, 47, 29))
    case("batched_broadcast", 30, lambda a, b: a @ b, r(3, 1, 20, 30), r(1, 2, 30, 10))
    case("batched_transposed", 40, lambda a, b: a.swapaxes(-1, -2) @ b, r(5, 40, 24), r(5, 40, 36))
    case("vector_matrix", 300, lambda a, b: a @ b, r(300), r(300, 77))
    case("matrix_vector", 300, lambda a, b: a @ b, r(77, 300), r(300))
    case("addmm", 80, lambda c, a, b: mx.addmm(c, a, b, alpha=0.5, beta=2.0),
         r(60, 50), r(60, 80), r(80, 50), ref=lambda c, a, b: 2.0 * c + 0.5 * (a @ b))
    if mode == "cases":
        case("llm_2944x512x1376", 512, lambda a, b: a @ b, r(2944, 512), r(512, 1376))
    res = {}
    for name, (k, fn, ref, arrays) in cases.items():
        got = fn(*[mx.array(x) for x in arrays])
        mx.eval(got)
        got_np = np.array(got)
        want = ref(*[x.astype(np.float64) for x in arrays])
        # relative to |A| @ |B|, the scale of any float32 dot product's rounding error
        scale = ref(*[np.abs(x.astype(np.float64)) for x in arrays])
        err = float(np.max(np.abs(got_np - want) / np.maximum(scale, 1e-30)))
        res[name] = {"shape": list(got_np.shape), "want_shape": list(want.shape),
                     "dtype": str(got_np.dtype), "err": err, "k": k}
    out["cases"] = res
    # LAPACK (sgetrf_, spotrf_, ...) is rerouted too: relative residuals
    a = r(64, 64)
    spd = a @ a.T + 64 * np.eye(64, dtype=np.float32)
    A, S, s = mx.array(a), mx.array(spd), mx.cpu
    q, rr = mx.linalg.qr(A, stream=s)
    u, sv, vt = mx.linalg.svd(A, stream=s)
    L = np.array(mx.linalg.cholesky(S, stream=s))
    w = np.sort(np.array(mx.linalg.eigh(S, stream=s)[0]))
    x = np.array(mx.linalg.solve(A, mx.ones((64,)), stream=s))
    na = float(np.abs(a).max())
    out["lapack"] = {
        "inv": float(np.abs(np.array(mx.linalg.inv(A, stream=s)) @ a - np.eye(64)).max()),
        "cholesky": float(np.abs(L @ L.T - spd).max() / np.abs(spd).max()),
        "qr": float(np.abs(np.array(q) @ np.array(rr) - a).max() / na),
        "svd": float(np.abs(np.array(u) * np.array(sv) @ np.array(vt) - a).max() / na),
        "eigh": float(np.abs(w - np.linalg.eigvalsh(spd.astype(np.float64))).max() / np.abs(w).max()),
        "solve": float(np.abs(a @ x - 1).max()),
    }
    out["provider"] = blas.mlx_sgemm_provider()
print("@@" + json.dumps(out))
"""


def run_worker(mode: str, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(BLAS_PY)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    assert proc.returncode == 0 and lines, f"worker failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][2:])


@pytest.fixture(scope="module")
def fast():
    return run_worker("cases")


@pytest.fixture(scope="module")
def reference():
    return run_worker("cases-small", PMOD_BLAS="reference")


CASES = [
    "square_64", "odd_257x129x65", "threaded_384x512x320", "a_transposed", "b_transposed",
    "both_transposed", "strided_slices", "batched", "batched_broadcast", "batched_transposed",
    "vector_matrix", "matrix_vector", "addmm",
]
EPS32 = float(np.finfo(np.float32).eps)


def check_case(result: dict, name: str) -> None:
    c = result["cases"][name]
    assert c["shape"] == c["want_shape"], name
    assert c["dtype"] == "float32", name
    # 2*K*eps: the worst case of any summation order (blocked, FMA); a wrong
    # transpose, stride or batch mapping gives errors of order 1
    assert c["err"] <= 2 * c["k"] * EPS32, f"{name}: relative error {c['err']:.3g} (K={c['k']})"


@pytest.mark.parametrize("name", CASES + ["llm_2944x512x1376"])
def test_matmul_matches_float64(fast, name):
    check_case(fast, name)


@pytest.mark.parametrize("name", CASES)
def test_reference_blas_still_correct(reference, name):
    check_case(reference, name)


@pytest.mark.parametrize("op", ["inv", "cholesky", "qr", "svd", "eigh", "solve"])
def test_lapack_still_correct(fast, reference, op):
    for run in (fast, reference):
        assert run["lapack"][op] < 1e-4, (run["info"]["name"], op, run["lapack"][op])


@needs_fast
def test_fast_blas_is_loaded_and_used_by_mlx(fast):
    info = fast["info"]
    assert info["name"].startswith("openblas "), info
    assert info["loaded"] is True and info["reason"] is None, info
    assert os.path.isfile(info["path"]), info
    # the proof: the GOT slot of cblas_sgemm in libmlx.so points into that library
    assert fast["provider"] == info["path"], (fast["provider"], info)


@needs_fast
def test_all_cores_by_default(fast):
    cores = len(os.sched_getaffinity(0))
    assert fast["info"]["threads"] == cores, fast["info"]


@needs_fast
@pytest.mark.parametrize("var", ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"])
def test_thread_env_respected(var):
    info = run_worker("load", **{var: "1"})["info"]
    assert info["name"].startswith("openblas") and info["threads"] == 1, info


def test_loading_is_idempotent_and_light(fast):
    assert fast["idempotent"] is True
    assert fast["heavy_imports"] == []  # blas.py imports neither numpy nor mlx


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="off Linux MLX has no reference-BLAS mode")
def test_reference_mode(reference):
    info = reference["info"]
    assert info["name"] == "reference" and info["loaded"] is False, info
    assert "PMOD_BLAS" in info["reason"], info
    # MLX really calls its bundled netlib BLAS then
    assert reference["provider"] and "mlx_cpu.libs" in reference["provider"], reference["provider"]
    assert os.path.basename(reference["provider"]).startswith("libblas")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a no-op off Linux")
def test_mlx_imported_first_is_reported_too_late():
    info = run_worker("mlx-first")["info"]
    assert info["loaded"] is False and "too late" in info["reason"], info


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a no-op off Linux")
def test_unloadable_library_falls_back_without_raising(tmp_path):
    bogus = tmp_path / "libnotblas.so"
    bogus.write_bytes(b"not an ELF file")
    info = run_worker("load", PMOD_BLAS=str(bogus))["info"]
    assert info["name"] == "reference" and info["loaded"] is False, info
    assert str(bogus) in info["reason"], info


def _blas_module_unloaded():
    """blas.py as a private module: its helpers, without loading any library."""
    spec = importlib.util.spec_from_file_location("_pmod_blas_under_test", BLAS_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "files, want",
    [
        ({"proc": "0::/job\n", "job/cpu.max": "150000 100000\n"}, 2),  # v2, nested group
        ({"proc": "0::/\n", "cpu.max": "max 100000\n"}, None),  # v2, unlimited
        ({"proc": "4:cpu:/\n", "cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 1),  # v1
        ({"proc": "4:cpu:/\n", "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"proc": "0::/\n"}, None),  # nothing readable
    ],
)
def test_cgroup_cpu_quota(tmp_path, files, want):
    blas = _blas_module_unloaded()
    for rel, text in files.items():
        f = tmp_path / ("proc_cgroup" if rel == "proc" else f"cg/{rel}")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    (tmp_path / "cg").mkdir(exist_ok=True)
    assert blas._cgroup_cpu_quota(root=str(tmp_path / "cg"), proc=str(tmp_path / "proc_cgroup")) == want


def test_macos_is_a_no_op(monkeypatch):
    blas = _blas_module_unloaded()
    monkeypatch.setattr(blas.sys, "platform", "darwin")
    info = blas.load_fast_blas()
    assert info["name"] == "accelerate" and info["loaded"] is False and blas._keep == []


def test_missing_package_is_explained(monkeypatch):
    blas = _blas_module_unloaded()
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.delitem(sys.modules, "mlx.core", raising=False)
    monkeypatch.delenv("PMOD_BLAS", raising=False)
    monkeypatch.setattr(blas, "_candidates", lambda: iter(()))
    info = blas.load_fast_blas()
    assert info["name"] == "reference" and "no fast BLAS installed" in info["reason"], info
    assert blas._keep == []
