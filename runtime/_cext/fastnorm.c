/* runtime._fastnorm: fused area-resize + BGR->RGB + normalize + HWC->CHW (+ float16) in one pass.

     pip install -e .      (builds runtime/_fastnorm*.so in place; optional: runtime/preprocess.py
                            falls back to an exact numpy twin when this module is missing)

   resize_normalize(src, out, scale, bias, simd=True, stream=False)
     src   (H, W, 3) uint8 BGR; pixels contiguous, any row stride (a cropped view is fine)
     out   (3, h, w) float32 or float16, C-contiguous, written in place (e.g. one row of a batch)
     scale, bias: 3 floats each, RGB order; out[c] = area_mean(src[..., 2-c]) * scale[c] + bias[c]
     simd=False forces the generic kernel (tests); stream=True uses non-temporal stores.

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

   Kernels (chosen per call; the GIL is released while they run):
   - AVX2 u16 (x86-64 with AVX2+FMA+F16C, when 255*Dx <= 65535: every COCO width to 448): 16
     source rows ride in the 16 lanes of a vector, so the horizontal taps are whole-vector
     multiply-adds, no gathers: 16x16 byte transpose, exact 16-bit integer taps, 16x16 transpose
     back, float32 planar rows into a small ring; each output row is then a contiguous vertical
     multiply-add fused with scale/bias and the store (streaming stores on request, for batch
     buffers larger than the cache).
   - AVX2 float: the same with 8 rows in float32 lanes, for wider horizontal footprints.
   - generic: plain loops, row by row (other CPUs, and the rare sizes outside the exact range).
   Instruction counts (callgrind, 640x480 -> 448x448, AVX2 u16): 2.5M per image.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FN_HAVE_AVX2 1
#include <immintrin.h>
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
   1/n_out source pixels; every boundary is a multiple of g = gcd(n_in, n_out). */
