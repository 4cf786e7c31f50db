/* runtime._fastnorm: fused area-resize + BGR->RGB + normalize + HWC->CHW (+ float16) in one pass.

     pip install -e .      (builds runtime/_fastnorm*.so in place; optional: runtime/preprocess.py
                            falls back to an exact numpy twin when this module is missing)

   resize_normalize(src, out, scale, bias, simd=True, stream=False, kernel=None) -> kernel used
     src   (H, W, 3) uint8 BGR; pixels contiguous, any row stride (a cropped view is fine)
     out   (3, h, w) float32 or float16, C-contiguous, written in place (e.g. one row of a batch)
     scale, bias: 3 floats each, RGB order; out[c] = area_mean(src[..., 2-c]) * scale[c] + bias[c]
     simd=False forces the generic kernel (tests); stream=True uses non-temporal stores (also
     when out is only 16-byte aligned, as numpy's large arrays are); kernel: the first kernel to
     try ('planar', 'tile16', 'tile8', 'neon', 'generic'; tests), falling through to the next that
     serves (a kernel of another CPU family never does).
   image_hw(path) -> (h, w) or None: the size a complete JPEG/PNG file declares (see there).

   The resize is the exact box ("area") filter: output pixel (dy, dx) is the mean of the source
   over its footprint [dx*W/w, (dx+1)*W/w) x [dy*H/h, (dy+1)*H/h), with fractional coverage at
   the edges. Measured in units of 1/gcd the overlaps are small integers, so with per-axis
   integer weights summing to Dx = W/gcd(W,w) (Dy likewise), every product and partial sum is an
   integer held exactly in float32 (while 255*Dx*Dy < 2^24: any COCO or camera size to 448):
       S[y][dx][c]  = sum_k wx[dx][k] * src[y][(sx(dx)+k)*3 + c]          (horizontal, k ascending)
       A[dy][dx][c] = sum_k wy[dy][k] * S[sy(dy)+k][dx][c]                 (vertical, k ascending)
       out          = A * float32(scale / (Dx*Dy)) + bias                  (two roundings)
   Each sum starts from 0.0f and adds weight*value one tap at a time (zero-weight padding adds
   +0 and changes nothing). The numpy twin (runtime/preprocess.py) and the generic kernel do
   exactly these float32 operations in this order, unfused (built with -ffp-contract=off), so
   they agree bit for bit on every input. The AVX2 kernel runs only where 255*Dx*Dy < 2^24:
   there every partial sum is an exact integer, so its fused multiply-adds (FMA) give the very
   same sums; the final x*k + b is never fused (two roundings, as numpy). With h == H and
   w == W the whole thing is float32(x)*scale + bias.

   Kernels (the first that serves the call; the GIL is released while they run):
   - planar (x86-64 AVX2, horizontal footprints up to ~1.7 source pixels and Dx <= 255: COCO's
     640/480/612/427/426-wide photos to 448): byte planes, pshufb + pmaddubsw horizontal taps,
     pmaddwd vertical taps, all exact integers; 1.7-2.4M instructions per image (below).
   - AVX2 u16 (x86-64 with AVX2+FMA+F16C, when 255*Dx <= 65535: every COCO width to 448): 16
     source rows ride in the 16 lanes of a vector, so the horizontal taps are whole-vector
     multiply-adds, no gathers: 16x16 byte transpose, exact 16-bit integer taps, 16x16 transpose
     back, float32 planar rows into a small ring; each output row is then a contiguous vertical
     multiply-add fused with scale/bias and the store (streaming stores on request, for batch
     buffers larger than the cache).
   - AVX2 float: the same with 8 rows in float32 lanes, for wider horizontal footprints.
   - neon (aarch64: Jetson, Graviton, Apple silicon under Linux): the planar plan in NEON,
     fastnorm_neon.h (vld3q_u8 deinterleave, vqtbl2q_u8/vqtbl4_u8 + vmlal_u8 taps, exact integers).
   - generic: plain loops, row by row (other CPUs, and the rare sizes outside the exact range).
   Instruction counts (callgrind, 640x480 -> 448x448): AVX2 u16 2.55M per image, planar 1.81M
   (the benchmark's six COCO shapes: 2.83M -> 1.92M on average). aarch64 (qemu-aarch64 with the
   counting plugin benchmarks/qemu_insn_count.c, `make test-aarch64`): see benchmarks/RESULTS.md.

   Files: this one (module, taps, generic kernel, dispatch, Python bindings, image_hw), the
   fragments it includes on x86-64, fastnorm_tile.h (AVX2 tile kernels) and fastnorm_planar.h,
   and on aarch64 fastnorm_neon.h. harness.c builds the kernels without Python (FN_STANDALONE)
   to check them on other CPUs under emulation.
*/
#ifdef FN_STANDALONE                /* runtime/_cext/harness.c: the kernels without Python */
#include <stddef.h>
typedef ptrdiff_t Py_ssize_t;
#else
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FN_HAVE_AVX2 1
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define FN_HAVE_NEON 1
#include <arm_neon.h>
#endif

