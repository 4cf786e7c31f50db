/* The fused preprocessing kernel without Python: checks and counts it on other CPUs, under emulation.

     aarch64-linux-gnu-gcc -static -O3 -ffp-contract=off -fno-fast-math -std=c11 -o fn_harness runtime/_cext/harness.c
     qemu-aarch64 ./fn_harness CASE...           (tests/test_cext.py writes the cases; `make test-aarch64`)
     qemu-aarch64 -plugin ./insn.so ./fn_harness --bench H W h w N   (benchmarks/qemu_insn_count.c)

   CASE: a file holding "FNC1", int32 H W h w, float64 scale[3] bias[3], the uint8 (H, W, 3) BGR
   image, then the numpy twin's output (runtime/preprocess.py) as float32 (3, h, w) and as its
   float16 rounding, all little-endian. Each case runs every kernel request x float32/float16 x
   plain/streaming stores x 32-byte / 16-byte / one-element aligned output (the generic kernel,
   which looks at neither, once per dtype), and must match the
   expected bytes exactly. Prints one line per case: "ok H W h w <kernels used>", or "FAIL ..."
   lines; exit status 1 on any mismatch, 2 on a bad case file.
   --bench: N calls of the default kernel on a 640x480-style pseudo-random image (an xorshift
   stream); the instruction count of N calls minus that of 0 calls, over N, is the per-image cost. */
#define FN_STANDALONE 1
#include "fastnorm.c"

static void *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    const long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = len > 0 ? malloc((size_t)len) : NULL;
    if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len) { free(buf); buf = NULL; }
    fclose(f);
    *n = (size_t)len;
    return buf;
}

/* Returns the number of mismatching runs, or -1 for a bad file. */
static int check_case(const char *path) {
    size_t n = 0;
    uint8_t *buf = read_all(path, &n);
    int32_t dims[4];
    double sc[3], bi[3];
    const size_t head = 4 + sizeof dims + sizeof sc + sizeof bi;
    if (!buf || n < head || memcmp(buf, "FNC1", 4) != 0) { free(buf); return -1; }
    memcpy(dims, buf + 4, sizeof dims);
    memcpy(sc, buf + 4 + sizeof dims, sizeof sc);
    memcpy(bi, buf + 4 + sizeof dims + sizeof sc, sizeof bi);
    const int H = dims[0], W = dims[1], h = dims[2], w = dims[3];
    const size_t npx = (size_t)H * W * 3, nout = (size_t)3 * h * w;
    if (H < 1 || W < 1 || h < 1 || w < 1 || n != head + npx + nout * 6) { free(buf); return -1; }
    const uint8_t *img = buf + head, *exp32 = img + npx, *exp16 = exp32 + nout * 4;
    uint8_t *raw = malloc(nout * 4 + 64);
    int bad = 0, seen[K_COUNT] = {0};
    /* Each kernel this CPU family has, asked for first (it falls through when it does not serve). */
#if defined(FN_HAVE_AVX2)
    static const int wants[] = {K_PLANAR, K_TILE16, K_TILE8, K_GENERIC};
#elif defined(FN_HAVE_NEON)
    static const int wants[] = {K_NEON, K_GENERIC};
#else
    static const int wants[] = {K_GENERIC};
#endif
    for (size_t wi = 0; wi < sizeof wants / sizeof wants[0]; wi++)
        for (int half = 0; half < 2; half++)
            for (int stream = 0; stream < 2; stream++)
                for (int align = 0; align < 3; align++) {
                    if (wants[wi] == K_GENERIC && (stream || align)) continue;   /* it reads neither: spare qemu */
                    const size_t item = half ? 2 : 4, skip = align == 0 ? 0 : align == 1 ? 16 : item;
                    uint8_t *out = raw + ((32 - (uintptr_t)raw % 32) % 32) + skip;
                    memset(out, 0xff, nout * item);            /* NaN in both widths: nothing stale passes */
                    int used = -1;
                    const int want = wants[wi];
                    if (fn_resize_normalize(img, H, W, (Py_ssize_t)W * 3, out, h, w, half, stream, sc, bi, want, &used) < 0) {
                        printf("FAIL %d %d %d %d: out of memory\n", H, W, h, w);
                        bad++;
                        continue;
                    }
                    seen[used] = 1;
                    if (memcmp(out, half ? exp16 : exp32, nout * item) != 0) {
                        printf("FAIL %d %d %d %d: kernel %s (asked %s) float%d stream=%d align=%d differs from the numpy twin\n",
                               H, W, h, w, KERNEL_NAMES[used], KERNEL_NAMES[want], half ? 16 : 32, stream, align);
                        bad++;
                    }
                }
    printf("%s %d %d %d %d", bad ? "FAIL" : "ok", H, W, h, w);
    for (int k = 0; k < K_COUNT; k++)
        if (seen[k]) printf(" %s", KERNEL_NAMES[k]);
    printf("\n");
    free(raw); free(buf);
    return bad;
}

static int bench(int H, int W, int h, int w, int reps) {
    uint8_t *img = malloc((size_t)H * W * 3);
    float *out = malloc(sizeof(float) * 3 * (size_t)h * w);
    if (!img || !out) return 2;
    uint32_t x = 2463534242u;
    for (size_t i = 0; i < (size_t)H * W * 3; i++) { x ^= x << 13; x ^= x >> 17; x ^= x << 5; img[i] = (uint8_t)x; }
    const double sc[3] = {0.0171, 0.0175, 0.0174}, bi[3] = {-2.1, -2.0, -1.8};
    int used = K_GENERIC;
    const int want = getenv("FN_KERNEL") && strcmp(getenv("FN_KERNEL"), "generic") == 0 ? K_GENERIC : K_AUTO;
    for (int r = 0; r < reps; r++)
        if (fn_resize_normalize(img, H, W, (Py_ssize_t)W * 3, out, h, w, 0, 0, sc, bi, want, &used) < 0) return 2;
    printf("bench %dx%d -> %dx%d x%d kernel %s\n", W, H, w, h, reps, reps ? KERNEL_NAMES[used] : "-");
    free(img); free(out);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 7 && strcmp(argv[1], "--bench") == 0)
        return bench(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]));
    if (argc < 2) {
        fprintf(stderr, "usage: %s CASE... | --bench H W h w N  (FN_KERNEL=generic to force the generic kernel)\n", argv[0]);
        return 2;
    }
    int bad = 0;
    for (int i = 1; i < argc; i++) {
        const int r = check_case(argv[i]);
        if (r < 0) { fprintf(stderr, "%s: not a readable case file\n", argv[i]); return 2; }
        bad += r;
    }
    return bad ? 1 : 0;
}
