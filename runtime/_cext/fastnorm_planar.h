/* fastnorm_planar.h: the AVX2 planar kernel (per-channel byte planes, exact integer sums).
   A fragment of fastnorm.c, included there inside #ifdef FN_HAVE_AVX2 after the job and tap
   definitions it uses; not a standalone header. */

/* ---- Planar kernel, the fastest: for footprints up to ~1.7 source pixels wide (every COCO photo
   to 448) with Dx <= 255. Per source row: BGR bytes -> three byte planes (blend + shuffle);
   every 8 outputs of a plane read one 16-byte window, a byte shuffle puts each output's taps
   side by side and pmaddubsw (bytes x byte weights, pairwise summed) gives the exact 16-bit
   horizontal sums, 16 outputs per instruction. Rows of those sums wait in a ring of kmax + 1
   rows (a few KB: L1) until an output row's vertical taps are in; pmaddwd sums those exactly
   in 32-bit integers, then x*scale + bias and the store. No transposes, no float until the end.
   pmaddubsw saturates at 32767: pixels are used as they are while 255*Dx <= 32767 (weights
   <= 127 fit its signed operand); for 128 <= Dx <= 255 the pixels enter as p - 128 (signed,
   weights unsigned) and 128*Dx*Dy, what that took off every sum, is added back in 32 bits.
   Every sum is the same exact integer the other kernels compute, so the output bits are too. */
typedef struct {
    int ngroups, npairs, sgn;     /* groups of 16 outputs; tap pairs; pixels offset by -128 */
    int *base;                    /* per group: the window's first source pixel, lanes 0 and 1 */
    uint8_t *shuf, *wts;          /* per group and tap pair: 32 shuffle indices, 32 weights */
} hplan_t;

static void hplan_free(hplan_t *p) { free(p->base); free(p->shuf); free(p->wts); p->base = NULL; p->shuf = p->wts = NULL; }

/* 1 with the plan filled when the planar kernel serves this horizontal axis, 0 when it does not
   (a window wider than 16 bytes, Dx > 255), -1 when out of memory. */
static int hplan_init(hplan_t *p, const taps_t *tx) {
    const int w = tx->n, K = tx->kmax;
    memset(p, 0, sizeof(*p));
    if (tx->denom > 255.0 || K > 16) return 0;
    const int ng = (w + 15) / 16, np = (K + 1) / 2;
    p->ngroups = ng; p->npairs = np; p->sgn = tx->denom > 127.0;
    p->base = malloc(sizeof(int) * 2 * (size_t)ng);
    p->shuf = aligned_alloc(32, (size_t)ng * np * 32);
    p->wts = aligned_alloc(32, (size_t)ng * np * 32);
    if (!p->base || !p->shuf || !p->wts) { hplan_free(p); return -1; }
    for (int g = 0; g < ng; g++)
        for (int lane = 0; lane < 2; lane++) {
            const int d0 = 16 * g + 8 * lane < w ? 16 * g + 8 * lane : w - 1, b = tx->start[d0];
            p->base[2 * g + lane] = b;
            for (int i = 0; i < 8; i++) {
                const int dx = d0 + i < w ? d0 + i : w - 1;   /* past the end: repeat the last */
                for (int k = 0; k < 2 * np; k++) {
                    const int real = k < tx->count[dx], off = tx->start[dx] - b + (real ? k : 0);
                    if (off > 15) { hplan_free(p); return 0; }
                    const size_t at = ((size_t)g * np + k / 2) * 32 + 16 * lane + 2 * i + (k & 1);
                    p->shuf[at] = (uint8_t)off;                 /* a padded tap: weight 0 */
                    p->wts[at] = real ? (uint8_t)tx->w[(size_t)dx * K + k] : 0;
                }
            }
        }
    return 1;
}

FN_AVX2 static inline __m256i load2x128(const uint8_t *lo, const uint8_t *hi) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)lo)),
                                   _mm_loadu_si128((const __m128i *)hi), 1);
}

/* In 48 bytes = 16 BGR pixels held as three 16-byte vectors a, b, c, each channel's 16 bytes
   sit at 16 distinct positions (position mod 3 says which vector), so two blends gather them
   into one vector and one shuffle orders them. Rows: position masks mod 3 == 0, 1, 2; then the
   B, G, R orders. */