typedef struct {
    int n;          /* outputs */
    int kmax;       /* most taps of any output */
    int *start;     /* first source index per output; taps are start..start+count-1 */
    int *count;
    float *w;       /* n * kmax integer-valued weights, ascending source index */
    double denom;   /* the weights of every output sum to this (n_in / gcd) */
} taps_t;

static void taps_free(taps_t *t) {
    free(t->start); free(t->count); free(t->w);
    t->start = t->count = NULL; t->w = NULL;
}

static int64_t gcd64(int64_t a, int64_t b) { while (b) { int64_t r = a % b; a = b; b = r; } return a; }

/* Output d covers [d*n_in, (d+1)*n_in) and source s covers [s*n_out, (s+1)*n_out), in units of
   1/n_out source pixels; every boundary is a multiple of g = gcd(n_in, n_out), so we count in
   units of g (ni = n_in/g, no = n_out/g) and the overlaps are the weights themselves. The first
   source index of each output advances by whole steps (no divisions: they cost more than the
   rest of this table for 640 -> 448). */
static int taps_init(taps_t *t, int64_t n_in, int64_t n_out) {
    const int64_t g = gcd64(n_in, n_out), ni = n_in / g, no = n_out / g;
    memset(t, 0, sizeof(*t));
    t->n = (int)n_out; t->denom = (double)ni;
    t->start = malloc(sizeof(int) * n_out);
    t->count = malloc(sizeof(int) * n_out);
    if (!t->start || !t->count) { taps_free(t); return -1; }
    int64_t s0 = 0, r0 = 0, kmax = 0;               /* a = d*ni = s0*no + r0, 0 <= r0 < no */
    for (int64_t d = 0; d < n_out; d++) {
        int64_t s1 = s0, r1 = r0 + ni - 1;          /* b - 1 = s1*no + r1 */
        while (r1 >= no) { r1 -= no; s1++; }
        t->start[d] = (int)s0; t->count[d] = (int)(s1 - s0 + 1);
        if (s1 - s0 + 1 > kmax) kmax = s1 - s0 + 1;
        r0 += ni;
        while (r0 >= no) { r0 -= no; s0++; }
    }
    t->kmax = (int)kmax;
    t->w = calloc((size_t)(n_out * kmax), sizeof(float));
    if (!t->w) { taps_free(t); return -1; }
    for (int64_t d = 0; d < n_out; d++) {
        const int64_t a = d * ni, b = a + ni;
        for (int64_t s = t->start[d], k = 0; k < t->count[d]; s++, k++) {
            const int64_t lo = s * no > a ? s * no : a, hi = (s + 1) * no < b ? (s + 1) * no : b;
            t->w[d * kmax + k] = (float)(hi - lo);
        }
    }
    return 0;
}

typedef struct {
    const uint8_t *src; Py_ssize_t H, W, rs;   /* rs: source row stride in bytes */
    void *out; int h, w, half, stream;         /* float16 output; non-temporal stores */
    float k[3], b[3];                          /* per output (RGB) plane */
    taps_t tx, ty;
} job_t;