static int taps_init(taps_t *t, int64_t n_in, int64_t n_out) {
    int64_t g = gcd64(n_in, n_out), kmax = 0;
    memset(t, 0, sizeof(*t));
    for (int64_t d = 0; d < n_out; d++) {
        int64_t a = d * n_in, b = a + n_in, k = (b - 1) / n_out - a / n_out + 1;
        if (k > kmax) kmax = k;
    }
    t->n = (int)n_out; t->kmax = (int)kmax; t->denom = (double)(n_in / g);
    t->start = malloc(sizeof(int) * n_out);
    t->count = malloc(sizeof(int) * n_out);
    t->w = calloc((size_t)(n_out * kmax), sizeof(float));
    if (!t->start || !t->count || !t->w) { taps_free(t); return -1; }
    for (int64_t d = 0; d < n_out; d++) {
        int64_t a = d * n_in, b = a + n_in, s0 = a / n_out, s1 = (b - 1) / n_out;
        t->start[d] = (int)s0; t->count[d] = (int)(s1 - s0 + 1);
        for (int64_t s = s0; s <= s1; s++) {
            int64_t lo = s * n_out > a ? s * n_out : a, hi = (s + 1) * n_out < b ? (s + 1) * n_out : b;
            t->w[d * kmax + (s - s0)] = (float)((hi - lo) / g);
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

/* r[0..7] rows -> r[0..7] columns (8x8 float transpose). */
FN_AVX2 static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

FN_AVX2 static inline __m256 cvt8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Emit output row dy from the ring of horizontal sums (planar rows of wp floats): vertical taps,
   scale and bias, store. Every sum is >= 0, so starting from the first product equals 0 + it.
   Streaming (non-temporal) stores skip the read-for-ownership of a large batch buffer. */
#define FN_VSUM(x0)                                                                           \
    __m256 acc = _mm256_mul_ps(_mm256_set1_ps(wy[0]), _mm256_loadu_ps(rows[0] + (x0)));      \
    for (int k = 1; k < cnt; k++)                                                             \
        acc = _mm256_fmadd_ps(_mm256_set1_ps(wy[k]), _mm256_loadu_ps(rows[k] + (x0)), acc);  \
    const __m256 v = _mm256_add_ps(_mm256_mul_ps(acc, kc), bc);

FN_AVX2 static void emit_row_avx2(const job_t *j, const float *ring, int nring, size_t wp, int dy) {
    const int w = j->w, cnt = j->ty.count[dy], w8 = w / 8 * 8;
    const size_t plane = (size_t)j->h * w;
    const float *wy = j->ty.w + (size_t)dy * j->ty.kmax;
    for (int c = 0; c < 3; c++) {
        const float *rows[64];
        for (int k = 0; k < cnt; k++) rows[k] = ring + (size_t)((j->ty.start[dy] + k) % nring) * 3 * wp + c * wp;
        const __m256 kc = _mm256_set1_ps(j->k[c]), bc = _mm256_set1_ps(j->b[c]);
        const size_t o = c * plane + (size_t)dy * w;
        if (j->half) {
            uint16_t *p = (uint16_t *)j->out + o;
            const int nt = j->stream && ((uintptr_t)p & 15) == 0 && (w & 7) == 0;
            for (int x0 = 0; x0 < w8; x0 += 8) {
                FN_VSUM(x0)
                __m128i hv = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
                if (nt) _mm_stream_si128((__m128i *)(p + x0), hv);
                else _mm_storeu_si128((__m128i *)(p + x0), hv);
            }
            if (w8 < w) {
                FN_VSUM(w8)
                uint16_t tmp[8];
                _mm_storeu_si128((__m128i *)tmp, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
                memcpy(p + w8, tmp, sizeof(uint16_t) * (size_t)(w - w8));
            }
        } else {
            float *p = (float *)j->out + o;
            if (j->stream && ((uintptr_t)p & 31) == 0 && (w & 7) == 0) {
                for (int x0 = 0; x0 < w8; x0 += 8) { FN_VSUM(x0) _mm256_stream_ps(p + x0, v); }
            } else if (cnt == 2) {                        /* the common case: both taps hoisted */
                const __m256 w0 = _mm256_set1_ps(wy[0]), w1 = _mm256_set1_ps(wy[1]);
                const float *r0 = rows[0], *r1 = rows[1];
                for (int x0 = 0; x0 < w8; x0 += 8) {
                    __m256 acc = _mm256_fmadd_ps(w1, _mm256_loadu_ps(r1 + x0), _mm256_mul_ps(w0, _mm256_loadu_ps(r0 + x0)));
                    _mm256_storeu_ps(p + x0, _mm256_add_ps(_mm256_mul_ps(acc, kc), bc));
                }
            } else {
                for (int x0 = 0; x0 < w8; x0 += 8) { FN_VSUM(x0) _mm256_storeu_ps(p + x0, v); }
            }
            if (w8 < w) {
                FN_VSUM(w8)
                float tmp[8];
                _mm256_storeu_ps(tmp, v);
                memcpy(p + w8, tmp, sizeof(float) * (size_t)(w - w8));
            }
        }
    }
}

/* Horizontal taps of one 8-column tile for K taps per column (zero-padded: +0 changes nothing).
   voff[t]: column dx0+t's first value in the tile's transposed values tb; wx: its K weights.
   res[c][t] lane l: row sy0+l, column dx0+t. */
FN_AVX2 static inline __attribute__((always_inline)) void htile(const __m256 *tb, const int *voff, const float *wx,
                                                               int K, __m256 res[3][8]) {
    for (int t = 0; t < 8; t++, wx += K) {
        const __m256 *v = tb + voff[t];
        __m256 wv = _mm256_set1_ps(wx[0]);
        __m256 a0 = _mm256_mul_ps(wv, v[0]), a1 = _mm256_mul_ps(wv, v[1]), a2 = _mm256_mul_ps(wv, v[2]);
        for (int k = 1; k < K; k++) {
            wv = _mm256_set1_ps(wx[k]);
            a0 = _mm256_fmadd_ps(wv, v[3 * k], a0);
            a1 = _mm256_fmadd_ps(wv, v[3 * k + 1], a1);
            a2 = _mm256_fmadd_ps(wv, v[3 * k + 2], a2);
        }
        res[0][t] = a2; res[1][t] = a1; res[2][t] = a0;   /* RGB plane order */
    }
}

/* Per 8-column tile, the same for every block of source rows: computed once per image. */
typedef struct { int sx_lo, nvals, ncols; int voff[8]; } tile_t;

/* Horizontal-first: 8 source rows ride in the 8 lanes. For each 8-column output tile:
   8 rows x (span*3) bytes -> floats, transposed (tbuf[i] lane l = row sy0+l, value i), the
   horizontal taps as whole-vector multiply-adds, transposed back into planar rows of the ring.
   Output rows are emitted (vertical taps, scale/bias, store) as soon as their rows are in.
   wt: per tile, 8 columns x K weights (the last column repeated in a partial tile). */
FN_AVX2 static void kernel_avx2(const job_t *j, __m256 *tbuf, float *ring, int nring, size_t wp,
                                const tile_t *tiles, const float *wt) {
    const Py_ssize_t rowlen = j->W * 3;
    const int w = j->w, K = j->tx.kmax, ntiles = (w + 7) / 8;
    int dy_next = 0;
    for (Py_ssize_t sy0 = 0; sy0 < j->H; sy0 += 8) {
        const int nr = j->H - sy0 < 8 ? (int)(j->H - sy0) : 8;
        const uint8_t *rowp[8];
        float *dst[8];
        for (int l = 0; l < 8; l++) {
            rowp[l] = j->src + (sy0 + (l < nr ? l : nr - 1)) * j->rs;
            dst[l] = ring + (size_t)((sy0 + l) % nring) * 3 * wp;
        }
        for (int ti = 0; ti < ntiles; ti++) {
            const tile_t *tl = tiles + ti;
            const int dx0 = ti * 8;
            const Py_ssize_t base = (Py_ssize_t)tl->sx_lo * 3;
            for (int l = 0; l < 8; l++) _mm_prefetch((const char *)(rowp[l] + base + FN_PREFETCH), _MM_HINT_T0);
            for (int i0 = 0; i0 < tl->nvals; i0 += 8) {
                __m256 r[8];
                const Py_ssize_t off = base + i0;
                if (off + 8 <= rowlen) {
                    for (int l = 0; l < 8; l++) r[l] = cvt8(rowp[l] + off);
                } else {                                       /* the image's last bytes, zero-padded */
                    for (int l = 0; l < 8; l++) {
                        uint8_t tmp[8] = {0};
                        if (off < rowlen) memcpy(tmp, rowp[l] + off, (size_t)(rowlen - off));
                        r[l] = cvt8(tmp);
                    }
                }
                transpose8(r);
                for (int q = 0; q < 8; q++) tbuf[i0 + q] = r[q];
            }
            __m256 res[3][8];
            const float *wx = wt + (size_t)ti * 8 * K;
            switch (K) {                                       /* constant trip counts unroll */
            case 1: htile(tbuf, tl->voff, wx, 1, res); break;
            case 2: htile(tbuf, tl->voff, wx, 2, res); break;
            case 3: htile(tbuf, tl->voff, wx, 3, res); break;
            case 4: htile(tbuf, tl->voff, wx, 4, res); break;
            default: htile(tbuf, tl->voff, wx, K, res);
            }
            for (int c = 0; c < 3; c++) {
                transpose8(res[c]);                            /* res[c][l]: row sy0+l, columns dx0.. */
                const size_t o = c * wp + dx0;
                if (nr == 8) {
                    _mm256_storeu_ps(dst[0] + o, res[c][0]); _mm256_storeu_ps(dst[1] + o, res[c][1]);
                    _mm256_storeu_ps(dst[2] + o, res[c][2]); _mm256_storeu_ps(dst[3] + o, res[c][3]);
                    _mm256_storeu_ps(dst[4] + o, res[c][4]); _mm256_storeu_ps(dst[5] + o, res[c][5]);
                    _mm256_storeu_ps(dst[6] + o, res[c][6]); _mm256_storeu_ps(dst[7] + o, res[c][7]);
                } else {
                    for (int l = 0; l < nr; l++) _mm256_storeu_ps(dst[l] + o, res[c][l]);
                }
            }
        }
        const Py_ssize_t last = sy0 + nr - 1;
        while (dy_next < j->h && j->ty.start[dy_next] + j->ty.count[dy_next] - 1 <= last)
            emit_row_avx2(j, ring, nring, wp, dy_next++);
    }
}

/* ---- 16-bit variant: 16 source rows in the 16 lanes, integer horizontal taps. Used when every
   horizontal sum fits 16 bits (255 * Dx <= 65535): then the integer sums are exact and equal
   the float ones. Byte-level transposes are cheaper per value than float ones. */

/* r[0..15]: 16 rows x 16 bytes -> r[j]: column j (16 rows), the classic 4-stage unpack. */
FN_AVX2 static inline void transpose16_u8(__m128i r[16]) {
    __m128i a[16], b[16], c[16];
    for (int i = 0; i < 8; i++) {              /* a[2i+h]: rows 2i,2i+1; columns 8h..8h+7 */
        a[2 * i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
    }
    for (int q = 0; q < 4; q++)                /* b[4q+g]: rows 4q..4q+3; columns 4g..4g+3 */
        for (int h = 0; h < 2; h++) {
            b[4 * q + 2 * h] = _mm_unpacklo_epi16(a[4 * q + h], a[4 * q + 2 + h]);
            b[4 * q + 2 * h + 1] = _mm_unpackhi_epi16(a[4 * q + h], a[4 * q + 2 + h]);
        }
    for (int o = 0; o < 2; o++)                /* c[8o+p]: rows 8o..8o+7; columns 2p, 2p+1 */
        for (int g = 0; g < 4; g++) {
            c[8 * o + 2 * g] = _mm_unpacklo_epi32(b[8 * o + g], b[8 * o + 4 + g]);
            c[8 * o + 2 * g + 1] = _mm_unpackhi_epi32(b[8 * o + g], b[8 * o + 4 + g]);
        }
    for (int p = 0; p < 8; p++) {
        r[2 * p] = _mm_unpacklo_epi64(c[p], c[8 + p]);
        r[2 * p + 1] = _mm_unpackhi_epi64(c[p], c[8 + p]);
    }
}

/* v[t] (lane l = row l) for t = 0..7 -> per 128-bit half an 8x8 transpose: v[i] holds row i
   (low half) and row 8+i (high half), columns 0..7. */
FN_AVX2 static inline void transpose8x8_u16_lanes(__m256i v[8]) {
    __m256i p[8], q[8];
    for (int i = 0; i < 4; i++) {              /* p[2i+h]: columns 2i,2i+1; rows 4h..4h+3 */
        p[2 * i] = _mm256_unpacklo_epi16(v[2 * i], v[2 * i + 1]);
        p[2 * i + 1] = _mm256_unpackhi_epi16(v[2 * i], v[2 * i + 1]);
    }
    for (int m = 0; m < 2; m++)                /* q[4m+r]: columns 4m..4m+3; rows 2r, 2r+1 */
        for (int h = 0; h < 2; h++) {
            q[4 * m + 2 * h] = _mm256_unpacklo_epi32(p[4 * m + h], p[4 * m + 2 + h]);
            q[4 * m + 2 * h + 1] = _mm256_unpackhi_epi32(p[4 * m + h], p[4 * m + 2 + h]);
        }
    for (int r = 0; r < 4; r++) {
        v[2 * r] = _mm256_unpacklo_epi64(q[r], q[4 + r]);
        v[2 * r + 1] = _mm256_unpackhi_epi64(q[r], q[4 + r]);
    }
}

FN_AVX2 static inline void store_row16(float *dst, __m256i row) {   /* 16 u16 -> 16 float32 */
    _mm256_storeu_ps(dst, _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(row))));
    _mm256_storeu_ps(dst + 8, _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(row, 1))));
}

FN_AVX2 static inline __attribute__((always_inline)) void htile16(const __m256i *tb, const int *voff,
                                                                 const int16_t *wx, int K, __m256i res[3][16]) {
    for (int t = 0; t < 16; t++, wx += K) {
        const __m256i *v = tb + voff[t];
        __m256i wv = _mm256_set1_epi16(wx[0]);
        __m256i a0 = _mm256_mullo_epi16(wv, v[0]), a1 = _mm256_mullo_epi16(wv, v[1]), a2 = _mm256_mullo_epi16(wv, v[2]);
        for (int k = 1; k < K; k++) {
            wv = _mm256_set1_epi16(wx[k]);
            a0 = _mm256_add_epi16(a0, _mm256_mullo_epi16(wv, v[3 * k]));
            a1 = _mm256_add_epi16(a1, _mm256_mullo_epi16(wv, v[3 * k + 1]));
            a2 = _mm256_add_epi16(a2, _mm256_mullo_epi16(wv, v[3 * k + 2]));
        }
        res[0][t] = a2; res[1][t] = a1; res[2][t] = a0;   /* RGB plane order */
    }
}

typedef struct { int sx_lo, nvals; int voff[16]; } tile16_t;


FN_AVX2 static void kernel_avx2_u16(const job_t *j, __m256i *tbuf, float *ring, int nring, size_t wp,
                                    const tile16_t *tiles, const int16_t *wt) {
    const Py_ssize_t rowlen = j->W * 3;
    const int w = j->w, K = j->tx.kmax, ntiles = (w + 15) / 16;
    int dy_next = 0;
    for (Py_ssize_t sy0 = 0; sy0 < j->H; sy0 += 16) {
        const int nr = j->H - sy0 < 16 ? (int)(j->H - sy0) : 16;
        const uint8_t *rowp[16];
        float *dst[16];
        for (int l = 0; l < 16; l++) {
            rowp[l] = j->src + (sy0 + (l < nr ? l : nr - 1)) * j->rs;
            dst[l] = ring + (size_t)((sy0 + l) % nring) * 3 * wp;
        }
        for (int ti = 0; ti < ntiles; ti++) {
            const tile16_t *tl = tiles + ti;
            const int dx0 = ti * 16;
            const Py_ssize_t base = (Py_ssize_t)tl->sx_lo * 3;
            /* 16 rows are read side by side, more streams than the hardware prefetcher follows:
               ask for the bytes a few tiles ahead (prefetches never fault, even past the end). */
            for (int l = 0; l < 16; l++) _mm_prefetch((const char *)(rowp[l] + base + FN_PREFETCH), _MM_HINT_T0);
            for (int i0 = 0; i0 < tl->nvals; i0 += 16) {      /* bytes -> transposed u16 */
                __m128i r[16];
                const Py_ssize_t off = base + i0;
                if (off + 16 <= rowlen) {
                    for (int l = 0; l < 16; l++) r[l] = _mm_loadu_si128((const __m128i *)(rowp[l] + off));
                } else {                                       /* the image's last bytes, zero-padded */
                    for (int l = 0; l < 16; l++) {
                        uint8_t tmp[16] = {0};
                        if (off < rowlen) memcpy(tmp, rowp[l] + off, (size_t)(rowlen - off));
                        r[l] = _mm_loadu_si128((const __m128i *)tmp);
                    }
                }
                transpose16_u8(r);
                for (int q = 0; q < 16; q++) tbuf[i0 + q] = _mm256_cvtepu8_epi16(r[q]);
            }
            __m256i res[3][16];
            const int16_t *wx = wt + (size_t)ti * 16 * K;
            switch (K) {
            case 1: htile16(tbuf, tl->voff, wx, 1, res); break;
            case 2: htile16(tbuf, tl->voff, wx, 2, res); break;
            case 3: htile16(tbuf, tl->voff, wx, 3, res); break;
            case 4: htile16(tbuf, tl->voff, wx, 4, res); break;
            default: htile16(tbuf, tl->voff, wx, K, res);
            }
            for (int c = 0; c < 3; c++) {
                transpose8x8_u16_lanes(res[c]);            /* columns 0..7 */
                transpose8x8_u16_lanes(res[c] + 8);        /* columns 8..15 */
                const size_t o = c * wp + dx0;
                for (int i = 0; i < 8; i++) {
                    if (i < nr) store_row16(dst[i] + o, _mm256_permute2x128_si256(res[c][i], res[c][8 + i], 0x20));
                    if (8 + i < nr) store_row16(dst[8 + i] + o, _mm256_permute2x128_si256(res[c][i], res[c][8 + i], 0x31));
                }
            }
        }
        const Py_ssize_t last = sy0 + nr - 1;
        while (dy_next < j->h && j->ty.start[dy_next] + j->ty.count[dy_next] - 1 <= last)
            emit_row_avx2(j, ring, nring, wp, dy_next++);
    }
}

static int cpu_has_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
    }
    return cached;
}
#else
static int cpu_has_avx2(void) { return 0; }
#endif

