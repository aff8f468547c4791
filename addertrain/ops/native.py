"""The fp32 CPU kernels of the reference op: forward and the elementwise input-gradient rules.

Plain C with GCC vector extensions (16 floats, which the compiler maps onto the machine's
vector registers: one AVX-512 register, two AVX2 ones), built for this CPU
(``-O3 -march=native``) by the system C compiler at first use, about 1 s, into
``$ADDERTRAIN_NATIVE_CACHE`` or ``$XDG_CACHE_HOME/addertrain/native`` (``~/.cache/...``),
then loaded with ctypes. The file name carries a hash of the source, the compiler command
and this CPU's flags, so a cache shared by machines of different CPUs keeps one library
per CPU, and a change to the source builds a new one. ``scripts/setup.sh`` builds it once.

Both kernels work on the patch rows ``cols [rows, ldx]`` of addertrain.ops.reference (a row
per output pixel, ``ldx`` a multiple of 16, zero padded past ``K``), 8 rows at a time, and
keep their accumulators in registers; nothing the size of ``[rows, C_out, K]`` is ever
written (the torch path streams it through a chunk buffer several times):

    forward:     for 16 filters at a time, ``acc += |w[k, o:o+16] - x[p, k]|`` over k
                 (the weight transposed to ``[K, ldw]``, ``ldw`` = C_out rounded up to 16)
    grad_input:  for 16 columns k at a time, ``acc += g[p, o] * rule(w[o, k:k+16] - x[p, k:k+16])``
                 over o, ``rule`` HardTanh or sign; the result overwrites ``cols`` in place
                 (each row's 16 columns are read before they are written)

Rows are split over ``threads`` POSIX threads (torch's intra-op thread count), one
parallel region per call, which also keeps a busy machine from stalling the op at each
of many short parallel regions (docs/reference-op.md). Without a C compiler, or if the
build fails, :func:`library` returns None and the reference op uses its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

LOG = logging.getLogger(__name__)
WIDTH = 16  # floats per vector in the C source; ``ldx`` and ``ldw`` are multiples of it
# below this many adder elements one thread does the call: starting a thread costs more
SERIAL_ELEMENTS = 1 << 18

SOURCE = r"""
#include <pthread.h>

#define V 16
#define RB 8
#define MAX_THREADS 64

typedef float vf __attribute__((vector_size(4 * V)));
typedef float vfu __attribute__((vector_size(4 * V), aligned(4)));
typedef int vi __attribute__((vector_size(4 * V)));