/* Portable float32 -> IEEE half, round to nearest even (as numpy's astype(float16)). */
static uint16_t f32_to_f16(float f) {
    uint32_t x; memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);            /* rounds to inf */
    if (ax < 0x38800000u) {                                              /* half subnormal or 0 */
        if (ax < 0x33000000u) return (uint16_t)sign;                      /* < half of min subnormal */
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(ax >> 23);                              /* 14..24 */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);                         /* RNE on the 13 dropped bits */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

static inline void store_px(const job_t *j, size_t idx, float v) {
    if (j->half) ((uint16_t *)j->out)[idx] = f32_to_f16(v);
    else ((float *)j->out)[idx] = v;
}

/* Generic kernel: one output row at a time. hs: 3*w floats, acc: 3*w floats. */
static void kernel_generic(const job_t *j, float *hs, float *acc) {
    const int w = j->w;
    const size_t plane = (size_t)j->h * w;
    for (int dy = 0; dy < j->h; dy++) {
        for (int i = 0; i < 3 * w; i++) acc[i] = 0.0f;
        for (int ky = 0; ky < j->ty.count[dy]; ky++) {
            const float wy = j->ty.w[dy * j->ty.kmax + ky];
            const uint8_t *row = j->src + (j->ty.start[dy] + ky) * j->rs;
            for (int dx = 0; dx < w; dx++) {                  /* horizontal sums of this source row */
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
                const uint8_t *p = row + (size_t)j->tx.start[dx] * 3;
                const float *wx = j->tx.w + (size_t)dx * j->tx.kmax;
                for (int k = 0; k < j->tx.count[dx]; k++) {
                    a0 = a0 + wx[k] * (float)p[3 * k];
                    a1 = a1 + wx[k] * (float)p[3 * k + 1];
                    a2 = a2 + wx[k] * (float)p[3 * k + 2];
                }
                hs[dx] = a2; hs[w + dx] = a1; hs[2 * w + dx] = a0;   /* RGB plane order */
            }
            for (int i = 0; i < 3 * w; i++) acc[i] = acc[i] + wy * hs[i];
        }
        for (int c = 0; c < 3; c++)
            for (int dx = 0; dx < w; dx++)
                store_px(j, c * plane + (size_t)dy * w + dx, acc[c * w + dx] * j->k[c] + j->b[c]);
    }
}

#ifdef FN_HAVE_AVX2
#define FN_AVX2 __attribute__((target("avx2,f16c,fma")))
#ifndef FN_PREFETCH
#define FN_PREFETCH 192     /* bytes ahead of the tile being read, per row: 192-256 measured best */
#endif

#include "fastnorm_tile.h"
#include "fastnorm_planar.h"

static int cpu_has_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
    }
    return cached;
}
#else
static inline int cpu_has_avx2(void) { return 0; }
#endif

#ifdef FN_HAVE_NEON
#include "fastnorm_neon.h"
#endif

/* The order kernels are tried in; a kernel of another CPU family never serves (falls through). */
enum { K_AUTO, K_PLANAR, K_TILE16, K_TILE8, K_NEON, K_GENERIC, K_COUNT };
static const char *const KERNEL_NAMES[K_COUNT] = {"auto", "planar", "tile16", "tile8", "neon", "generic"};

/* Run the job with the first kernel, from `want` on (K_AUTO: the fastest), that serves it; *used
   says which. Returns 0, or -1 when out of memory (GIL released: no Python calls). */