/* Run the job; returns 0, or -1 when out of memory (GIL released: no Python calls). */
static int run_job(job_t *j, int simd) {
#ifdef FN_HAVE_AVX2
    /* The SIMD kernel fuses the tap multiply-adds (FMA): identical to the unfused, ordered sums
       while every partial sum is an integer below 2^24. Else the generic kernel keeps the order. */
    const int exact = 255.0 * j->tx.denom * j->ty.denom < 16777216.0;
    if (simd && cpu_has_avx2() && exact && j->ty.kmax <= 64 && 255.0 * j->tx.denom <= 65535.0) {
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
        return 0;
    }
    if (simd && cpu_has_avx2() && exact && j->ty.kmax <= 64) {
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
        return 0;
    }
#endif
    (void)simd;
    float *hs = malloc(sizeof(float) * 6 * (size_t)j->w);
    if (!hs) return -1;
    kernel_generic(j, hs, hs + 3 * (size_t)j->w);
    free(hs);
    return 0;
}

/* The buffer's struct format, minus a native byte-order prefix; NULL means 'B'. */
static const char *fmt_of(const Py_buffer *b) {
    const char *f = b->format ? b->format : "B";
    if (f[0] == '@' || f[0] == '=' || f[0] == '<') f++;
    return f;
}