static const uint8_t FN_DEINT[6][16] = {
    {0x80, 0, 0, 0x80, 0, 0, 0x80, 0, 0, 0x80, 0, 0, 0x80, 0, 0, 0x80},
    {0, 0x80, 0, 0, 0x80, 0, 0, 0x80, 0, 0, 0x80, 0, 0, 0x80, 0, 0},
    {0, 0, 0x80, 0, 0, 0x80, 0, 0, 0x80, 0, 0, 0x80, 0, 0, 0x80, 0},
    {0, 3, 6, 9, 12, 15, 2, 5, 8, 11, 14, 1, 4, 7, 10, 13},
    {1, 4, 7, 10, 13, 0, 3, 6, 9, 12, 15, 2, 5, 8, 11, 14},
    {2, 5, 8, 11, 14, 1, 4, 7, 10, 13, 0, 3, 6, 9, 12, 15},
};

/* One BGR row of W pixels -> byte planes pb, pg, pr, each byte XOR x (0 or 0x80). */
FN_AVX2 static inline __attribute__((always_inline)) void deinterleave_t(const uint8_t *s, Py_ssize_t W, uint8_t *pb,
                                                                        uint8_t *pg, uint8_t *pr, uint8_t x) {
    __m256i m[6];
    for (int i = 0; i < 6; i++) m[i] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FN_DEINT[i]));
    const __m256i xv = _mm256_set1_epi8((char)x);
    Py_ssize_t i = 0;
    for (; i + 32 <= W; i += 32) {                     /* lane 0: pixels i..i+15, lane 1: i+16.. */
        const uint8_t *p = s + 3 * i;
        const __m256i a = load2x128(p, p + 48), b = load2x128(p + 16, p + 64), c = load2x128(p + 32, p + 80);
        const __m256i vb = _mm256_blendv_epi8(_mm256_blendv_epi8(a, b, m[2]), c, m[1]);
        const __m256i vg = _mm256_blendv_epi8(_mm256_blendv_epi8(a, b, m[0]), c, m[2]);
        const __m256i vr = _mm256_blendv_epi8(_mm256_blendv_epi8(a, b, m[1]), c, m[0]);
        __m256i ob = _mm256_shuffle_epi8(vb, m[3]), og = _mm256_shuffle_epi8(vg, m[4]), orr = _mm256_shuffle_epi8(vr, m[5]);
        if (x) { ob = _mm256_xor_si256(ob, xv); og = _mm256_xor_si256(og, xv); orr = _mm256_xor_si256(orr, xv); }
        _mm256_store_si256((__m256i *)(pb + i), ob);
        _mm256_store_si256((__m256i *)(pg + i), og);
        _mm256_store_si256((__m256i *)(pr + i), orr);
    }
    for (; i < W; i++) { pb[i] = s[3 * i] ^ x; pg[i] = s[3 * i + 1] ^ x; pr[i] = s[3 * i + 2] ^ x; }
}

FN_AVX2 static void deinterleave(const uint8_t *s, Py_ssize_t W, uint8_t *pb, uint8_t *pg, uint8_t *pr, int sgn) {
    if (sgn) deinterleave_t(s, W, pb, pg, pr, 0x80);   /* a constant offset: the XORs only when needed */
    else deinterleave_t(s, W, pb, pg, pr, 0);
}

/* Horizontal sums of one byte plane into dst (16-bit, ngroups*16 values). Each group's 16 sums
   are stored as outputs [0-3, 8-11, 4-7, 12-15], so that the vertical pass's 16-bit unpacks
   (which work within 128-bit lanes) pair up rows in output order. */
FN_AVX2 static inline __attribute__((always_inline)) void hrow_t(const uint8_t *pl, const hplan_t *p, int16_t *dst,
                                                                int np, int sgn) {
    for (int g = 0; g < p->ngroups; g++) {
        const __m256i v = load2x128(pl + p->base[2 * g], pl + p->base[2 * g + 1]);
        const __m256i *sh = (const __m256i *)p->shuf + (size_t)g * np, *wt = (const __m256i *)p->wts + (size_t)g * np;
        __m256i acc = _mm256_setzero_si256();
        for (int q = 0; q < np; q++) {
            const __m256i t = _mm256_shuffle_epi8(v, _mm256_load_si256(sh + q)), wq = _mm256_load_si256(wt + q);
            const __m256i s = sgn ? _mm256_maddubs_epi16(wq, t) : _mm256_maddubs_epi16(t, wq);
            acc = q ? _mm256_add_epi16(acc, s) : s;
        }
        _mm256_store_si256((__m256i *)(dst + 16 * g), _mm256_permute4x64_epi64(acc, 0xD8));
    }
}

