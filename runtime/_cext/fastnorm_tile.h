/* fastnorm_tile.h: the AVX2 tile kernels (8 float32 rows, 16 uint16 rows in the lanes).
   A fragment of fastnorm.c, included there inside #ifdef FN_HAVE_AVX2 after the job and tap
   definitions it uses; not a standalone header. */

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

/* Store 8 floats (n < 8: only n). mode 2: 32-byte aligned streaming store, 1: two 16-byte
   aligned streaming stores (a numpy array's data is often only 16-byte aligned), 0: plain. */
FN_AVX2 static inline void put8(float *p, __m256 v, int n, int mode) {
    if (n >= 8) {
        if (mode == 2) _mm256_stream_ps(p, v);
        else if (mode == 1) { _mm_stream_ps(p, _mm256_castps256_ps128(v)); _mm_stream_ps(p + 4, _mm256_extractf128_ps(v, 1)); }
        else _mm256_storeu_ps(p, v);
    } else if (n > 0) {
        float t[8];
        _mm256_storeu_ps(t, v);
        memcpy(p, t, sizeof(float) * (size_t)n);
    }
}

FN_AVX2 static inline void put8h(uint16_t *p, __m256 v, int n, int mode) {
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    if (n >= 8) {
        if (mode) _mm_stream_si128((__m128i *)p, h);
        else _mm_storeu_si128((__m128i *)p, h);
    } else if (n > 0) {
        uint16_t t[8];
        _mm_storeu_si128((__m128i *)t, h);
        memcpy(p, t, sizeof(uint16_t) * (size_t)n);
    }
}

/* The store mode for a destination row starting at p (see put8). */
static inline int stream_mode(const job_t *j, const void *p) {
    if (!j->stream) return 0;
    if (j->half) return ((uintptr_t)p & 15) == 0;
    return ((uintptr_t)p & 31) == 0 ? 2 : ((uintptr_t)p & 15) == 0 ? 1 : 0;
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
            const int mode = (w & 7) == 0 ? stream_mode(j, p) : 0;
            if (mode) {
                for (int x0 = 0; x0 < w8; x0 += 8) { FN_VSUM(x0) put8(p + x0, v, 8, mode); }
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