static inline vf load(const float *p) { return *(const vfu *)p; }
static inline void store(float *p, vf v) { *(vfu *)p = v; }
static inline vf vabs(vf a) { return (vf)((vi)a & 0x7fffffff); }
static inline vf pick(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
#ifdef __AVX512F__
#include <immintrin.h>
/* one max and one min instead of two compare-and-blend pairs */
static inline vf clamp1(vf d) {
    return (vf)_mm512_min_ps(_mm512_max_ps((__m512)d, _mm512_set1_ps(-1.f)), _mm512_set1_ps(1.f));
}
#else
static inline vf clamp1(vf d) {
    const vf one = (vf){0} + 1;
    d = pick(d < -one, -one, d);
    return pick(d > one, one, d);
}
#endif

typedef struct {
    const float *x, *w, *g;
    float *out;
    long k, ldx, o, ldw, begin, end;
    int rule; /* -1 forward, 0 HardTanh input gradient, 1 sign input gradient */
} job;

/* rows past the end repeat the last row: computed, never stored */
static inline long row(const job *a, long p) { return p < a->end ? p : a->end - 1; }

static void forward_rows(const job *a) {
    for (long p0 = a->begin; p0 < a->end; p0 += RB) {
        const float *xr[RB];
        for (int r = 0; r < RB; r++) xr[r] = a->x + row(a, p0 + r) * a->ldx;
        for (long oc = 0; oc < a->ldw; oc += V) {
            vf acc[RB] = {0};
            for (long k = 0; k < a->k; k++) {
                vf w = load(a->w + k * a->ldw + oc);
                for (int r = 0; r < RB; r++) acc[r] += vabs(w - xr[r][k]);
            }
            long n = a->o - oc < V ? a->o - oc : V;
            for (int r = 0; r < RB && p0 + r < a->end; r++)
                for (long j = 0; j < n; j++) a->out[(p0 + r) * a->o + oc + j] = -acc[r][j];
        }
    }
}

static inline void input_rows(const job *a, int sign) {
    const vf zero = {0}, one = zero + 1;
    for (long p0 = a->begin; p0 < a->end; p0 += RB) {
        long pr[RB];
        for (int r = 0; r < RB; r++) pr[r] = row(a, p0 + r);
        for (long kc = 0; kc < a->ldx; kc += V) {
            vf xv[RB], acc[RB] = {0};
            for (int r = 0; r < RB; r++) xv[r] = load(a->x + pr[r] * a->ldx + kc);
            for (long o = 0; o < a->o; o++) {
                vf w = load(a->w + o * a->ldx + kc);
                for (int r = 0; r < RB; r++) {
                    vf d = w - xv[r];
                    d = sign ? pick(d > zero, one, zero) - pick(d < zero, one, zero) : clamp1(d);
                    acc[r] += a->g[pr[r] * a->o + o] * d;
                }
            }
            for (int r = 0; r < RB && p0 + r < a->end; r++)
                store(a->out + (p0 + r) * a->ldx + kc, acc[r]);
        }
    }
}

static void *run(void *arg) {
    const job *a = arg;
    if (a->rule < 0) forward_rows(a);
    else if (a->rule == 0) input_rows(a, 0);
    else input_rows(a, 1);
    return 0;
}

static void split(job base, long rows, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    long per = ((rows + threads - 1) / threads + RB - 1) / RB * RB;
    job jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        jobs[t] = base;
        jobs[t].begin = t * per < rows ? t * per : rows;
        jobs[t].end = (t + 1) * per < rows ? (t + 1) * per : rows;
    }
    for (int t = 1; t < threads; t++)
        if (jobs[t].begin < jobs[t].end)
            started[t] = pthread_create(&tid[t], 0, run, &jobs[t]) == 0;
    if (jobs[0].begin < jobs[0].end) run(&jobs[0]);
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(tid[t], 0);
        else if (jobs[t].begin < jobs[t].end) run(&jobs[t]);
}

/* The ceiling of forward_rows' inner loop on this CPU: the same RB accumulations
   acc += |w - x| per load of w, with x in registers and w from L1, so nothing but the
   arithmetic limits it. Returns a sum the caller keeps, so none of it is optimised away. */
float adder_peak(const float *w, long iters) {
    vf acc[RB] = {0}, x[RB];
    for (int r = 0; r < RB; r++) x[r] = (vf){0} + (float)r / RB;
    for (long i = 0; i < iters; i++) {
        vf wv = load(w + (i & 63) * V);
        for (int r = 0; r < RB; r++) acc[r] += vabs(wv - x[r]);
    }
    float t = 0;
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < V; j++) t += acc[r][j];
    return t;
}

void adder_forward(const float *x, const float *wt, float *y, long rows, long k, long ldx,
                   long o, long ldw, int threads) {
    job a = {x, wt, 0, y, k, ldx, o, ldw, 0, 0, -1};
    split(a, rows, threads);
}