static int run_job(job_t *j, int want, int *used) {
#if defined(FN_HAVE_AVX2) || defined(FN_HAVE_NEON)
    /* The SIMD kernels sum in exact integers (FMA in the tile8 one): identical to the unfused,
       ordered float sums while every partial sum is an integer below 2^24. Else the generic
       kernel keeps the order. (At most 64 vertical taps: their row tables live on the stack.) */
    const int exact = 255.0 * j->tx.denom * j->ty.denom < 16777216.0 && j->ty.kmax <= 64;
#endif
#ifdef FN_HAVE_AVX2
    const int simd = want != K_GENERIC && cpu_has_avx2() && exact;
    int wy_ok = 1;                                     /* vertical weights fit pmaddwd's int16 */
    for (size_t i = 0; i < (size_t)j->ty.n * j->ty.kmax; i++) wy_ok &= j->ty.w[i] <= 32767.0f;
    if (simd && want <= K_PLANAR && wy_ok) {
        hplan_t hp;
        const int ok = hplan_init(&hp, &j->tx);
        if (ok < 0) return -1;
        if (ok) {
            const int rc = kernel_planar(j, &hp);
            hplan_free(&hp);
            if (j->stream) _mm_sfence();
            *used = K_PLANAR;
            return rc;
        }
    }
    if (simd && want <= K_TILE16 && 255.0 * j->tx.denom <= 65535.0) {
        const int ntiles = (j->w + 15) / 16, K = j->tx.kmax;
        tile16_t *tiles = malloc(sizeof(tile16_t) * (size_t)ntiles);
        int16_t *wt = malloc(sizeof(int16_t) * (size_t)ntiles * 16 * K);
        int span = 0;
        for (int ti = 0; tiles && wt && ti < ntiles; ti++) {
            tile16_t *tl = tiles + ti;
            const int dx0 = ti * 16, ncols = j->w - dx0 < 16 ? j->w - dx0 : 16, dxe = dx0 + ncols - 1;
            tl->sx_lo = j->tx.start[dx0];
            tl->nvals = (j->tx.start[dxe] + j->tx.count[dxe] - tl->sx_lo) * 3;
            for (int t = 0; t < 16; t++) {
                const int dx = dx0 + (t < ncols ? t : ncols - 1);
                tl->voff[t] = (j->tx.start[dx] - tl->sx_lo) * 3;
                for (int k = 0; k < K; k++) wt[((size_t)ti * 16 + t) * K + k] = (int16_t)j->tx.w[(size_t)dx * K + k];
            }
            if (j->tx.start[dxe] + K - tl->sx_lo > span) span = j->tx.start[dxe] + K - tl->sx_lo;
        }
        const int nring = j->ty.kmax + 16;            /* as below, for blocks of 16 rows */
        const size_t wp = ((size_t)j->w + 15) / 16 * 16, nvec = ((size_t)span * 3 + 15) / 16 * 16;
        __m256i *tbuf = aligned_alloc(32, nvec * sizeof(__m256i));
        if (tbuf) memset(tbuf, 0, nvec * sizeof(__m256i));
        float *ring = aligned_alloc(32, (size_t)nring * 3 * wp * sizeof(float));
        if (!tbuf || !ring || !tiles || !wt) { free(tbuf); free(ring); free(tiles); free(wt); return -1; }
        kernel_avx2_u16(j, tbuf, ring, nring, wp, tiles, wt);
        free(tbuf); free(ring); free(tiles); free(wt);
        if (j->stream) _mm_sfence();
        *used = K_TILE16;
        return 0;
    }
    if (simd && want <= K_TILE8) {
        const int ntiles = (j->w + 7) / 8, K = j->tx.kmax;
        tile_t *tiles = malloc(sizeof(tile_t) * (size_t)ntiles);
        float *wt = malloc(sizeof(float) * (size_t)ntiles * 8 * K);
        int span = 0;                               /* widest source span of a tile, padded taps included */
        for (int ti = 0; tiles && wt && ti < ntiles; ti++) {
            tile_t *tl = tiles + ti;
            const int dx0 = ti * 8, ncols = j->w - dx0 < 8 ? j->w - dx0 : 8, dxe = dx0 + ncols - 1;
            tl->sx_lo = j->tx.start[dx0];
            tl->ncols = ncols;
            /* Padded taps (weight 0) may read past the span: tbuf starts zeroed and only ever
               holds finite values, and 0 * finite adds +0. */
            tl->nvals = (j->tx.start[dxe] + j->tx.count[dxe] - tl->sx_lo) * 3;
            for (int t = 0; t < 8; t++) {
                const int dx = dx0 + (t < ncols ? t : ncols - 1);
                tl->voff[t] = (j->tx.start[dx] - tl->sx_lo) * 3;
                memcpy(wt + ((size_t)ti * 8 + t) * K, j->tx.w + (size_t)dx * K, sizeof(float) * K);
            }
            if (j->tx.start[dxe] + K - tl->sx_lo > span) span = j->tx.start[dxe] + K - tl->sx_lo;
        }
        /* Ring of planar horizontal-sum rows: a pending output row needs rows >= sy0 - kmax + 1
           while the block being written overwrites rows <= sy0 + 7 - nring. */
        const int nring = j->ty.kmax + 8;
        const size_t wp = ((size_t)j->w + 7) / 8 * 8, nvec = ((size_t)span * 3 + 7) / 8 * 8;
        __m256 *tbuf = aligned_alloc(32, nvec * sizeof(__m256));
        if (tbuf) memset(tbuf, 0, nvec * sizeof(__m256));
        float *ring = aligned_alloc(32, (size_t)nring * 3 * wp * sizeof(float));
        if (!tbuf || !ring || !tiles || !wt) { free(tbuf); free(ring); free(tiles); free(wt); return -1; }
        kernel_avx2(j, tbuf, ring, nring, wp, tiles, wt);
        free(tbuf); free(ring); free(tiles); free(wt);
        if (j->stream) _mm_sfence();
        *used = K_TILE8;
        return 0;
    }
#endif
#ifdef FN_HAVE_NEON
    /* Exact integer sums as above; vertical weights (<= Dy) must fit vmlal_n_u16's 16 bits. */
    int neon_ok = want <= K_NEON && exact;
    for (size_t i = 0; neon_ok && i < (size_t)j->ty.n * j->ty.kmax; i++) neon_ok = j->ty.w[i] <= 65535.0f;
    if (neon_ok) {
        nplan_t np;
        const int ok = nplan_init(&np, &j->tx);
        if (ok < 0) return -1;
        if (ok) {
            const int rc = kernel_neon(j, &np);
            nplan_free(&np);
            *used = K_NEON;
            return rc;
        }
    }
#endif
    (void)want;
    *used = K_GENERIC;
    float *hs = malloc(sizeof(float) * 6 * (size_t)j->w);
    if (!hs) return -1;
    kernel_generic(j, hs, hs + 3 * (size_t)j->w);
    free(hs);
    return 0;
}