FN_AVX2 static void hrow(const uint8_t *pl, const hplan_t *p, int16_t *dst) {
    switch (p->npairs * 2 + p->sgn) {                  /* constant trip counts unroll */
    case 2: hrow_t(pl, p, dst, 1, 0); break;
    case 3: hrow_t(pl, p, dst, 1, 1); break;
    case 4: hrow_t(pl, p, dst, 2, 0); break;
    case 5: hrow_t(pl, p, dst, 2, 1); break;
    default: hrow_t(pl, p, dst, p->npairs, p->sgn);
    }
}

/* 32-bit vertical sums of 16 outputs from ring rows r[0..2*np-1] (an odd count repeats the last
   row with weight 0), plus cv when corr; lo = outputs 0-7, hi = 8-15. */
FN_AVX2 static inline __attribute__((always_inline)) void vsum16(const int16_t *const *r, const __m256i *wq, int np,
                                                                size_t x0, int corr, __m256i cv, __m256i *lo, __m256i *hi) {
    __m256i l = cv, h = cv;
    for (int q = 0; q < np; q++) {
        const __m256i a = _mm256_load_si256((const __m256i *)(r[2 * q] + x0));
        const __m256i b = _mm256_load_si256((const __m256i *)(r[2 * q + 1] + x0));
        const __m256i sl = _mm256_madd_epi16(_mm256_unpacklo_epi16(a, b), wq[q]);
        const __m256i sh = _mm256_madd_epi16(_mm256_unpackhi_epi16(a, b), wq[q]);
        l = q || corr ? _mm256_add_epi32(l, sl) : sl;
        h = q || corr ? _mm256_add_epi32(h, sh) : sh;
    }
    *lo = l; *hi = h;
}

/* One float32 output row: whole 16-output blocks with the tap-pair count and store mode known at
   compile time (the dispatch below), then the partial block. */
FN_AVX2 static inline __attribute__((always_inline)) void vplane_f32(const int16_t *const *r, const __m256i *wq, int np,
                                                                    int corr, __m256i cv, __m256 kc, __m256 bc, float *p,
                                                                    int w, int mode) {
    int x0 = 0;
    __m256i lo, hi;
    if (mode == 1) {
        /* p is 16 bytes off a 32-byte boundary: shift by 4 floats (one lane) so that whole-vector
           streaming stores apply; 16-byte ones took ~40% longer to write the same bytes. */
        __m256 carry = _mm256_setzero_ps();        /* outputs x0-8 .. x0-1 */
        for (; x0 + 16 <= w; x0 += 16) {
            vsum16(r, wq, np, (size_t)x0, corr, cv, &lo, &hi);
            const __m256 v0 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo), kc), bc);
            const __m256 v1 = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi), kc), bc);
            if (x0) _mm256_stream_ps(p + x0 - 4, _mm256_permute2f128_ps(carry, v0, 0x21));
            else _mm_stream_ps(p, _mm256_castps256_ps128(v0));
            _mm256_stream_ps(p + x0 + 4, _mm256_permute2f128_ps(v0, v1, 0x21));
            carry = v1;
        }
        if (x0) _mm_stream_ps(p + x0 - 4, _mm256_extractf128_ps(carry, 1));
    } else {
        for (; x0 + 16 <= w; x0 += 16) {
            vsum16(r, wq, np, (size_t)x0, corr, cv, &lo, &hi);
            put8(p + x0, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo), kc), bc), 8, mode);
            put8(p + x0 + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi), kc), bc), 8, mode);
        }
    }
    if (x0 < w) {
        vsum16(r, wq, np, (size_t)x0, corr, cv, &lo, &hi);
        put8(p + x0, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo), kc), bc), w - x0, 0);
        put8(p + x0 + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi), kc), bc), w - x0 - 8, 0);
    }
}