void adder_grad_input(const float *x, const float *w, const float *g, float *dx, long rows,
                      long ldx, long o, int rule, int threads) {
    job a = {x, w, g, dx, ldx, ldx, o, ldx, 0, 0, rule};
    split(a, rows, threads);
}
"""

# the sign rule is 1; HardTanh 0 (the C source's job.rule)
INPUT_RULES = {"hardtanh": 0, "sign": 1}


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def cache_dir() -> Path:
    chosen = os.environ.get("ADDERTRAIN_NATIVE_CACHE")
    if chosen:
        return Path(chosen)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "addertrain" / "native"


def _build(cc: str) -> Path:
    command = [cc, "-O3", "-march=native", "-fPIC", "-shared", "-pthread"]
    key = hashlib.sha256("\0".join([SOURCE, *command, _cpu_flags()]).encode()).hexdigest()
    folder = cache_dir()
    target = folder / f"adder-{key[:16]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # concurrent first uses (several workers) each build under a private name; the rename
    # is atomic, so a reader sees no library or a whole one
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, lib = Path(tmp) / "adder.c", Path(tmp) / "adder.so"
        src.write_text(SOURCE)
        subprocess.run([*command, str(src), "-o", str(lib)], check=True, capture_output=True)
        os.replace(lib, target)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (not x86/ARM Linux with a C
    compiler; ``ADDERTRAIN_NATIVE=0`` turns them off)."""
    if os.environ.get("ADDERTRAIN_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    cc = _compiler()
    if cc is None:
        LOG.info("no C compiler found: the reference adder op uses its torch path")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        LOG.info("building the native adder kernels failed (%s %s): torch path", err, detail[:500])
        return None
    long, ptr = ctypes.c_long, ctypes.c_void_p
    lib.adder_forward.argtypes = [ptr, ptr, ptr, long, long, long, long, long, ctypes.c_int]
    lib.adder_grad_input.argtypes = [
        ptr,
        ptr,
        ptr,
        ptr,
        long,
        long,
        long,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.adder_peak.argtypes = [ptr, long]
    lib.adder_peak.restype = ctypes.c_float
    return lib


def peak_elements_per_s(threads: int, seconds: float = 0.5) -> float | None:
    """Adder elements ``|w - x|`` per second that the forward's inner loop reaches with
    ``threads`` threads when only arithmetic limits it (``adder_peak``): the ceiling the
    benchmark states the op's rate against. None without the native library."""
    lib = library()
    if lib is None:
        return None
    from concurrent.futures import ThreadPoolExecutor
    from time import perf_counter

    w = torch.rand(64 * WIDTH)
    per_iter = 8 * WIDTH  # RB accumulations of V lanes
    iters = 1 << 16
    while True:  # ctypes calls release the GIL: the threads run the loop in parallel
        with ThreadPoolExecutor(threads) as pool:
            start = perf_counter()
            list(pool.map(lib.adder_peak, [w.data_ptr()] * threads, [iters] * threads))
            took = perf_counter() - start
        if took >= seconds:
            return threads * iters * per_iter / took
        iters *= 2


def usable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and library() is not None


def _threads(elements: int) -> int:
    return 1 if elements < SERIAL_ELEMENTS else torch.get_num_threads()


def forward_rows(cols: torch.Tensor, wt: torch.Tensor, k: int, o: int) -> torch.Tensor:
    """``[rows, o]`` of ``-sum_k |cols[p, k] - wt[k, o]|``; ``cols`` ``[rows, ldx]`` and
    ``wt`` ``[k, ldw]`` contiguous fp32, ``ldw`` a multiple of WIDTH, zero past ``o``."""
    rows, ldx = cols.shape
    out = cols.new_empty((rows, o))
    library().adder_forward(
        cols.data_ptr(),
        wt.data_ptr(),
        out.data_ptr(),
        rows,
        k,
        ldx,
        o,
        wt.shape[1],
        _threads(rows * o * k),
    )
    return out


def grad_input_rows(cols: torch.Tensor, w: torch.Tensor, g: torch.Tensor, rule: str) -> None:
    """``cols[p, k] <- sum_o g[p, o] * rule(w[o, k] - cols[p, k])`` in place; ``cols``
    ``[rows, ldx]``, ``w`` ``[o, ldx]`` (zero past K) and ``g`` ``[rows, o]`` contiguous fp32."""
    rows, ldx = cols.shape
    o = w.shape[0]
    library().adder_grad_input(
        cols.data_ptr(),
        w.data_ptr(),
        g.data_ptr(),
        cols.data_ptr(),
        rows,
        ldx,
        o,
        INPUT_RULES[rule],
        _threads(rows * o * ldx),
    )
