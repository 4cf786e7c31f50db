/* fastnorm_neon.h: the aarch64 NEON planar kernel (Jetson and other Arm CPUs). A fragment of
   fastnorm.c, included there inside #ifdef FN_HAVE_NEON after the job and tap definitions it
   uses; not a standalone header. Checked on x86 under qemu-user: `make test-aarch64`.

   The same exact-integer plan as the AVX2 planar kernel, in the instructions NEON has for it:
   - vld3q_u8 splits 16 BGR pixels into B, G, R byte planes in one instruction;
   - horizontal taps: every 16 outputs of a plane read one 32-byte window; per tap k, vqtbl2q_u8
     picks each output's k-th source byte (index 0xff for a padded tap gives 0) and
     vmlal_u8/vmlal_high_u8 add byte x byte weight into 16-bit sums. Wider footprints (camera
     frames: 1280 or 1920 columns to 448) give each 8 outputs their own 64-byte window
     (vqtbl4_u8), up to ~7.9 source pixels per output. Unsigned throughout:
     weights <= Dx <= 255 fit a byte and sums <= 255*Dx fit 16 bits, so no offset trick;
   - vertical taps: vmlal_n_u16 (16-bit row sums x 16-bit weight into 32 bits) over a ring of
     kmax + 1 rows of sums, then float32(A) * k + b (vmulq_f32, vaddq_f32: two roundings, never
     fused under -ffp-contract=off) and the store, float16 via vcvt_f16_f32 (round to nearest
     even, as numpy's astype).
   Every sum is the exact integer the generic kernel and the numpy twin compute, so the output
   bits are the same. No non-temporal stores (stream is accepted and changes nothing here). */

/* vld1q_u8_x2/_x4 load a table straight into the register group tbl reads (GCC 12 spills a
   struct built from single loads through the stack: 2.87 M -> 2.64 M instructions per image);
   GCC added them to aarch64 only in 9.x-10.3 (missing in JetPack 4's 7.5), so older compilers
   get the single loads: the same results. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11)
#define fn_ld1x2 vld1q_u8_x2
#define fn_ld1x4 vld1q_u8_x4
#else
static inline uint8x16x2_t fn_ld1x2(const uint8_t *p) { uint8x16x2_t v; v.val[0] = vld1q_u8(p); v.val[1] = vld1q_u8(p + 16); return v; }
static inline uint8x16x4_t fn_ld1x4(const uint8_t *p) {
    uint8x16x4_t v;
    for (int i = 0; i < 4; i++) v.val[i] = vld1q_u8(p + 16 * i);
    return v;
}
#endif

typedef struct {
    int ngroups, K;     /* groups of 16 outputs; taps per output (the axis' kmax) */
    int wide;           /* 0: one 32-byte window per group; 1: a 64-byte one per 8 outputs */
    int *base;          /* per group: the window's first source pixel (wide: two, outputs 0-7, 8-15) */
    uint8_t *idx, *wts; /* per group and tap: 16 window indices (0xff: padded tap), 16 weights */
} nplan_t;

static void nplan_free(nplan_t *p) { free(p->base); free(p->idx); free(p->wts); p->base = NULL; p->idx = p->wts = NULL; }

/* Fill the plan for one window layout: 1 when every tap fits it, 0 when not, -1 out of memory. */
static int nplan_fill(nplan_t *p, const taps_t *tx, int wide) {
    const int w = tx->n, K = tx->kmax, ng = (w + 15) / 16, span = wide ? 64 : 32;
    nplan_free(p);
    p->ngroups = ng; p->K = K; p->wide = wide;
    p->base = malloc(sizeof(int) * 2 * (size_t)ng);
    p->idx = malloc((size_t)ng * K * 16);
    p->wts = malloc((size_t)ng * K * 16);
    if (!p->base || !p->idx || !p->wts) { nplan_free(p); return -1; }
    for (int g = 0; g < ng; g++) {
        for (int half = 0; half < 2; half++) {
            const int d0 = 16 * g + 8 * half < w ? 16 * g + 8 * half : w - 1;
            p->base[2 * g + half] = tx->start[wide ? d0 : 16 * g];
        }
        for (int i = 0; i < 16; i++) {
            const int dx = 16 * g + i, b = p->base[2 * g + (wide && i >= 8)];
            for (int k = 0; k < K; k++) {
                const size_t at = ((size_t)g * K + k) * 16 + i;
                if (dx < w && k < tx->count[dx]) {
                    const int off = tx->start[dx] + k - b;
                    if (off >= span) { nplan_free(p); return 0; }
                    p->idx[at] = (uint8_t)off;
                    p->wts[at] = (uint8_t)tx->w[(size_t)dx * K + k];
                } else {
                    p->idx[at] = 0xff; p->wts[at] = 0;             /* out of the table: reads 0 */
                }
            }
        }
    }
    return 1;
}

/* 1 with the plan filled when this axis fits (Dx <= 255 and every 16 outputs' taps within 32
   bytes, or every 8 outputs' within 64), 0 when not, -1 when out of memory. */