/* The whole call without Python: taps, coefficients, the kernel. src: H x W BGR pixels, rows rs
   bytes apart; out: (3, h, w) float32 (half = 0) or float16. Returns 0, or -1 when out of memory.
   Runs with the GIL released; runtime/_cext/harness.c calls it directly. */
static int fn_resize_normalize(const uint8_t *src, Py_ssize_t H, Py_ssize_t W, Py_ssize_t rs, void *out, int h, int w,
                               int half, int stream, const double sc[3], const double bi[3], int want, int *used) {
    job_t j;
    memset(&j, 0, sizeof(j));
    j.src = src; j.H = H; j.W = W; j.rs = rs;
    j.out = out; j.h = h; j.w = w; j.half = half; j.stream = stream;
    int rc = -1;
    if (taps_init(&j.tx, W, w) == 0 && taps_init(&j.ty, H, h) == 0) {
        const double denom = j.tx.denom * j.ty.denom;
        for (int c = 0; c < 3; c++) {
            j.k[c] = (float)((double)(float)sc[c] / denom);   /* float32(scale / (Dx*Dy)) */
            j.b[c] = (float)bi[c];
        }
        rc = run_job(&j, want, used);
    }
    taps_free(&j.tx); taps_free(&j.ty);
    return rc;
}

#ifndef FN_STANDALONE
/* The buffer's struct format, minus a native byte-order prefix; NULL means 'B'. */
static const char *fmt_of(const Py_buffer *b) {
    const char *f = b->format ? b->format : "B";
    if (f[0] == '@' || f[0] == '=' || f[0] == '<') f++;
    return f;
}