/* Output row dy of the three planes: vertical taps over the ring, scale and bias, store. */
FN_AVX2 static void vrow(const job_t *j, const int16_t *ring, int nring, size_t wp, int dy, int32_t corr) {
    const int w = j->w, cnt = j->ty.count[dy], np = (cnt + 1) / 2;
    const float *wy = j->ty.w + (size_t)dy * j->ty.kmax;
    const size_t plane = (size_t)j->h * w;
    __m256i wq[32];
    for (int q = 0; q < np; q++) {
        const int w0 = (int)wy[2 * q], w1 = 2 * q + 1 < cnt ? (int)wy[2 * q + 1] : 0;
        wq[q] = _mm256_set1_epi32((int)(((uint32_t)w1 << 16) | (uint32_t)w0));
    }
    const __m256i cv = _mm256_set1_epi32(corr);
    for (int c = 0; c < 3; c++) {
        const int16_t *r[65];
        for (int k = 0; k < cnt; k++) r[k] = ring + (size_t)((j->ty.start[dy] + k) % nring) * 3 * wp + c * wp;
        r[cnt] = r[cnt - 1];
        const __m256 kc = _mm256_set1_ps(j->k[c]), bc = _mm256_set1_ps(j->b[c]);
        const size_t o = c * plane + (size_t)dy * w;
        if (j->half) {
            uint16_t *p = (uint16_t *)j->out + o;
            const int mode = stream_mode(j, p);
            for (int x0 = 0; x0 < w; x0 += 16) {
                __m256i lo, hi;
                vsum16(r, wq, np, (size_t)x0, 1, cv, &lo, &hi);
                put8h(p + x0, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(lo), kc), bc), w - x0, mode);
                put8h(p + x0 + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hi), kc), bc), w - x0 - 8, mode);
            }
            continue;
        }
        float *p = (float *)j->out + o;
        const int mode = stream_mode(j, p);
#define FN_VPLANE(np_, m_) do { if (corr) vplane_f32(r, wq, np_, 1, cv, kc, bc, p, w, m_); \
                                else vplane_f32(r, wq, np_, 0, cv, kc, bc, p, w, m_); } while (0)
        switch (3 * (np < 3 ? np : 0) + mode) {        /* constant pair counts and store modes */
        case 3: FN_VPLANE(1, 0); break;
        case 4: FN_VPLANE(1, 1); break;
        case 5: FN_VPLANE(1, 2); break;
        case 6: FN_VPLANE(2, 0); break;
        case 7: FN_VPLANE(2, 1); break;
        case 8: FN_VPLANE(2, 2); break;
        default: vplane_f32(r, wq, np, 1, cv, kc, bc, p, w, mode);
        }
#undef FN_VPLANE
    }
}

/* Returns 0, or -1 when out of memory. */
FN_AVX2 static int kernel_planar(const job_t *j, const hplan_t *hp) {
    const size_t wp = (size_t)hp->ngroups * 16, plw = ((size_t)j->W + 16 + 31) / 32 * 32;
    const int nring = j->ty.kmax + 1;                  /* a pending output row needs the last kmax rows */
    uint8_t *pl = aligned_alloc(32, 3 * plw);          /* windows read up to 15 bytes past a row: zeros */
    int16_t *ring = aligned_alloc(32, (size_t)nring * 3 * wp * sizeof(int16_t));
    if (!pl || !ring) { free(pl); free(ring); return -1; }
    memset(pl, 0, 3 * plw);
    const int32_t corr = hp->sgn ? (int32_t)(128.0 * j->tx.denom * j->ty.denom) : 0;
    int dy = 0;
    for (Py_ssize_t sy = 0; sy < j->H && dy < j->h; sy++) {
        deinterleave(j->src + sy * j->rs, j->W, pl, pl + plw, pl + 2 * plw, hp->sgn);
        int16_t *slot = ring + (size_t)(sy % nring) * 3 * wp;
        for (int c = 0; c < 3; c++) hrow(pl + (size_t)(2 - c) * plw, hp, slot + c * wp);   /* RGB order */
        while (dy < j->h && j->ty.start[dy] + j->ty.count[dy] - 1 <= sy) vrow(j, ring, nring, wp, dy++, corr);
    }
    free(pl); free(ring);
    return 0;
}

