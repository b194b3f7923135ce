/* One-row-to-few-row matrix products for decoding on the CPU: y[n, M] = x[n, K] @ W[M, K]^T (+ b).
 *
 * Decoding multiplies a handful of rows by every weight once per step, so a product is a stream
 * over W and its speed is the speed at which W is read. W is read from a copy packed once into
 * panels of 16 output rows stored k-major (panel p, column k: the 16 weights W[16p .. 16p+15, k]
 * side by side), so each thread reads one contiguous stream and keeps 16 outputs per row of x in
 * one vector register: no horizontal sums, no strided reads. Weights are fp32 or bf16 (bf16
 * widened to fp32 by a shift); sums are fp32; x, b and y have W's dtype. Written with GCC / Clang
 * vector extensions, compiled with -march=native by native.py, so the same source becomes
 * AVX-512, AVX2 or NEON code. Threads: the OpenMP runtime torch already loaded (same soname). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));
typedef uint32_t w16 __attribute__((vector_size(64)));
#define PANEL 16
#define XROWS 4 /* rows of x per sweep over a panel */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Panels of W[M, K] into out ((M + 15) / 16 * 16 * K elements, rows past M zero). */
void ee_pack(const void *W, void *out, int64_t M, int64_t K, int bf16, int threads) {
    int64_t panels = (M + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t k = 0; k < K; k++)
            for (int j = 0; j < PANEL; j++) {
                int64_t m = p * PANEL + j, o = (p * K + k) * PANEL + j;
                if (bf16)
                    ((uint16_t *)out)[o] = m < M ? ((const uint16_t *)W)[m * K + k] : 0;
                else
                    ((float *)out)[o] = m < M ? ((const float *)W)[m * K + k] : 0.f;
            }
}

static inline v16 column(const void *panel, int bf16, int64_t k) {
    v16 f;
    if (bf16) {
        h16 h;
        memcpy(&h, (const uint16_t *)panel + k * PANEL, sizeof h);
        w16 u = __builtin_convertvector(h, w16) << 16;
        memcpy(&f, &u, sizeof f);
    } else {
        memcpy(&f, (const float *)panel + k * PANEL, sizeof f);
    }
    return f;
}

static void store(v16 s, const void *b, void *y, int bf16, int64_t row, int64_t m0, int64_t M) {
    float v[PANEL];
    memcpy(v, &s, sizeof v);
    int64_t count = M - m0 < PANEL ? M - m0 : PANEL;
    for (int64_t j = 0; j < count; j++) {
        float r = v[j];
        if (b) r += bf16 ? bf16_to_f32(((const uint16_t *)b)[m0 + j]) : ((const float *)b)[m0 + j];
        if (bf16)
            ((uint16_t *)y)[row * M + m0 + j] = f32_to_bf16(r);
        else
            ((float *)y)[row * M + m0 + j] = r;
    }
}

static void panels(const void *Wp, int bf16, const float *x, const void *b, void *y, int64_t p0, int64_t p1,
                   int64_t K, int64_t M, int64_t n) {
    const int64_t esize = bf16 ? 2 : 4;
    for (int64_t p = p0; p < p1; p++) {
        const void *panel = (const char *)Wp + p * K * PANEL * esize;
        for (int64_t i0 = 0; i0 < n; i0 += XROWS) {
            int xs = n - i0 < XROWS ? (int)(n - i0) : XROWS;
            const float *xr = x + i0 * K;
            v16 a[XROWS][2];
            for (int i = 0; i < XROWS; i++) a[i][0] = a[i][1] = (v16){0};
            int64_t k = 0;
            /* Two partial sums per row (even and odd k): the same order whatever n and XROWS are,
               so a row's result does not depend on the rows beside it (a verify pass's rows equal
               the decode steps' bit for bit), and two FMA chains keep up with the memory stream. */
            for (; k + 2 <= K; k += 2)
                for (int u = 0; u < 2; u++) {
                    v16 w = column(panel, bf16, k + u);
                    for (int i = 0; i < xs; i++) a[i][u] += w * xr[i * K + k + u];
                }
            for (; k < K; k++) {
                v16 w = column(panel, bf16, k);
                for (int i = 0; i < xs; i++) a[i][0] += w * xr[i * K + k];
            }
            for (int i = 0; i < xs; i++) store(a[i][0] + a[i][1], b, y, bf16, i0 + i, p * PANEL, M);
        }
    }
}

/* y = x @ W^T (+ b) from W's panels (ee_pack); 0 on success, 1 when memory runs out. */
int ee_linear(const void *x, const void *Wp, const void *b, void *y, int64_t n, int64_t K, int64_t M, int bf16,
              int threads) {
    float *xf = (float *)x;
    if (bf16) {
        xf = (float *)malloc(sizeof(float) * (size_t)(n * K));
        if (!xf) return 1;
        for (int64_t i = 0; i < n * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    }
    int64_t np = (M + PANEL - 1) / PANEL;
#pragma omp parallel num_threads(threads)
    {
        int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t first = np * t / T, last = np * (t + 1) / T;
        if (first < last) panels(Wp, bf16, xf, b, y, first, last, K, M, n);
    }
    if (bf16) free(xf);
    return 0;
}