static PyObject *resize_normalize(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"src", "out", "scale", "bias", "simd", "stream", "kernel", NULL};
    PyObject *src_o, *out_o;
    double sc[3], bi[3];
    int simd = 1, stream = 0, want = K_AUTO, used = K_GENERIC;
    const char *kname = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO(ddd)(ddd)|ppz:resize_normalize", kwlist, &src_o, &out_o,
                                     &sc[0], &sc[1], &sc[2], &bi[0], &bi[1], &bi[2], &simd, &stream, &kname))
        return NULL;
    if (kname) {
        for (want = 0; want < K_COUNT && strcmp(kname, KERNEL_NAMES[want]) != 0; want++) {}
        if (want == K_COUNT) {
            PyErr_Format(PyExc_ValueError, "resize_normalize: unknown kernel '%s' (auto, planar, tile16, tile8, neon, generic)", kname);
            return NULL;
        }
    }
    if (!simd) want = K_GENERIC;
    Py_buffer src, out;
    if (PyObject_GetBuffer(src_o, &src, PyBUF_STRIDES | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(out_o, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    const char *sf = fmt_of(&src), *of = fmt_of(&out);
    if (src.ndim != 3 || src.shape[2] != 3 || src.itemsize != 1 || strcmp(sf, "B") != 0) {
        PyErr_Format(PyExc_ValueError, "resize_normalize: src must be a uint8 (H, W, 3) image, got ndim=%d format '%s'",
                     src.ndim, sf);
        goto fail;
    }
    if (src.shape[0] < 1 || src.shape[1] < 1 || src.strides[2] != 1 || src.strides[1] != 3 ||
        src.strides[0] < src.shape[1] * 3) {
        PyErr_SetString(PyExc_ValueError, "resize_normalize: src must be non-empty with contiguous BGR pixels "
                                          "(channel stride 1, pixel stride 3, positive row stride)");
        goto fail;
    }
    if (out.ndim != 3 || out.shape[0] != 3 || out.shape[1] < 1 || out.shape[2] < 1 ||
        !((strcmp(of, "f") == 0 && out.itemsize == 4) || (strcmp(of, "e") == 0 && out.itemsize == 2))) {
        PyErr_Format(PyExc_ValueError, "resize_normalize: out must be a C-contiguous float32 or float16 (3, h, w) "
                                       "buffer, got ndim=%d format '%s'", out.ndim, of);
        goto fail;
    }
    if (out.shape[1] > (1 << 16) || out.shape[2] > (1 << 16) || src.shape[0] > (1 << 28) || src.shape[1] > (1 << 28)) {
        PyErr_SetString(PyExc_ValueError, "resize_normalize: image or output too large");
        goto fail;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fn_resize_normalize((const uint8_t *)src.buf, src.shape[0], src.shape[1], src.strides[0], out.buf,
                             (int)out.shape[1], (int)out.shape[2], out.itemsize == 2, stream, sc, bi, want, &used);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_NoMemory(); goto fail; }
    PyBuffer_Release(&src); PyBuffer_Release(&out);
    return PyUnicode_FromString(KERNEL_NAMES[used]);
fail:
    PyBuffer_Release(&src); PyBuffer_Release(&out);
    return NULL;
}

/* image_hw(path) -> (height, width) or None. The pixel size a complete JPEG (its first SOFn frame
   header; the file ends with EOI) or PNG (IHDR; the file ends with IEND) declares, from a few
   header bytes: preprocess decodes such files into a buffer of that shape it reuses
   (runtime/preprocess.py). None for anything else, truncated files included. In C because the
   same steps in Python cost ~40 us per image, run as they are after each decode, with cold caches. */
static int image_hw_of(FILE *f, long *h, long *w) {
    static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    static const uint8_t png_end[12] = {0, 0, 0, 0, 'I', 'E', 'N', 'D', 0xae, 0x42, 0x60, 0x82}, eoi[2] = {0xff, 0xd9};
    uint8_t b[4096], t[12];
    const uint8_t *end;
    size_t n = fread(b, 1, 1024, f), pos = 2, endn;
    long base = 0;
    if (n >= 24 && memcmp(b, png_sig, 8) == 0 && memcmp(b + 12, "IHDR", 4) == 0) {
        *w = (long)b[16] << 24 | (long)b[17] << 16 | b[18] << 8 | b[19];
        *h = (long)b[20] << 24 | (long)b[21] << 16 | b[22] << 8 | b[23];
        end = png_end; endn = 12;
    } else if (n >= 2 && b[0] == 0xff && b[1] == 0xd8) {
        int found = 0;
        for (int it = 0; it < 512 && !found; it++) {            /* marker segments up to the frame header */
            if (pos + 9 > n) {                                   /* read on from this segment */
                base += (long)pos;
                if (fseek(f, base, SEEK_SET) != 0) return 0;
                n = fread(b, 1, sizeof b, f); pos = 0;
                if (n < 9) return 0;
            }
            const int m = b[pos + 1];
            if (b[pos] != 0xff) return 0;
            if (m == 0xff) pos += 1;                             /* fill byte */
            else if (m == 0x01 || m == 0xd8 || (m >= 0xd0 && m <= 0xd7)) pos += 2;
            else if (m >= 0xc0 && m <= 0xcf && m != 0xc4 && m != 0xc8 && m != 0xcc) {   /* SOFn: P, Y, X */
                *h = b[pos + 5] << 8 | b[pos + 6]; *w = b[pos + 7] << 8 | b[pos + 8]; found = 1;
            } else if (m == 0xd9 || m == 0xda) return 0;         /* no frame header before the scan */
            else pos += 2 + (size_t)(b[pos + 2] << 8 | b[pos + 3]);
        }
        if (!found) return 0;
        end = eoi; endn = 2;
    } else {
        return 0;
    }
    return fseek(f, -(long)endn, SEEK_END) == 0 && fread(t, 1, endn, f) == endn && memcmp(t, end, endn) == 0;
}

static PyObject *image_hw(PyObject *self, PyObject *arg) {
    PyObject *path = NULL;
    long h = 0, w = 0;
    int ok = 0;
    (void)self;
    if (!PyUnicode_FSConverter(arg, &path)) return NULL;    /* str, bytes or os.PathLike */
    const char *name = PyBytes_AS_STRING(path);
    Py_BEGIN_ALLOW_THREADS                                   /* file I/O: let the other workers run */
    FILE *f = fopen(name, "rb");
    if (f) {
        setvbuf(f, NULL, _IONBF, 0);                         /* our reads are the only ones: no copy */
        ok = image_hw_of(f, &h, &w);
        fclose(f);
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(path);
    if (!ok) Py_RETURN_NONE;
    return Py_BuildValue("(ll)", h, w);
}

static PyObject *simd_name(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
#ifdef FN_HAVE_NEON
    return PyUnicode_FromString("neon");               /* NEON is part of every aarch64 CPU */
#else
    return PyUnicode_FromString(cpu_has_avx2() ? "avx2" : "generic");
#endif
}

static PyMethodDef methods[] = {
    {"resize_normalize", (PyCFunction)(void (*)(void))resize_normalize, METH_VARARGS | METH_KEYWORDS,
     "resize_normalize(src, out, scale, bias, simd=True, stream=False, kernel=None) -> kernel used: (H,W,3) uint8\n"
     "BGR -> exact area resize to out's (h, w), RGB planes of mean*scale[c]+bias[c], into out (3,h,w)\n"
     "float32/float16. kernel: the first to try ('planar', 'tile16', 'tile8', 'neon', 'generic'). Releases the GIL."},
    {"image_hw", image_hw, METH_O, "image_hw(path) -> (height, width) declared by a complete JPEG or PNG file, else None."},
    {"simd", simd_name, METH_NOARGS, "The kernel resize_normalize uses by default here: 'avx2' (AVX2+FMA+F16C), 'neon' (aarch64) or 'generic'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_fastnorm", "Fused preprocessing kernels (see fastnorm.c).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastnorm(void) { return PyModule_Create(&moddef); }
#endif /* FN_STANDALONE */