static int nplan_init(nplan_t *p, const taps_t *tx) {
    memset(p, 0, sizeof(*p));
    if (tx->denom > 255.0 || tx->kmax > 64) return 0;
    const int ok = nplan_fill(p, tx, 0);
    return ok ? ok : nplan_fill(p, tx, 1);
}

/* One BGR row of W pixels -> byte planes pb, pg, pr. */
static void deinterleave_neon(const uint8_t *s, Py_ssize_t W, uint8_t *pb, uint8_t *pg, uint8_t *pr) {
    Py_ssize_t i = 0;
    for (; i + 16 <= W; i += 16) {
        const uint8x16x3_t v = vld3q_u8(s + 3 * i);
        vst1q_u8(pb + i, v.val[0]); vst1q_u8(pg + i, v.val[1]); vst1q_u8(pr + i, v.val[2]);
    }
    for (; i < W; i++) { pb[i] = s[3 * i]; pg[i] = s[3 * i + 1]; pr[i] = s[3 * i + 2]; }
}

/* Horizontal sums of one byte plane into dst (ngroups*16 uint16). */
static inline __attribute__((always_inline)) void hrow_neon_t(const uint8_t *pl, const nplan_t *p, uint16_t *dst, int K) {
    for (int g = 0; g < p->ngroups; g++) {
        const uint8_t *s = pl + p->base[2 * g], *ix = p->idx + (size_t)g * K * 16, *wt = p->wts + (size_t)g * K * 16;
        const uint8x16x2_t win = fn_ld1x2(s);          /* one load into the register pair tbl reads */
        uint16x8_t lo = vdupq_n_u16(0), hi = vdupq_n_u16(0);
        for (int k = 0; k < K; k++) {
            const uint8x16_t t = vqtbl2q_u8(win, vld1q_u8(ix + 16 * k)), wk = vld1q_u8(wt + 16 * k);
            lo = vmlal_u8(lo, vget_low_u8(t), vget_low_u8(wk));
            hi = vmlal_high_u8(hi, t, wk);
        }
        vst1q_u16(dst + 16 * g, lo); vst1q_u16(dst + 16 * g + 8, hi);
    }
}

/* The same with a 64-byte window per 8 outputs (low index bytes: outputs 0-7, high: 8-15). */
static inline __attribute__((always_inline)) void hrow_wide_t(const uint8_t *pl, const nplan_t *p, uint16_t *dst, int K) {
    for (int g = 0; g < p->ngroups; g++) {
        const uint8_t *ix = p->idx + (size_t)g * K * 16, *wt = p->wts + (size_t)g * K * 16;
        const uint8x16x4_t a = fn_ld1x4(pl + p->base[2 * g]), b = fn_ld1x4(pl + p->base[2 * g + 1]);
        uint16x8_t lo = vdupq_n_u16(0), hi = vdupq_n_u16(0);
        for (int k = 0; k < K; k++) {
            const uint8x16_t ik = vld1q_u8(ix + 16 * k), wk = vld1q_u8(wt + 16 * k);
            lo = vmlal_u8(lo, vqtbl4_u8(a, vget_low_u8(ik)), vget_low_u8(wk));
            hi = vmlal_u8(hi, vqtbl4_u8(b, vget_high_u8(ik)), vget_high_u8(wk));
        }
        vst1q_u16(dst + 16 * g, lo); vst1q_u16(dst + 16 * g + 8, hi);
    }
}

static void hrow_neon(const uint8_t *pl, const nplan_t *p, uint16_t *dst) {
    switch (p->wide ? 8 + (p->K <= 7 ? p->K : 0) : (p->K <= 3 ? p->K : 0)) {   /* constant trip counts unroll */
    case 1: hrow_neon_t(pl, p, dst, 1); break;
    case 2: hrow_neon_t(pl, p, dst, 2); break;
    case 3: hrow_neon_t(pl, p, dst, 3); break;
    case 0: hrow_neon_t(pl, p, dst, p->K); break;
    case 11: hrow_wide_t(pl, p, dst, 3); break;
    case 12: hrow_wide_t(pl, p, dst, 4); break;
    case 13: hrow_wide_t(pl, p, dst, 5); break;
    case 14: hrow_wide_t(pl, p, dst, 6); break;
    case 15: hrow_wide_t(pl, p, dst, 7); break;
    default: hrow_wide_t(pl, p, dst, p->K);
    }
}

/* 8 outputs of one plane at x0: vertical taps over rows r[0..cnt-1], then x*k + b. */
static inline __attribute__((always_inline)) void vsum8_neon(const uint16_t *const *r, const uint16_t *wy, int cnt,
                                                            int x0, float32x4_t kc, float32x4_t bc,
                                                            float32x4_t *f0, float32x4_t *f1) {
    uint16x8_t a = vld1q_u16(r[0] + x0);
    uint32x4_t lo = vmull_n_u16(vget_low_u16(a), wy[0]), hi = vmull_high_n_u16(a, wy[0]);
    for (int k = 1; k < cnt; k++) {
        a = vld1q_u16(r[k] + x0);
        lo = vmlal_n_u16(lo, vget_low_u16(a), wy[k]);
        hi = vmlal_high_n_u16(hi, a, wy[k]);
    }
    *f0 = vaddq_f32(vmulq_f32(vcvtq_f32_u32(lo), kc), bc);   /* A < 2^24: the conversion is exact */
    *f1 = vaddq_f32(vmulq_f32(vcvtq_f32_u32(hi), kc), bc);
}