static PyObject *resize_normalize(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"src", "out", "scale", "bias", "simd", "stream", NULL};
    PyObject *src_o, *out_o;
    double sc[3], bi[3];
    int simd = 1, stream = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO(ddd)(ddd)|pp:resize_normalize", kwlist, &src_o, &out_o,
                                     &sc[0], &sc[1], &sc[2], &bi[0], &bi[1], &bi[2], &simd, &stream))
        return NULL;
    Py_buffer src, out;
    if (PyObject_GetBuffer(src_o, &src, PyBUF_STRIDES | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(out_o, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    job_t j;
    memset(&j, 0, sizeof(j));
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
    j.src = (const uint8_t *)src.buf; j.H = src.shape[0]; j.W = src.shape[1]; j.rs = src.strides[0];
    j.out = out.buf; j.h = (int)out.shape[1]; j.w = (int)out.shape[2]; j.half = out.itemsize == 2;
    j.stream = stream;
    if (taps_init(&j.tx, j.W, j.w) < 0 || taps_init(&j.ty, j.H, j.h) < 0) { PyErr_NoMemory(); goto fail; }
    const double denom = j.tx.denom * j.ty.denom;
    for (int c = 0; c < 3; c++) {
        j.k[c] = (float)((double)(float)sc[c] / denom);   /* float32(scale / (Dx*Dy)) */
        j.b[c] = (float)bi[c];
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_job(&j, simd);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_NoMemory(); goto fail; }
    taps_free(&j.tx); taps_free(&j.ty);
    PyBuffer_Release(&src); PyBuffer_Release(&out);
    Py_RETURN_NONE;
fail:
    taps_free(&j.tx); taps_free(&j.ty);
    PyBuffer_Release(&src); PyBuffer_Release(&out);
    return NULL;
}

static PyObject *simd_name(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyUnicode_FromString(cpu_has_avx2() ? "avx2" : "generic");
}

static PyMethodDef methods[] = {
    {"resize_normalize", (PyCFunction)(void (*)(void))resize_normalize, METH_VARARGS | METH_KEYWORDS,
     "resize_normalize(src, out, scale, bias, simd=True, stream=False): (H,W,3) uint8 BGR -> exact area resize\n"
     "to out's (h, w), RGB planes of mean*scale[c]+bias[c], into out (3,h,w) float32/float16. Releases the GIL."},
    {"simd", simd_name, METH_NOARGS, "The kernel resize_normalize uses by default here: 'avx2' (AVX2+FMA+F16C) or 'generic'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_fastnorm", "Fused preprocessing kernels (see fastnorm.c).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastnorm(void) { return PyModule_Create(&moddef); }