static inline uint16x8_t to_f16_neon(float32x4_t f0, float32x4_t f1) {
    return vreinterpretq_u16_f16(vcvt_high_f16_f32(vcvt_f16_f32(f0), f1));
}

/* One plane's output row: whole blocks of 8 with the tap count and dtype known at compile time
   (the dispatch below), then the partial block through a small buffer. */
static inline __attribute__((always_inline)) void vplane_neon(const uint16_t *const *r, const uint16_t *wy, int cnt,
                                                             int half, float32x4_t kc, float32x4_t bc, void *dst, int w) {
    const int w8 = w / 8 * 8;
    float32x4_t f0, f1;
    for (int x0 = 0; x0 < w8; x0 += 8) {
        vsum8_neon(r, wy, cnt, x0, kc, bc, &f0, &f1);
        if (half) vst1q_u16((uint16_t *)dst + x0, to_f16_neon(f0, f1));
        else { vst1q_f32((float *)dst + x0, f0); vst1q_f32((float *)dst + x0 + 4, f1); }
    }
    if (w8 < w) {                                      /* ring rows are padded to 16: reads stay inside */
        vsum8_neon(r, wy, cnt, w8, kc, bc, &f0, &f1);
        if (half) {
            uint16_t t[8];
            vst1q_u16(t, to_f16_neon(f0, f1));
            memcpy((uint16_t *)dst + w8, t, sizeof(uint16_t) * (size_t)(w - w8));
        } else {
            float t[8];
            vst1q_f32(t, f0); vst1q_f32(t + 4, f1);
            memcpy((float *)dst + w8, t, sizeof(float) * (size_t)(w - w8));
        }
    }
}

/* Output row dy of the three planes: vertical taps over the ring, scale and bias, store. */
static void vrow_neon(const job_t *j, const uint16_t *ring, int nring, size_t wp, int dy) {
    const int w = j->w, cnt = j->ty.count[dy];
    const float *wyf = j->ty.w + (size_t)dy * j->ty.kmax;
    const size_t plane = (size_t)j->h * w, item = j->half ? 2 : 4;
    uint16_t wy[64];
    for (int k = 0; k < cnt; k++) wy[k] = (uint16_t)wyf[k];
    for (int c = 0; c < 3; c++) {
        const uint16_t *r[64];
        for (int k = 0; k < cnt; k++) r[k] = ring + (size_t)((j->ty.start[dy] + k) % nring) * 3 * wp + c * wp;
        const float32x4_t kc = vdupq_n_f32(j->k[c]), bc = vdupq_n_f32(j->b[c]);
        void *dst = (uint8_t *)j->out + (c * plane + (size_t)dy * w) * item;
        switch (4 * (cnt <= 3 ? cnt : 0) + j->half) {  /* constant tap counts and dtypes */
        case 4: vplane_neon(r, wy, 1, 0, kc, bc, dst, w); break;
        case 5: vplane_neon(r, wy, 1, 1, kc, bc, dst, w); break;
        case 8: vplane_neon(r, wy, 2, 0, kc, bc, dst, w); break;
        case 9: vplane_neon(r, wy, 2, 1, kc, bc, dst, w); break;
        case 12: vplane_neon(r, wy, 3, 0, kc, bc, dst, w); break;
        case 13: vplane_neon(r, wy, 3, 1, kc, bc, dst, w); break;
        default: vplane_neon(r, wy, cnt, j->half, kc, bc, dst, w);
        }
    }
}

/* Returns 0, or -1 when out of memory. The caller checked exactness, ty.kmax <= 64 and that
   the vertical weights fit 16 bits. */
static int kernel_neon(const job_t *j, const nplan_t *np) {
    const size_t wp = (size_t)np->ngroups * 16, plw = (size_t)j->W + 64;   /* windows read 63 bytes past */
    const int nring = j->ty.kmax + 1;                  /* a pending output row needs the last kmax rows */
    uint8_t *pl = calloc(3 * plw, 1);
    uint16_t *ring = malloc((size_t)nring * 3 * wp * sizeof(uint16_t));
    if (!pl || !ring) { free(pl); free(ring); return -1; }
    int dy = 0;
    for (Py_ssize_t sy = 0; sy < j->H && dy < j->h; sy++) {
        deinterleave_neon(j->src + sy * j->rs, j->W, pl, pl + plw, pl + 2 * plw);
        uint16_t *slot = ring + (size_t)(sy % nring) * 3 * wp;
        for (int c = 0; c < 3; c++) hrow_neon(pl + (size_t)(2 - c) * plw, np, slot + c * wp);   /* RGB order */
        while (dy < j->h && j->ty.start[dy] + j->ty.count[dy] - 1 <= sy) vrow_neon(j, ring, nring, wp, dy++);
    }
    free(pl); free(ring);
    return 0;
}
