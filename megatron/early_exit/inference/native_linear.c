/* One-row-to-few-row matrix products for decoding on the CPU: y[n, M] = x[n, K] @ W[M, K]^T (+ b).
 *
 * Decoding multiplies a handful of rows by every weight once per step, so a product is a stream
 * over W and its speed is the speed at which W is read. W is read from a copy packed once into
 * panels of 16 output rows stored k-major (panel p, column k: the 16 weights W[16p .. 16p+15, k]
 * side by side), so each thread reads one contiguous stream and keeps 16 outputs per row of x in
 * one vector register: no horizontal sums, no strided reads. Weights are fp32 or bf16 (bf16
 * widened to fp32 by a shift); sums are fp32; x, b and y have W's dtype. Written with GCC / Clang
 * vector extensions, compiled with -march=native by native.py, so the same source becomes
 * AVX-512, AVX2 or NEON code. Threads: the OpenMP runtime torch already loaded (same soname).
 * Where the CPU has Intel's matrix tiles (AMX) bf16 panels are stored in column pairs and bf16
 * products take the tiles (`amx_panels`). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__)
#define DPBF16 1 /* the CPU's bf16 pair dot product (vdpbf16ps) multiplies bf16 weights */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
/* Intel's matrix tiles (AMX) multiply bf16 weights where the kernel lets this process use them
   (`amx_ready`): a tile product takes 16 rows of x against 16 outputs and 32 columns at once, so
   a verify pass's or a batch's rows cost little more than one (`amx_panels`). bf16 panels are then
   stored in column pairs (`PAIRED`), the tiles' layout and vdpbf16ps's operand as it is loaded. */
#define AMX 1
#define PAIRED 1
#endif
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t h16 __attribute__((vector_size(32)));
typedef uint32_t w16 __attribute__((vector_size(64)));
#define PANEL 16
#define MAX_CHUNKS 16 /* attention's head dims in vector registers: up to 16 x 16 */
#if defined(__AVX512F__)
#define XROWS 8 /* rows of x per sweep over a panel: 16 sums of 16 lanes fit AVX-512's 32 registers */
#define XLAST 9 /* rows the last sweep may take (`last_block`): 18 sums, 2 columns and a broadcast */
#else
/* Without AVX-512 a panel's 16 lanes are two halves of 8 (`sweep`), and two rows' 8 sums of 8
   lanes, the 4 halves of two columns and a broadcast fit AVX2's 16 registers: a third row spilled. */
#define XROWS 2
#define XLAST 2
#define HALVES 1
typedef float v8 __attribute__((vector_size(32)));
typedef uint16_t h8 __attribute__((vector_size(16)));
typedef uint32_t w8 __attribute__((vector_size(32)));
#endif

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

/* Where a column's 16 bf16 weights are stored: in place, or, without AVX-512 (`HALVES`),
   interleaved, rows 0-7 in the even places and 8-15 in the odd, so that one 32-byte load widens
   into the two 8-lane halves by one shift and one mask (`widen_halves`) where zero-extending each
   half took two loads, two extensions and two shifts. */
#if defined(__AVX512F__)
#define BF16_PLACE(j) (j)
#else
#define BF16_PLACE(j) ((j) < 8 ? 2 * (j) : 2 * ((j) - 8) + 1)
#endif
/* Where element (j, k) of a bf16 panel of K columns lies in it: column k's 16 in place, or with
   `PAIRED` each pair of columns k, k + 1 (k even) as 16 pairs, row j's two weights side by side
   (an odd K's last column in place). */
#ifdef PAIRED
#define BF16_AT(j, k, K) (((k) | 1) < (K) ? ((k) & ~(int64_t)1) * PANEL + 2 * (j) + ((k) & 1) : (k) * PANEL + (j))
#else
#define BF16_AT(j, k, K) ((k) * PANEL + BF16_PLACE(j))
#endif

/* Panels of W[M, K] into out ((M + 15) / 16 * 16 * K elements, rows past M zero). */
void ee_pack(const void *W, void *out, int64_t M, int64_t K, int bf16, int threads) {
    int64_t panels = (M + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads)
    for (int64_t p = 0; p < panels; p++)
        for (int64_t k = 0; k < K; k++)
            for (int j = 0; j < PANEL; j++) {
                int64_t m = p * PANEL + j, o = p * K * PANEL + (bf16 ? BF16_AT(j, k, K) : k * PANEL + j);
                if (bf16)
                    ((uint16_t *)out)[o] = m < M ? ((const uint16_t *)W)[m * K + k] : 0;
                else
                    ((float *)out)[o] = m < M ? ((const float *)W)[m * K + k] : 0.f;
            }
}

/* 16 consecutive elements of p from i, as fp32 (bf16 widened by a shift). With AVX-512 one
   zero-extension of all 16 (GCC's vector conversion, tuned for the AMD EPYC's 256-bit preference,
   made it of two halves, an extract and an insert: a bf16 prompt's RMSNorm rows ~40% slower). */
static inline v16 widen(const void *p, int bf16, int64_t i) {
    v16 f;
#if defined(__AVX512F__)
    if (bf16) {
        __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
        u = _mm512_slli_epi32(u, 16);
        memcpy(&f, &u, sizeof f);
        return f;
    }
#endif
    if (bf16) {
        h16 h;
        memcpy(&h, (const uint16_t *)p + i, sizeof h);
        w16 u = __builtin_convertvector(h, w16) << 16;
        memcpy(&f, &u, sizeof f);
    } else {
        memcpy(&f, (const float *)p + i, sizeof f);
    }
    return f;
}

/* Column k of a panel: its 16 weights (a bf16 column stored in place). */
static inline v16 column(const void *panel, int bf16, int64_t k) { return widen(panel, bf16, k * PANEL); }

/* Columns k and k + 1 (k even, k + 1 < K) of a panel as they are stored. */
static inline void columns(const void *panel, int bf16, int64_t k, v16 *w0, v16 *w1) {
#ifdef PAIRED
    if (bf16) { /* pairs: the low halves are column k, the high ones k + 1 */
        w16 u;
        memcpy(&u, (const uint16_t *)panel + k * PANEL, sizeof u);
        w16 lo = u << 16, hi = u & 0xffff0000u;
        memcpy(w0, &lo, sizeof lo);
        memcpy(w1, &hi, sizeof hi);
        return;
    }
#endif
    *w0 = column(panel, bf16, k);
    *w1 = column(panel, bf16, k + 1);
}

#ifdef DPBF16
/* Columns k and k + 1 of a bf16 panel as vdpbf16ps's operand: lane j's low half W[16p + j, k],
   its high half W[16p + j, k + 1]. `PAIRED`: one 64-byte load. Else made from the panel's columns
   as they are stored: a panel stored in pairs streamed a decode step's weights from memory 8-18%
   slower at one row on the AMD EPYC, against 8% faster made here. The two columns lie side by
   side (k even): one 64-byte load, its 16-bit halves interleaved by one permute (AVX512BW's
   vpermw), where widening each column apart took two loads, two widenings, a shift and an or:
   the same operand, so the same sums; a (1152, 384) product with its weights in the cache (one
   thread, AMD EPYC, best of 6 alternations) 0.78-0.87x the time at 1-4 rows, 0.90-0.99x at 5-8;
   the CPU reference model's decoding (bf16, 2 threads, `benchmarks/native_ab.py`, medians of 160
   prompt pairs in two runs) 0.92-0.96x the time in full, 0.95-0.96x early exit, 0.97-0.98x
   self-speculation, the same tokens. */
static inline __m512bh column_pair(const void *panel, int64_t k) {
    const uint16_t *c = (const uint16_t *)panel + k * PANEL;
#ifdef PAIRED
    return (__m512bh)_mm512_loadu_si512((const void *)c);
#elif defined(__AVX512BW__)
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0); /* k's j-th, then k + 1's */
    return (__m512bh)_mm512_permutexvar_epi16(order, _mm512_loadu_si512((const void *)c));
#else
    __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)c));
    __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(c + PANEL)));
    return (__m512bh)_mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
#endif
}
#endif

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* round_bf16 of 16 lanes: to nearest even; NaN stays NaN (integer operations: `round16`). */
static inline v16 round16_bits(v16 f) {
    w16 u, nan;
    memcpy(&u, &f, sizeof u);
    nan = (w16)((u & 0x7fffffffu) > 0x7f800000u);
    u = ((u + 0x7fffu + ((u >> 16) & 1u)) & ~nan) | ((u | 0x400000u) & nan);
    u &= 0xffff0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

#ifdef DPBF16
/* Each lane's |bits| - 1, unsigned: below 0x7fffff exactly where the lane is an fp32 subnormal, the
   one input on which the CPU's conversion to bf16 (vcvtneps2bf16) differs from f32_to_bf16 (it
   reads them as zero; every other one of the 2^32 inputs, NaNs and infinities included, converts
   to the same bits: checked exhaustively on the AMD EPYC). */
static inline __m512i subnormal_key(v16 f) {
    __m512i u;
    memcpy(&u, &f, sizeof u);
    return _mm512_sub_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(1));
}

/* Whether a `subnormal_key` (or the lane-wise minimum of several) marks a subnormal. */
static inline int any_subnormal(__m512i key) { return _mm512_cmplt_epu32_mask(key, _mm512_set1_epi32(0x7fffff)) != 0; }

/* f rounded to bf16 by the CPU's conversion, as fp32 (round16's bits where no lane is subnormal). */
static inline v16 round16_cpu(v16 f) {
    __m256bh h = _mm512_cvtneps_pbh((__m512)f);
    __m256i hi;
    memcpy(&hi, &h, sizeof hi);
    __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16);
    memcpy(&f, &u, sizeof f);
    return f;
}
#endif

/* round_bf16 of 16 lanes: to nearest even; NaN stays NaN. With DPBF16 the CPU's conversion
   (`round16_cpu`) where no lane is subnormal: the same bits in 4 operations where the integer
   rounding took 9; a bf16 prompt's rows (`ee_rows`: RMSNorm, SwiGLU) and every bf16 product's
   stores round through here. */
static inline v16 round16(v16 f) {
#ifdef DPBF16
    if (!any_subnormal(subnormal_key(f))) return round16_cpu(f);
#endif
    return round16_bits(f);
}

/* The high halves of 16 lanes (values that are bf16's: their bits, no rounding) into dst. */
static inline void put_high(uint16_t *dst, v16 v) {
#if defined(__AVX512F__)
    __m512i u;
    memcpy(&u, &v, sizeof u);
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
#else
    w16 u;
    memcpy(&u, &v, sizeof u);
    h16 h = __builtin_convertvector(u >> 16, h16);
    memcpy(dst, &h, sizeof h);
#endif
}

/* 16 lanes rounded to bf16 (`round16`, as f32_to_bf16 each) into dst[0..15]. */
static inline void put_bf16(uint16_t *dst, v16 s) {
#ifdef DPBF16
    if (!any_subnormal(subnormal_key(s))) {
        __m256bh h = _mm512_cvtneps_pbh((__m512)s);
        memcpy(dst, &h, sizeof h);
        return;
    }
#endif
    put_high(dst, round16_bits(s));
}

/* One panel's 16 sums of one row: plus the bias, rounded to the output dtype, plus the residual
   (rounded again in bf16: torch's `r + linear(x)` rounds the product, then the sum). A whole
   panel in lanes (each lane the scalar path's operations in its order: the same numbers); a last
   partial panel element by element. Element by element, bf16 products of several rows paid a
   scalar rounding per output (a layer's 3,968 of the CPU reference model per row). */
static void store(v16 s, const void *b, const void *res, void *y, int bf16, int64_t row, int64_t m0, int64_t M) {
    if (M - m0 >= PANEL) {
        const int64_t o = row * M + m0;
        if (b) s += widen(b, bf16, m0);
        if (res) s = bf16 ? round16(s) + widen(res, 1, o) : s + widen(res, 0, o);
        if (bf16)
            put_bf16((uint16_t *)y + o, s);
        else
            memcpy((float *)y + o, &s, sizeof s);
        return;
    }
    float v[PANEL];
    memcpy(v, &s, sizeof v);
    for (int64_t j = 0; j < M - m0; j++) { /* fewer than PANEL: the last panel's outputs */
        int64_t o = row * M + m0 + j;
        float r = v[j];
        if (b) r += bf16 ? bf16_to_f32(((const uint16_t *)b)[m0 + j]) : ((const float *)b)[m0 + j];
        if (res) r = bf16 ? round_bf16(r) + bf16_to_f32(((const uint16_t *)res)[o]) : r + ((const float *)res)[o];
        if (bf16)
            ((uint16_t *)y)[o] = f32_to_bf16(r);
        else
            ((float *)y)[o] = r;
    }
}

/* One panel against XS rows of x, xr their block of `xblock`'s layout (XS a constant where it is
   called, so that the sums stay in registers); bf16: xq the block's pairs (`pairs`). Two partial
   sums per row: the same order whatever n and XS are, so a row's result does not depend on the
   rows beside it (a verify pass's rows equal the decode steps' bit for bit), and two chains keep
   up with the memory stream. fp32 (and bf16 without DPBF16): even and odd columns, an FMA per
   column. bf16 with DPBF16: column pairs from k = 0, 4, 8, ... and from k = 2, 6, 10, ..., one
   vdpbf16ps per pair and row (a pair's two products exact in fp32, each sum rounded; denormals
   flushed) in place of an FMA per column: fewer instructions per weight and row, which bound
   bf16 products of several rows (the CPU reference model's layer products at 5 rows: 0.88x the
   time; at one row, streamed from memory, 0.92x). */
/* Bytes ahead of the sweep that it asks the CPU to fetch (a panel's later columns, then the next
   panel's: a thread's panels lie in one run). On the AVX2 EPYC (znver1 to GCC), one row against
   SmolLM2's bf16 head streamed 15-18 GB/s without it, 19-21 with it 3-12 KB ahead. On an Intel
   Xeon (Emerald Rapids, AVX-512), one row against 40 (3072, 576) bf16 weights: 9.6 -> 14.0 GB/s
   on one thread, 37.5 -> 47.8 on two (vdpbf16ps's loop issues its loads too slowly for the
   hardware's prefetchers alone); fp32 1.00-1.07x. Ahead by 2-6 KB read the same. */
#ifndef PREFETCH
#define PREFETCH 4096
#endif

/* Whether each dtype's sweeps ask for lines PREFETCH ahead (0 fp32, 1 bf16; the AMX tile loop is
   bf16's), set at run time (`ee_prefetch`: `kernels.prefetch_choice` times one row against the
   model's weights each way and keeps the faster), on until then. Off: the hardware's prefetchers
   alone: on an Intel Xeon reporting 480 MiB of L3 (stop 78) one row against 425 MB of fp32 weights
   streamed 27.1-27.4 GB/s on two threads without it against 24.8-25.4 with it, 212 MB of bf16
   31.6-31.7 against 29.6-30.1, where the Emerald Rapids Xeon and the AVX2 EPYC above wanted it.
   The sweeps take the distance as a constant (`panels` picks one of two inlined copies per
   product): read from a variable in the loop, it made SmolLM2's fp32 steps 2-3% slower (AMD EPYC,
   stop 79). */
static int prefetch_on[2] = {1, 1};

/* Ask for the `lines` (1 or 2) cache lines from p, a sweep's next columns BY bytes ahead (a
   constant; none where 0). */
static inline __attribute__((always_inline)) void fetch_ahead(const char *p, int lines, const int64_t BY) {
    if (BY > 0) {
        __builtin_prefetch(p);
        if (lines > 1) __builtin_prefetch(p + 64);
    }
}

/* The bytes ahead this library's sweeps ask for where prefetching is on (PREFETCH). */
int64_t ee_prefetch_built(void) { return PREFETCH; }

/* Turns dtype `bf16`'s (0 fp32, 1 bf16) prefetch on (1) or off (0), between products; -1 asks.
   Returns whether it is on. */
int ee_prefetch(int bf16, int on) {
    if (on >= 0) __atomic_store_n(&prefetch_on[bf16 != 0], on != 0, __ATOMIC_RELAXED);
    return __atomic_load_n(&prefetch_on[bf16 != 0], __ATOMIC_RELAXED);
}

#ifdef HALVES
/* 8 elements of p from i, as fp32 (bf16 widened by a shift). */
static inline v8 widen8(const void *p, int bf16, int64_t i) {
    v8 f;
    if (bf16) {
        h8 h;
        memcpy(&h, (const uint16_t *)p + i, sizeof h);
        w8 u = __builtin_convertvector(h, w8) << 16;
        memcpy(&f, &u, sizeof f);
    } else {
        memcpy(&f, (const float *)p + i, sizeof f);
    }
    return f;
}

/* Column k of a panel as its two 8-lane halves (rows 0-7, 8-15); bf16 stored interleaved
   (`BF16_PLACE`): the even 16-bit places shifted up, the odd ones masked. */
static inline void widen_halves(const void *panel, int bf16, int64_t k, v8 *lo, v8 *hi) {
    if (bf16) {
        w8 u;
        memcpy(&u, (const uint16_t *)panel + k * PANEL, sizeof u);
        w8 l = u << 16, h = u & 0xffff0000u;
        memcpy(lo, &l, sizeof *lo);
        memcpy(hi, &h, sizeof *hi);
    } else {
        *lo = widen8(panel, 0, k * PANEL);
        *hi = widen8(panel, 0, k * PANEL + 8);
    }
}

/* `sweep` where vectors are 8 lanes: each column's 16 lanes as two halves, each lane's sums the
   same operations in the same order (the same numbers bit for bit). Written over 16-lane vectors,
   GCC kept the sums in memory on AVX2 (each FMA's result stored and reloaded through the stack):
   the products of 2-4 rows ran 1.5-2.2x slower than oneDNN's, so fills and verify passes left
   the fused layer step (`ee_layer`). */
static inline __attribute__((always_inline)) void sweep(const void *panel, int bf16, const float *xr,
                                                        const uint32_t *xq, const void *b, const void *res, void *y,
                                                        int64_t row0, int64_t m0, int64_t K, int64_t M, const int XS,
                                                        const int RM, const int64_t BY) {
    (void)xq;
    v8 a[XLAST][2][2]; /* row, chain (even / odd columns), half */
    (void)RM;
    for (int i = 0; i < XS; i++) a[i][0][0] = a[i][0][1] = a[i][1][0] = a[i][1][1] = (v8){0};
    int64_t k = 0;
    const char *ahead = (const char *)panel + BY; /* 2 columns: one line of bf16, two of fp32 */
    const int64_t step = bf16 ? 2 * PANEL * 2 : 2 * PANEL * 4;
    for (; k + 2 <= K; k += 2, ahead += step) {
        fetch_ahead(ahead, bf16 ? 1 : 2, BY);
        v8 w0l, w0h, w1l, w1h;
        widen_halves(panel, bf16, k, &w0l, &w0h);
        widen_halves(panel, bf16, k + 1, &w1l, &w1h);
        for (int i = 0; i < XS; i++) {
            const float x0 = xr[k * XS + i], x1 = xr[(k + 1) * XS + i];
            a[i][0][0] += w0l * x0;
            a[i][0][1] += w0h * x0;
            a[i][1][0] += w1l * x1;
            a[i][1][1] += w1h * x1;
        }
    }
    if (k < K) {
        v8 wl, wh;
        widen_halves(panel, bf16, k, &wl, &wh);
        for (int i = 0; i < XS; i++) {
            a[i][0][0] += wl * xr[k * XS + i];
            a[i][0][1] += wh * xr[k * XS + i];
        }
    }
    for (int i = 0; i < XS; i++) {
        v8 half[2] = {a[i][0][0] + a[i][1][0], a[i][0][1] + a[i][1][1]};
        v16 s;
        memcpy(&s, half, sizeof s);
        store(s, b, res, y, bf16, row0 + i, m0, M);
    }
}
#else
static inline __attribute__((always_inline)) void sweep(const void *panel, int bf16, const float *xr,
                                                        const uint32_t *xq, const void *b, const void *res, void *y,
                                                        int64_t row0, int64_t m0, int64_t K, int64_t M, const int XS,
                                                        const int RM, const int64_t BY) {
    v16 a[XLAST][2];
    for (int i = 0; i < XS; i++) a[i][0] = a[i][1] = (v16){0};
    int64_t k = 0;
    (void)RM;
#ifdef DPBF16
/* row i's pair of columns k, k + 1: row by row (RM) or k-major in the block (`pairs`) */
#define PAIR_AT(i, k) (RM ? (i) * (K / 2) + (k) / 2 : (k) / 2 * XS + (i))
    if (bf16) {
        __m512 c[XLAST][2];
        for (int i = 0; i < XS; i++) c[i][0] = c[i][1] = _mm512_setzero_ps();
        const char *ahead = (const char *)panel + BY; /* 4 columns: two lines of bf16 */
        for (; k + 4 <= K; k += 4, ahead += 4 * PANEL * 2) {
            fetch_ahead(ahead, 2, BY);
            __m512bh w0 = column_pair(panel, k), w1 = column_pair(panel, k + 2);
            for (int i = 0; i < XS; i++) {
                c[i][0] = _mm512_dpbf16_ps(c[i][0], w0, (__m512bh)_mm512_set1_epi32((int)xq[PAIR_AT(i, k)]));
                c[i][1] = _mm512_dpbf16_ps(c[i][1], w1, (__m512bh)_mm512_set1_epi32((int)xq[PAIR_AT(i, k + 2)]));
            }
        }
        for (int i = 0; i < XS; i++) memcpy(a[i], c[i], sizeof a[i]);
    }
#else
    (void)xq;
#endif
    const char *ahead = (const char *)panel + k * PANEL * (bf16 ? 2 : 4) + BY;
    for (; k + 2 <= K; k += 2, ahead += 2 * PANEL * (bf16 ? 2 : 4)) {
        fetch_ahead(ahead, bf16 ? 1 : 2, BY);
        v16 w0, w1;
        columns(panel, bf16, k, &w0, &w1);
        for (int i = 0; i < XS; i++) {
            a[i][0] += w0 * xr[k * XS + i];
            a[i][1] += w1 * xr[(k + 1) * XS + i];
        }
    }
    if (k < K) {
        v16 w = column(panel, bf16, k);
        for (int i = 0; i < XS; i++) a[i][0] += w * xr[k * XS + i];
    }
    for (int i = 0; i < XS; i++) store(a[i][0] + a[i][1], b, res, y, bf16, row0 + i, m0, M);
}
#endif

#if XLAST == 9
/* `sweep` of a last block of 9 rows (`last_block`), in a function of its own: inlined beside the
   others, it made GCC lay out the 8-row sweep so that it ran 2-3% slower. */
static __attribute__((noinline)) void sweep9(const void *panel, int bf16, const float *xr, const uint32_t *xq,
                                             const void *b, const void *res, void *y, int64_t row0, int64_t m0,
                                             int64_t K, int64_t M, int rm, int ahead) {
    if (rm && ahead)
        sweep(panel, bf16, xr, xq, b, res, y, row0, m0, K, M, 9, 1, PREFETCH);
    else if (rm)
        sweep(panel, bf16, xr, xq, b, res, y, row0, m0, K, M, 9, 1, 0);
    else if (ahead)
        sweep(panel, bf16, xr, xq, b, res, y, row0, m0, K, M, 9, 0, PREFETCH);
    else
        sweep(panel, bf16, xr, xq, b, res, y, row0, m0, K, M, 9, 0, 0);
}
#endif

/* `sweep` for each block of XS rows, XS a constant in each call (and RM, the pairs' layout, and BY,
   the bytes ahead it prefetches). */
#if XLAST == 9
#define SWEEPS(RM, BY)                                                                                 \
    switch (rows) {                                                                                    \
    case 1: sweep(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, 1, RM, BY); break;             \
    case 2: sweep(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, 2, RM, BY); break;             \
    case 3: sweep(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, 3, RM, BY); break;             \
    case 4: sweep(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, 4, RM, BY); break;             \
    case 5: sweep(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, 5, RM, BY); break;             \
    case 6: sweep(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, 6, RM, BY); break;             \
    case 7: sweep(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, 7, RM, BY); break;             \
    case 8: sweep(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, 8, RM, BY); break;             \
    default: sweep9(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, RM, BY != 0); break;         \
    }
#else
#define SWEEPS(RM, BY)                                                                                 \
    switch (rows) {                                                                                    \
    case 1: sweep(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, 1, RM, BY); break;             \
    default: sweep(panel, bf16, xr, xqr, b, res, y, i0, p * PANEL, K, M, 2, RM, BY); break;            \
    }
#endif

#ifdef DPBF16
/* TR rows (from i0) against TP panels (from p) at once, bf16, K % 4 == 0, the rows' pairs row by
   row (xq: `prologue_row`'s, or the bf16 rows themselves): a prompt's products. `sweep` takes one
   panel against 8 rows, so each step of 4 columns loads 2 weight pairs and 16 broadcasts for 16
   vdpbf16ps; here TP weight pairs and TR broadcasts (an operand of the instruction) for TR x TP
   of them, twice a step (4 x 3: 24 sums, two chains each of 12 outputs, and the 3 weight pairs
   in 27 of the 32 registers). Each output's sums are `sweep`'s, in its order (column pairs from
   k = 0, 4, ... into one chain, from k = 2, 6, ... into the other, added at the end): the same
   numbers, whatever rows and panels lie beside it. The CPU reference model's 48 bf16 layer
   products in turn (2 threads, AMD EPYC; one process, the previous build's library beside this
   one, alternating, medians of 40-300 passes): 0.942 / 0.983 / 0.946x the sweep's time at 17 / 64 /
   169 rows; one shape at a time, 1.04-1.09x oneDNN's packed kernel's at 169 rows, where the sweep
   read 1.13-1.5x. 6 rows x 2 panels read 1.01-1.12x packed's. bf16 panels stored in column pairs
   (one load, no permute) read the same, 1.013 / 0.997 / 1.010x at 1 / 5 / 169 rows, once each pair
   was held in a register (left as an operand of each use, its loads were repeated: 1.13-1.38x).
   A prompt's layers then run in one native call each (`kernels.fused_at`). */
#define GROUP_ROWS 4
#define GROUP_PANELS 3
static inline __attribute__((always_inline)) void group(const void *Wp, const uint32_t *xq, const void *b,
                                                        const void *res, void *y, int64_t p, int64_t i0, int64_t K,
                                                        int64_t M, const int TR, const int TP) {
    __m512 c[GROUP_ROWS][GROUP_PANELS][2];
    for (int i = 0; i < TR; i++)
        for (int j = 0; j < TP; j++) c[i][j][0] = c[i][j][1] = _mm512_setzero_ps();
    const char *w = (const char *)Wp + p * K * PANEL * 2;
    const uint32_t *xr = xq + i0 * (K / 2);
    for (int64_t k = 0; k < K; k += 4)
        for (int h = 0; h < 2; h++) {
            __m512bh wj[GROUP_PANELS];
            for (int j = 0; j < TP; j++) wj[j] = column_pair(w + j * K * PANEL * 2, k + 2 * h);
            for (int i = 0; i < TR; i++) {
                const __m512bh xi = (__m512bh)_mm512_set1_epi32((int)xr[i * (K / 2) + (k + 2 * h) / 2]);
                for (int j = 0; j < TP; j++) c[i][j][h] = _mm512_dpbf16_ps(c[i][j][h], wj[j], xi);
            }
        }
    for (int i = 0; i < TR; i++)
        for (int j = 0; j < TP; j++) {
            v16 a0, a1;
            memcpy(&a0, &c[i][j][0], sizeof a0);
            memcpy(&a1, &c[i][j][1], sizeof a1);
            store(a0 + a1, b, res, y, 1, i0 + i, (p + j) * PANEL, M);
        }
}

/* `group` with TR and TP constants: TP panels against every row of n, GROUP_ROWS at a time. */
#define GROUP_RUN(TP)                                                                                         \
    do {                                                                                                      \
        int64_t i0 = 0;                                                                                       \
        for (; i0 + GROUP_ROWS <= n; i0 += GROUP_ROWS) group(Wp, xq, b, res, y, p, i0, K, M, GROUP_ROWS, TP); \
        switch (n - i0) {                                                                                     \
        case 3: group(Wp, xq, b, res, y, p, i0, K, M, 3, TP); break;                                          \
        case 2: group(Wp, xq, b, res, y, p, i0, K, M, 2, TP); break;                                          \
        case 1: group(Wp, xq, b, res, y, p, i0, K, M, 1, TP); break;                                          \
        }                                                                                                     \
    } while (0)

/* The panels p0 .. p1 - 1 against n rows by `group`: GROUP_PANELS at a time, then those left. */
static void grouped(const void *Wp, const uint32_t *xq, const void *b, const void *res, void *y, int64_t p0,
                    int64_t p1, int64_t K, int64_t M, int64_t n) {
    int64_t p = p0;
    for (; p + GROUP_PANELS <= p1; p += GROUP_PANELS) GROUP_RUN(GROUP_PANELS);
    if (p1 - p == 2) GROUP_RUN(2);
    if (p1 - p == 1) GROUP_RUN(1);
}
#endif

/* Where the last of a product's blocks of rows starts: blocks of XROWS, and the rows left after
   them a block of their own, except that up to XLAST - XROWS of them join the block before: 9 rows
   (a verify pass of 8 drafts and the row before them) in one sweep, not 8 and then 1, whose two
   chains of sums wait on each other's latency (the CPU reference model's 48 bf16 layer products,
   streamed, 2 threads, AMD EPYC: 9 rows 0.906-0.912x the time, 8 + 1 costing about what 12 rows did;
   its self-speculative decoding 0.946 / 0.973x, 80 and 160 prompt pairs, `benchmarks/native_ab.py`).
   Up to 11 rows in one sweep read 0.97-1.02x at 10-12 rows and slowed the 8-row sweep 5-8% (GCC's
   layout of the inlined sweeps): not taken. */
static inline int64_t last_block(int64_t n) {
    const int64_t left = n % XROWS;
    if (n <= XLAST) return 0;
    if (left == 0) return n - XROWS;
    return left <= XLAST - XROWS ? n - left - XROWS : n - left;
}

/* The rows of the block that starts at i0 (`last_block`: `last`). */
static inline int64_t block_rows(int64_t n, int64_t i0, int64_t last) { return i0 == last ? n - i0 : XROWS; }

/* The panels p0 .. p1 - 1 against the n rows; bf16 pairs xq row by row where `rows_pairs`
   (`prologue_row`'s), else k-major in each block (`pairs`). */
static void panels(const void *Wp, int bf16, const float *x, const uint32_t *xq, const void *b, const void *res,
                   void *y, int64_t p0, int64_t p1, int64_t K, int64_t M, int64_t n, int rows_pairs) {
    const int64_t esize = bf16 ? 2 : 4;
    const int ahead = __atomic_load_n(&prefetch_on[bf16 != 0], __ATOMIC_RELAXED);
#ifdef DPBF16
    if (bf16 && rows_pairs && K % 4 == 0) {
        grouped(Wp, xq, b, res, y, p0, p1, K, M, n);
        return;
    }
#endif
    const int64_t last = last_block(n);
    for (int64_t p = p0; p < p1; p++) {
        const void *panel = (const char *)Wp + p * K * PANEL * esize;
        for (int64_t i0 = 0, rows; i0 < n; i0 += rows) {
            rows = block_rows(n, i0, last);
            const float *xr = x + i0 * K;
            const uint32_t *xqr = xq ? xq + i0 * (K / 2) : NULL;
            if (rows_pairs && ahead)
                SWEEPS(1, PREFETCH)
            else if (rows_pairs)
                SWEEPS(1, 0)
            else if (ahead)
                SWEEPS(0, PREFETCH)
            else
                SWEEPS(0, 0)
        }
    }
}

static inline float load(const void *x, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* Where element (i, k) of the rows x (n x K) lies in the product's fp32 copy: rows in blocks of
   XROWS (the last one `last_block`'s), each block k-major (its rows' k-th elements side by side),
   so that a sweep reads one contiguous stream of x too. Row-major, rows K * 4 bytes apart, a sweep
   over 8 rows of K = 1024 read 8 lines 4 KB apart per column: one L1 set, and bf16 products of 5-8
   rows ran slower than oneDNN's. */
static inline int64_t xblock(int64_t i, int64_t k, int64_t n, int64_t K) {
    const int64_t last = last_block(n);
    int64_t i0 = i / XROWS * XROWS;
    if (i0 > last) i0 = last;
    const int64_t rows = block_rows(n, i0, last);
    return i0 * K + k * rows + (i - i0);
}

#ifdef AMX
/* Whether bf16 products take the tiles: 1 once the kernel has let this process use them (Linux
   asks each process to request the tiles' register state, ARCH_REQ_XCOMP_PERM), -1 where it
   refused or `ee_amx(0)` turned them off, 0 not asked yet. */
static int amx_state = 0;

static int amx_ready(void) {
    int st = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (st == 0) {
        st = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
        __atomic_store_n(&amx_state, st, __ATOMIC_RELEASE);
    }
    return st > 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Up to 16 rows (rows1 = 0): tiles 0-3 the sums of `rows0` rows against 4 panels (rows x 16
   fp32), tile 4 the rows' next 32 columns (rows x 32 bf16), tiles 5 and 6 a panel's next 32
   columns (16 pairs of 16 outputs). Two blocks of rows (rows0 = 16, rows1 more): tiles 0-1 the
   first block's sums against 2 panels, 2-3 the second's, 4 and 5 the two blocks' columns, 6 and 7
   the panels'. */
static void amx_configure(int rows0, int rows1) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        if (rows1 == 0)
            c.rows[t] = t < 5 ? (uint8_t)rows0 : PANEL;
        else
            c.rows[t] = t == 2 || t == 3 || t == 5 ? (uint8_t)rows1 : t < 6 ? (uint8_t)rows0 : PANEL;
    }
    if (rows1 == 0) c.rows[7] = c.colsb[7] = 0; /* unused */
    _tile_loadconfig(&c);
}

/* The sums tile `t` holds (rows x 16 fp32, via `sums`) `store`d as rows row0 .. of panel p. */
#define AMX_STORE(t, rows, row0, p)                                                                  \
    do {                                                                                             \
        _tile_stored(t, sums, 64);                                                                   \
        for (int i = 0; i < (rows); i++) {                                                           \
            v16 v;                                                                                   \
            memcpy(&v, sums + i * PANEL, sizeof v);                                                  \
            store(v, b, res, y, 1, (row0) + i, (p) * PANEL, M);                                      \
        }                                                                                            \
    } while (0)

/* Panels p0 .. p1 - 1 against the rows xa (n x K bf16, row-major; K a multiple of 32), `store`d
   as `panels` stores its sums: per row and output one fp32 sum over k in order, 32 columns a tile
   product, whatever the rows beside it (the tiles' product is defined element by element), so a
   verify pass's rows equal the decode steps' bit for bit here too. Up to 16 rows, four panels at
   a time, each its own sum tile: four chains of tile products, and four streams of weights ahead
   of which the loop asks for the lines PREFETCH on where bf16's prefetch is (`prefetch_on`); more
   rows, two blocks of them (32 rows) against two panels at a time, so that each block of weights
   is read once for 32 rows. Intel Xeon (Emerald Rapids), 2 threads, 12 weights of (2048, 384)
   streamed in turn: 29 / 30 / 32 / 34 / 41 us a product at 1 / 2 / 5 / 8 / 16 rows, where the
   sweep took 29 / 31 / 42-52 / 63-68 / 119-135 (one row: the same stream, the same time). */
static void amx_panels(const void *Wp, const uint16_t *xa, const void *b, const void *res, void *y, int64_t p0,
                       int64_t p1, int64_t K, int64_t M, int64_t n) {
    float sums[PANEL * PANEL] __attribute__((aligned(64)));
    const int64_t step = K * PANEL * 2; /* bytes from a panel to the next */
    const int64_t by = __atomic_load_n(&prefetch_on[1], __ATOMIC_RELAXED) ? PREFETCH : 0;
    int configured0 = -1, configured1 = -1;
    for (int64_t i0 = 0; i0 < n; i0 += 2 * PANEL) {
        const int rows0 = n - i0 < PANEL ? (int)(n - i0) : PANEL;
        const int rows1 = n - i0 - rows0 < PANEL ? (int)(n - i0 - rows0) : PANEL;
        if (rows0 != configured0 || rows1 != configured1) amx_configure(configured0 = rows0, configured1 = rows1);
        const uint16_t *xr = xa + i0 * K, *xr1 = xr + PANEL * K;
        const int per = rows1 ? 2 : 4; /* panels at a time */
        for (int64_t p = p0; p < p1; p += per) {
            const int np = p1 - p < per ? (int)(p1 - p) : per;
            const char *w = (const char *)Wp + p * step;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t k = 0; k < K; k += 32) {
                const char *wk = w + k * PANEL * 2;
                for (int q = 0; q < np && by > 0; q++)
                    for (int line = 0; line < 16; line++) __builtin_prefetch(wk + q * step + by + 64 * line);
                _tile_loadd(4, xr + k, K * 2);
                if (rows1) {
                    _tile_loadd(5, xr1 + k, K * 2);
                    _tile_loadd(6, wk, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(2, 5, 6);
                    if (np > 1) {
                        _tile_loadd(7, wk + step, 64);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    continue;
                }
                _tile_loadd(5, wk, 64);
                _tile_dpbf16ps(0, 4, 5);
                if (np > 1) {
                    _tile_loadd(6, wk + step, 64);
                    _tile_dpbf16ps(1, 4, 6);
                }
                if (np > 2) {
                    _tile_loadd(5, wk + 2 * step, 64);
                    _tile_dpbf16ps(2, 4, 5);
                }
                if (np > 3) {
                    _tile_loadd(6, wk + 3 * step, 64);
                    _tile_dpbf16ps(3, 4, 6);
                }
            }
            if (rows1) {
                AMX_STORE(0, rows0, i0, p);
                AMX_STORE(2, rows1, i0 + PANEL, p);
                if (np > 1) {
                    AMX_STORE(1, rows0, i0, p + 1);
                    AMX_STORE(3, rows1, i0 + PANEL, p + 1);
                }
                continue;
            }
            AMX_STORE(0, rows0, i0, p);
            if (np > 1) AMX_STORE(1, rows0, i0, p + 1);
            if (np > 2) AMX_STORE(2, rows0, i0, p + 2);
            if (np > 3) AMX_STORE(3, rows0, i0, p + 3);
        }
    }
    _tile_release(); /* the tiles' state back to its initial one: others configure their own */
}

#endif

/* Whether bf16 products of many rows run in groups of rows and panels on vdpbf16ps (`group`): 1
   where this build has it (AVX512-BF16), else 0. */
int ee_grouped(void) {
#ifdef DPBF16
    return 1;
#else
    return 0;
#endif
}

/* Whether bf16 products use Intel's matrix tiles (AMX): want 0 turns them off for this process,
   1 on where this build and the kernel allow, -1 asks. Returns 1 if they are used, else 0. */
int ee_amx(int want) {
#ifdef AMX
    if (want == 0) __atomic_store_n(&amx_state, -1, __ATOMIC_RELEASE);
    if (want == 1 && __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE) < 0) __atomic_store_n(&amx_state, 0, __ATOMIC_RELEASE);
    return amx_ready();
#else
    (void)want;
    return 0;
#endif
}

/* The bf16 pairs of the rows xf (`xblock`'s layout, values bf16 holds exactly) into xq: per block
   of rows, k-major over the pairs of columns (k even, k + 1 < K), 32 bits per row and pair: the
   row's element k in the low half, k + 1 in the high (vdpbf16ps's operand, broadcast). */
static void pairs(const float *xf, uint32_t *xq, int64_t n, int64_t K) {
    const int64_t last = last_block(n);
    for (int64_t i0 = 0, rows; i0 < n; i0 += rows) {
        rows = block_rows(n, i0, last);
        const float *xr = xf + i0 * K;
        uint32_t *out = xq + i0 * (K / 2);
        if (rows == 1) { /* a decode step's one row: contiguous, a loop the compiler vectorises */
            for (int64_t j = 0; j < K / 2; j++) {
                uint32_t lo, hi;
                memcpy(&lo, xr + 2 * j, 4);
                memcpy(&hi, xr + 2 * j + 1, 4);
                out[j] = (lo >> 16) | (hi & 0xffff0000u);
            }
            continue;
        }
        for (int64_t k = 0; k + 2 <= K; k += 2)
            for (int64_t i = 0; i < rows; i++) {
                uint32_t lo, hi;
                memcpy(&lo, xr + k * rows + i, 4);
                memcpy(&hi, xr + (k + 1) * rows + i, 4);
                out[k / 2 * rows + i] = (lo >> 16) | (hi & 0xffff0000u);
            }
    }
}

/* The product's input rows in fp32 (n x K, into xf in `xblock`'s layout), made from x as the
   layer's own operations would make them, with their roundings:
     NONE     x itself;
     RMSNORM  gain * (x * rsqrt(mean(x^2) + eps)) (`lean.rms_norm`: in bf16 the scaled row is
              rounded, then its product with the gain);
     SWIGLU   silu(gate) * up, x = [gate | up] (n x 2K) (bf16: silu rounded, then the product). */
enum { NONE = 0, RMSNORM = 1, SWIGLU = 2 };

/* m (<= 16) consecutive elements of p from i as fp32, zeros past them (a row's last block). */
static inline v16 widen_part(const void *p, int bf16, int64_t i, int64_t m) {
    if (m == PANEL) return widen(p, bf16, i);
    v16 f = {0};
    for (int64_t j = 0; j < m; j++) f[j] = load(p, bf16, i + j);
    return f;
}

/* e^x of 16 lanes (exp16; exp8 of 8 where vectors are 8 lanes), within an ulp or two of expf:
   x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7 (the rest below 1e-8 relative),
   2^n put into the exponent. Inputs below -87 give e^-87 and above 88 e^88 (expf: 0 and inf; a
   SiLU of such gates is 0 or the gate to within far less than a rounding of the results it
   feeds). Adding 1.5 * 2^23 rounds to an integer in the low bits; ln2 split in two keeps r exact
   enough; the integer's bits less the magic number's, shifted, are the exponent's increment. */
#define DEFINE_EXP(NAME, V, W)                                                                       \
    static inline V NAME(V x) {                                                                      \
        const V lo = (V){0} - 87.0f, hi = (V){0} + 88.0f;                                            \
        W below = (W)(x < lo), above = (W)(x > hi), ux, ulo, uhi;                                    \
        memcpy(&ux, &x, sizeof ux);                                                                  \
        memcpy(&ulo, &lo, sizeof ulo);                                                               \
        memcpy(&uhi, &hi, sizeof uhi);                                                               \
        ux = (ux & ~below & ~above) | (ulo & below) | (uhi & above);                                 \
        memcpy(&x, &ux, sizeof x);                                                                   \
        const float magic = 12582912.0f;                                                             \
        V t = x * 1.44269504088896341f + magic, n = t - magic;                                       \
        V r = x - n * 0.693359375f + n * 2.12194440e-4f;                                             \
        V p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 +                         \
                                                              r * (1.0f / 120 + r * (1.0f / 720 +     \
                                                                                     r * (1.0f / 5040))))))); \
        W bits, e;                                                                                   \
        memcpy(&bits, &t, sizeof bits);                                                              \
        e = (bits - 0x4B400000u) << 23;                                                              \
        memcpy(&bits, &p, sizeof bits);                                                              \
        bits += e;                                                                                   \
        memcpy(&p, &bits, sizeof p);                                                                 \
        return p;                                                                                    \
    }
DEFINE_EXP(exp16, v16, w16)
#ifdef HALVES
DEFINE_EXP(exp8, v8, w8)
#endif

#ifdef DPBF16
/* round16 without its subnormal check: the CPU's conversion (`round16_cpu`); each lane's
   `subnormal_key` folded into *low by an unsigned minimum, which after a row marks (`any_subnormal`)
   exactly where some lane was subnormal, for the caller to redo it (`row_panels`). A
   branch on each vector's check took a bf16 prompt's RMSNorm rows from 131 to 201 ns a row (384
   wide, one thread, AMD EPYC), a mask or-ed per vector to 186. */
static inline v16 round16_marked(v16 f, __m512i *low) {
    *low = _mm512_min_epu32(*low, subnormal_key(f));
    return round16_cpu(f);
}
typedef __m512i sub_t;
#define SUB_NONE _mm512_set1_epi32(-1)
#define SUB_ANY(low) any_subnormal(low)
#else
typedef int sub_t;
#define SUB_NONE 0
#define SUB_ANY(low) 0
#endif

/* Panel k of row i's values (m of them: PANEL, or the row's last m), in bf16 rounded by
   `round16_marked` (exact: 0) or round16_bits. */
static inline v16 row_values(const void *x, int bf16, int kind, const void *gain, float scale, int64_t K, int64_t i,
                             int64_t k, int64_t m, const int exact, sub_t *sub) {
    (void)sub;
#ifdef DPBF16
#define ROUND(f) (exact ? round16_bits(f) : round16_marked(f, sub))
#else
#define ROUND(f) round16_bits(f)
#endif
#define LOAD(p, o) (m == PANEL ? widen(p, bf16, o) : widen_part(p, bf16, o, m))
    if (kind == RMSNORM) {
        v16 s = LOAD(x, i * K + k) * scale, g = LOAD(gain, k);
        return bf16 ? ROUND(g * ROUND(s)) : g * s;
    }
    if (kind == SWIGLU) {
        v16 gate = LOAD(x, i * 2 * K + k), up = LOAD(x, i * 2 * K + K + k);
        v16 silu = gate / (1.0f + exp16(-gate));
        return bf16 ? ROUND(ROUND(silu) * up) : silu * up;
    }
    return LOAD(x, i * K + k);
#undef LOAD
#undef ROUND
}

/* Row i's whole panels (K / PANEL of them) into their destination (`prologue_row`), one loop per
   destination (a loop that also took the last partial panel and chose its destination per panel
   kept its vectors on the stack). Whether a lane was subnormal (`round16_marked`; exact: 0). */
static inline int row_panels(const void *x, int bf16, int kind, const void *gain, float scale, int64_t K, int64_t i,
                                  float *at, int64_t step, uint16_t *xa, uint32_t *pq, void *ro, const int exact) {
    const int64_t whole = K / PANEL * PANEL;
    sub_t sub = SUB_NONE;
#define EACH for (int64_t k = 0; k < whole; k += PANEL)
#define VALUES row_values(x, bf16, kind, gain, scale, K, i, k, PANEL, exact, &sub)
    if ((ro && bf16) || xa || pq) { /* bf16 values: their bits (a row's pairs are its bf16 row) */
        uint16_t *dst = pq ? (uint16_t *)pq : (xa ? xa : (uint16_t *)ro) + i * K;
        EACH put_high(dst + k, VALUES);
    } else if (ro) {
        EACH {
            v16 v = VALUES;
            memcpy((float *)ro + i * K + k, &v, sizeof v);
        }
    } else if (step == 1) {
        EACH {
            v16 v = VALUES;
            memcpy(at + k, &v, sizeof v);
        }
    } else {
        EACH {
            v16 v = VALUES;
            for (int64_t j = 0; j < PANEL; j++) at[(k + j) * step] = v[j];
        }
    }
#undef EACH
#undef VALUES
    return SUB_ANY(sub);
}

/* `prologue`'s row i. */
static inline void prologue_row(const void *x, int bf16, int kind, const void *gain, float eps, float *xf, int64_t n,
                                int64_t K, uint16_t *xa, uint32_t *xq, void *ro, int64_t i) {
    /* row i's elements in `xblock`'s layout: from `at`, `step` apart (1: a block of one row,
       stored a vector at a time; the index worked out per element cost a fill's or a verify
       pass's rows more than their products); or, with xa (bf16, K a multiple of 16), as bf16
       row-major there (the tiles' operand: the values are bf16's, so their high halves) */
    const int rowwise = xa || xq || ro; /* written row by row elsewhere, not into xf's blocks */
    float *at = rowwise ? NULL : xf + xblock(i, 0, n, K);
    const int64_t step = rowwise ? 1 : xblock(i, 1, n, K) - xblock(i, 0, n, K);
    /* with ro (`ee_rows`): the row itself, row-major in x's dtype (the values are bf16's in bf16) */
    /* with xq (bf16, K % 4 == 0, a prompt's rows: `linear`): the row's pairs, row by row */
    uint32_t *pq = xq ? xq + i * (K / 2) : NULL;
    const int64_t whole = K / PANEL * PANEL; /* the row's whole panels, apart from its last m < PANEL */
    float scale = 0.f;
    if (kind == RMSNORM) {
        v16 acc = {0};
        for (int64_t k = 0; k < K; k += PANEL) {
            v16 e = k < whole ? widen(x, bf16, i * K + k) : widen_part(x, bf16, i * K + k, K - k);
            acc += e * e;
        }
        float ss = 0.f;
        for (int j = 0; j < PANEL; j++) ss += acc[j];
        scale = 1.0f / sqrtf(ss / (float)K + eps);
    }
    /* the CPU's bf16 conversion, the row again with the integer rounding where a lane was subnormal */
    if (row_panels(x, bf16, kind, gain, scale, K, i, at, step, xa, pq, ro, 0))
        row_panels(x, bf16, kind, gain, scale, K, i, at, step, xa, pq, ro, 1);
    if (whole == K) return;
    const int64_t k = whole, m = K - whole; /* the last partial panel */
    v16 v = row_values(x, bf16, kind, gain, scale, K, i, k, m, 1, NULL);
    if (xa || xq) { /* bf16 values: their high halves (a row's pairs are its bf16 row), as `row_panels` */
        uint16_t *dst = xq ? (uint16_t *)pq : xa + i * K;
        w16 u;
        memcpy(&u, &v, sizeof u);
        for (int64_t j = 0; j < m; j++) dst[k + j] = (uint16_t)(u[j] >> 16);
    } else if (ro && bf16) {
        for (int64_t j = 0; j < m; j++) ((uint16_t *)ro)[i * K + k + j] = f32_to_bf16(v[j]);
    } else if (ro) {
        memcpy((float *)ro + i * K + k, &v, sizeof(float) * (size_t)m);
    } else {
        for (int64_t j = 0; j < m; j++) at[(k + j) * step] = v[j];
    }
}

/* Rows from which `prologue` splits them over the threads, a block of XROWS rows at a time (`xblock`:
   a block's rows interleave element by element, so threads splitting one block write the same cache
   lines). Rows split one by one from 8 on, the two threads wrote alternate 16-byte halves of each
   line of a verify pass's block of 8: the CPU reference model's verify of 8 rows (bf16, 2 threads,
   AMD EPYC) cost 5.24 ms against 3.73 for 7 rows, ~20 us more for each of its 48 products. From two
   blocks (`last_block`) whole blocks split (one thread making a 160-token prompt's rows while the
   other waited had cost ~2 of its ~12 ms). */
#define PROLOGUE_ROWS 9
/* More rows than this (a prompt's), bf16 with K % 4 == 0: the prologue writes their pairs itself (`linear`). */
#define PAIRS_DIRECT 16
static void prologue(const void *x, int bf16, int kind, const void *gain, float eps, float *xf, int64_t n, int64_t K,
                     uint16_t *xa, uint32_t *xq, int threads) {
    const int64_t last = last_block(n);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n >= PROLOGUE_ROWS && last)
    for (int64_t b = 0; b <= last / XROWS; b++) {
        const int64_t i0 = b * XROWS, rows = block_rows(n, i0, last);
        for (int64_t i = i0; i < i0 + rows; i++) prologue_row(x, bf16, kind, gain, eps, xf, n, K, xa, xq, NULL, i);
    }
}

/* The rows x made ready for a product on another kernel (`lean.LeanKernels.folded`: a prompt's
   rows on oneDNN), row by row into out (n x K, x's dtype): RMSNORM or SWIGLU as the prologue makes
   them for this kernel's own products, with their roundings (`prologue_row`). Threads split the
   rows from PROLOGUE_ROWS. In place of the torch operations (bf16 RMSNorm: square, mean, add,
   rsqrt, two products and their casts; SwiGLU: silu and a product): the CPU reference model's
   bf16 prefill of 166-token prompts (AMD EPYC, 2 threads) 0.96x the time paired (34.3 -> 32.9 ms
   best on a slow spell of the host), SmolLM2's 0.96x, fp32 0.99x. Whole panels in loops of their own
   with the CPU's bf16 conversion (`row_panels`), one thread, AMD EPYC, ns a row: bf16 RMSNorm of 384
   303 -> 151, SwiGLU of 1024 515 -> 306; fp32 261 -> 67, 410 -> 156; the CPU reference's bf16
   prefill 0.98x the time (`benchmarks/native_ab.py`, 80 prompt pairs), the same numbers bit for bit
   (`ee_linear` and `ee_rows` on 1,008 shapes, kinds and thread counts against the previous build). */
void ee_rows(const void *x, int bf16, int kind, const void *gain, float eps, void *out, int64_t n, int64_t K,
             int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n >= PROLOGUE_ROWS)
    for (int64_t i = 0; i < n; i++) prologue_row(x, bf16, kind, gain, eps, NULL, n, K, NULL, NULL, out, i);
}

/* Elements from which `ee_add` splits them over the threads (a 160-token prompt's residual rows of
   384: 61,440). */
#define ADD_SPLIT 16384
/* y = a + y over n elements in place, as torch's `a + y` makes it: fp32 sums; bf16 widened, summed
   in fp32 and rounded once (`put_bf16`: the same bits, subnormals included). The residual added
   to a prompt's products on oneDNN (`native.add_`): torch's bf16 add (its AVX2 kernel: widen, add,
   round, each a pass of 8 lanes) took 25-42 us for 160 rows of 384 on the AMD EPYC, two a layer (the
   CPU reference model's bf16 prefill of 40 abstracts: 0.992 / 0.994x the time, medians of 120
   alternating prompt pairs in two runs; the same K/V bit for bit). */
void ee_add(const void *a, void *y, int64_t n, int bf16, int threads) {
    const int64_t panels = n / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n >= ADD_SPLIT)
    for (int64_t p = 0; p < panels; p++) {
        const int64_t o = p * PANEL;
        v16 s = widen(a, bf16, o) + widen(y, bf16, o);
        if (bf16)
            put_bf16((uint16_t *)y + o, s);
        else
            memcpy((float *)y + o, &s, sizeof s);
    }
    for (int64_t i = panels * PANEL; i < n; i++) { /* the last n % PANEL */
        float s = load(a, bf16, i) + load(y, bf16, i);
        if (bf16)
            ((uint16_t *)y)[i] = f32_to_bf16(s);
        else
            ((float *)y)[i] = s;
    }
}

/* A learned exit check (`native.Probe` holds one, laid out as ee_probe reads it). */
typedef struct {
    const void *w1;    /* the first weight (see ee_probe) */
    const float *b1;   /* MLP probe: the first bias, H padded with zeros to whole blocks of 16 */
    const float *w2;   /* MLP probe: the output weight, padded as b1 */
    const float *gain; /* NULL: the norm's gain is folded into w1; else the gain (K), applied to the row */
    int64_t hidden;    /* H: 0 for a linear probe */
    int32_t w1_bf16;   /* MLP probe: w1 in bf16 (the module's own bf16 weight, gain apart) */
    float eps;         /* the norm's eps */
} ee_probe_t;

/* An MLP probe's hidden sums on rows y (n x K) for thread t of T's share of its blocks (`probe_hidden`),
   s the thread's own K + PANEL floats for a row's scaled copy, v the rows' sums (n x blocks x 16). */
static void probe_share(const void *y, int bf16, int64_t n, int64_t K, const ee_probe_t *p, float *s, float *v,
                        int64_t t, int64_t T);
/* The scores from the rows' hidden sums v (n x blocks x 16): each row's output (`probe_out`). */
static void probe_outs(const float *v, const ee_probe_t *p, int64_t n, float *out);

/* ee_linear, and where probe is given (an MLP probe, `ee_probe`'s), that probe's scores on y into
   scores (n) in the same parallel region: each thread, once every thread's panels are written
   (a barrier), scales each row itself and sums its share of the probe's blocks; the calling thread
   then takes each row's output. The same numbers as ee_probe on y after the call, without a
   parallel region of its own: the CPU reference model's probe (384 x 128) in a decode step's run
   of layers, alternating with its call after the layer's (one thread in bf16, `PROBE_SHARE`),
   bf16 4.9-5.8 -> 3.2-3.8 us, fp32 6.1-6.8 -> 2.3-3.7 us (with the groups of 4 in probe_hidden).
   Slower, each against this in a decode step (`cost_model.check_in_step`, 16 x 3,000 rounds in
   alternating blocks, bf16, AMD EPYC; two copies of one source read 5.25 / 5.08 us): no barrier,
   each thread summing the probe over its own panels' columns and the calling thread adding the
   panels' sums (6.67 against 5.04 us: the other thread's sums cross cores, and each thread reads
   8 short stretches of the weight, not one long one); that, summed after each panel as it is
   written (slower still); the thread's share of the weight prefetched during its panels (6.19
   against 4.93) or all at once after the barrier (6.18 against 4.66): the hardware's prefetchers
   do better alone. */
static int linear(const void *x, const void *Wp, const void *b, void *y, int64_t n, int64_t K, int64_t M, int bf16,
                  int threads, int kind, const void *gain, float eps, const void *residual, const ee_probe_t *probe,
                  float *scores) {
    float *xf = (float *)x; /* one row: xblock's layout is the row itself */
    uint32_t *xq = NULL;
#ifdef DPBF16
    const int64_t nq = bf16 ? n * (K / 2) : 0; /* bf16: the rows' pairs after them (`pairs`) */
#else
    const int64_t nq = 0;
#endif
#ifdef AMX
    const int tiles = bf16 && K % 32 == 0 && amx_ready();
#else
    const int tiles = 0;
#endif
    uint16_t *xa = NULL; /* the tiles': the rows as bf16 alone (`prologue`'s xa) */
    int direct = 0;      /* the pairs made by the prologue, row by row (below) */
    if (tiles) {
        xf = (float *)(xa = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n * K)));
        if (!xa) return 1;
        prologue(x, bf16, kind, gain, eps, NULL, n, K, xa, NULL, threads);
    } else if (bf16 || kind != NONE || n > 1) {
        /* A prompt's many bf16 rows with K % 4 == 0: the sweep reads their pairs alone (`sweep`),
           which the prologue writes straight away, row by row. Made from the fp32 rows, element by
           element and then k-major by `pairs` on one thread, they cost a 166-row product of the CPU
           reference model (bf16, AMD EPYC, one thread) ~40 us more at K = 384 (69 -> 28 us at 16
           outputs), as long as a (384, 384) sweep's ~20%. A verify pass's few rows keep `pairs`:
           row by row, 8 rows' broadcasts read 8 lines a column pair where k-major they read one
           (its verify of 8 rows 1.06-1.07x slower, paired). */
        direct = nq && n > PAIRS_DIRECT && K % 4 == 0;
        if (direct && kind == NONE) {
            xq = (uint32_t *)x; /* bf16 rows as they are: a row's pairs are the row itself */
        } else {
            xf = (float *)malloc(sizeof(float) * (size_t)((direct ? 0 : n * K) + nq));
            if (!xf) return 1;
            xq = nq ? (uint32_t *)(xf + (direct ? 0 : n * K)) : NULL;
            prologue(x, bf16, kind, gain, eps, direct ? NULL : xf, n, K, NULL, direct ? xq : NULL, threads);
            if (nq && !direct) pairs(xf, xq, n, K);
        }
    }
    int64_t np = (M + PANEL - 1) / PANEL;
    const int64_t blocks = probe ? (probe->hidden + PANEL - 1) / PANEL : 0;
    float *ps = NULL; /* the probe's: each thread's scaled row (M + PANEL), then the rows' hidden sums */
    if (blocks) {
        ps = (float *)malloc(sizeof(float) * (size_t)(threads * (M + PANEL) + n * blocks * PANEL));
        if (!ps) {
            if (xf != (const float *)x) free(xf);
            return 1;
        }
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t first = np * t / T, last = np * (t + 1) / T;
#ifdef AMX
        if (tiles && first < last) amx_panels(Wp, xa, b, residual, y, first, last, K, M, n);
#endif
        if (!tiles && first < last) panels(Wp, bf16, xf, xq, b, residual, y, first, last, K, M, n, direct);
        if (blocks) {
#pragma omp barrier
            probe_share(y, bf16, n, M, probe, ps + t * (M + PANEL), ps + threads * (M + PANEL), t, T);
        }
    }
    if (blocks) probe_outs(ps + threads * (M + PANEL), probe, n, scores);
    free(ps);
    if (xf != (const float *)x) free(xf);
    return 0;
}

/* y = residual + prologue(x) @ W^T (+ b) from W's panels (ee_pack); residual (n x M) and b may
   be NULL; gain and eps are read by RMSNORM only. 0 on success, 1 when memory runs out. */
int ee_linear(const void *x, const void *Wp, const void *b, void *y, int64_t n, int64_t K, int64_t M, int bf16,
              int threads, int kind, const void *gain, float eps, const void *residual) {
    return linear(x, Wp, b, y, n, K, M, bf16, threads, kind, gain, eps, residual, NULL, NULL);
}

/* Decode attention: each sequence's query heads at R positions attend to its keys and values,
 * one K/V group at a time (grouped-query attention), as `attention.group_rows_attention` (R = 1)
 * and SDPA with `enable_gqa` (R > 1: a verify pass's rows) do; SDPA spends ~25 us a call on a
 * single query row and ~70-90 us on a verify pass's few. q, out: (A, R, G, per, hd) contiguous;
 * k, v: (A, G, span, hd) with the given element strides for A, G and position (the KV cache's
 * views; hd contiguous); mask: (A, R, span) bytes, nonzero where a key may be attended (each
 * row its own: causal rows), or NULL. Scores and softmax in fp32, the query scaled 1/sqrt(hd);
 * bf16 inputs are widened and the output rounded once. A row's arithmetic does not depend on R or
 * on the rows beside it, so a verify pass's rows equal the decode steps'. Where hd is a multiple
 * of 16, keys go 16 at a time (`attend_head`): one key after another, each dot product summed
 * across its lanes alone, cost ~38 cycles a key and position (a sixth of a decode step's layer
 * on the CPU reference model at 330 positions, and as much again for each further row of a fill
 * or a verify pass); blocked, 2.0-2.4x less (hd 64, 330-1000 positions, one thread). 0 on
 * success, 1 when memory runs out.
 * With avx512_bf16 and bf16 caches (hd a multiple of 32) a score is vdpbf16ps's pair sums of the
 * unscaled bf16 query against the key, scaled after (its products exact in fp32 as before; the
 * sums in another order), and the values are read 32 at a time, split into even and odd elements
 * by a shift and a mask (two instructions where widening 16 took a widening load split in two
 * halves by the compiler, and a shift); even and odd keys add into two sets of sums. The CPU
 * reference model's heads (hd 64, bf16, 2 threads; `native.attend` called alone): one row over
 * 100 / 200 / 300 positions 11.6 / 14.5 / 17.7 -> 10.5 / 12.0 / 11.9 us (mostly the call's fixed
 * cost), 4 sequences' 5 rows 75 / 137 / 201 -> 49 / 61 / 87 us. */
/* q (fp32) . key (the cache's dtype), n = hd */
static inline float dot(const float *q, const void *key, int bf16, int64_t n) {
    float s = 0.f;
    int64_t i = 0;
    if (n >= PANEL) {
        v16 acc = {0};
        for (; i + PANEL <= n; i += PANEL) {
            v16 x;
            memcpy(&x, q + i, sizeof x);
            acc += x * widen(key, bf16, i);
        }
        for (int j = 0; j < PANEL; j++) s += acc[j];
    }
    for (; i < n; i++) s += q[i] * load(key, bf16, i);
    return s;
}

static int attend(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int64_t A, int64_t R,
                  int64_t G, int64_t per, int64_t span, int64_t hd, int64_t kb, int64_t kg, int64_t kp, int64_t vb,
                  int64_t vg, int64_t vp, int bf16, int threads, const int64_t *slots, const int64_t *pos);

int ee_attend(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int64_t A, int64_t R,
              int64_t G, int64_t per, int64_t span, int64_t hd, int64_t kb, int64_t kg, int64_t kp, int64_t vb,
              int64_t vg, int64_t vp, int bf16, int threads) {
    return attend(q, k, v, mask, out, A, R, G, per, span, hd, kb, kg, kp, vb, vg, vp, bf16, threads, NULL, NULL);
}

#ifdef __has_builtin
#if __has_builtin(__builtin_shufflevector)
#define SHUFFLEVECTOR 1
#endif
#endif
#ifdef SHUFFLEVECTOR /* Clang, GCC 12 and later */
#define SHUFFLE(u, v, ...) __builtin_shufflevector(u, v, __VA_ARGS__)
#define SHUFFLE8(u, v, ...) __builtin_shufflevector(u, v, __VA_ARGS__)
#else
#define SHUFFLE(u, v, ...) __builtin_shuffle(u, v, (w16){__VA_ARGS__})
#define SHUFFLE8(u, v, ...) __builtin_shuffle(u, v, (w8){__VA_ARGS__})
#endif

#ifdef HALVES
/* `halves` for 8 lanes. */
static inline v8 halves8(v8 u, v8 v, int s) {
    switch (s) {
    case 4: return SHUFFLE8(u, v, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(u, v, 4, 5, 6, 7, 12, 13, 14, 15);
    case 2: return SHUFFLE8(u, v, 0, 1, 4, 5, 8, 9, 12, 13) + SHUFFLE8(u, v, 2, 3, 6, 7, 10, 11, 14, 15);
    default: return SHUFFLE8(u, v, 0, 2, 4, 6, 8, 10, 12, 14) + SHUFFLE8(u, v, 1, 3, 5, 7, 9, 11, 13, 15);
    }
}

/* Lane j: the sum of x[j]'s 8 lanes, for 8 vectors at once (`sums16`'s tree). */
static inline v8 sums8(const v8 *x) {
    v8 a[4], b[2];
    for (int i = 0; i < 4; i++) a[i] = halves8(x[2 * i], x[2 * i + 1], 4);
    for (int i = 0; i < 2; i++) b[i] = halves8(a[2 * i], a[2 * i + 1], 2);
    return halves8(b[0], b[1], 1);
}

static inline v8 select8(w8 keep, v8 x, v8 otherwise) { return (v8)(((w8)x & keep) | ((w8)otherwise & ~keep)); }

/* `attend_head` where vectors are 8 lanes (AVX2: the 16-lane one kept its sums and its query in
   memory, 2.2-2.9x SDPA's time on SmolLM2's heads at 100-600 positions): keys in blocks of 8,
   the query and the output in 2 C vectors of 8. Each key's score and weight depend on that key
   alone and the row's max, as there. */
static inline void attend_head(const float *qf, const uint16_t *q16, float post, const char *kbase,
                               const char *vbase, const uint8_t *m, float *w, int64_t span, int64_t kp, int64_t vp,
                               int bf16, int64_t C, void *out, int64_t row) {
    enum { L = 8 };
    (void)q16, (void)post; /* the query comes scaled, in fp32 (qf) */
    const int64_t esize = bf16 ? 2 : 4, blocks = (span + L - 1) / L, H = 2 * C;
    const v8 ninf = (v8){0} - INFINITY;
    const w8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    v8 qv[2 * MAX_CHUNKS], acc[2 * MAX_CHUNKS], top = ninf, total = {0};
    for (int64_t c = 0; c < H; c++) memcpy(&qv[c], qf + c * L, sizeof(v8));
    for (int64_t b = 0; b < blocks; b++) {
        v8 part[L];
        const int64_t n = span - b * L < L ? span - b * L : L;
        const char *key = kbase + b * L * kp * esize;
        for (int64_t j = 0; j < n; j++, key += kp * esize) {
            v8 s = qv[0] * widen8(key, bf16, 0);
            for (int64_t c = 1; c < H; c++) s += qv[c] * widen8(key, bf16, c * L);
            part[j] = s;
        }
        for (int64_t j = n; j < L; j++) part[j] = (v8){0};
        w8 live = (w8)(lane < (uint32_t)n);
        if (m)
            for (int64_t j = 0; j < n; j++) live[j] = m[b * L + j] ? live[j] : 0;
        v8 s = select8(live, sums8(part), ninf);
        memcpy(w + b * L, &s, sizeof s);
        top = select8((w8)(s > top), s, top);
    }
    float mx = top[0];
    for (int j = 1; j < L; j++) mx = top[j] > mx ? top[j] : mx;
    for (int64_t b = 0; b < blocks; b++) {
        v8 s;
        memcpy(&s, w + b * L, sizeof s);
        v8 p = select8((w8)(s > ninf), exp8(s - mx), (v8){0});
        memcpy(w + b * L, &p, sizeof p);
        total += p;
    }
    v8 sums[L] = {total};
    const float inv = 1.0f / sums8(sums)[0];
    for (int64_t c = 0; c < H; c++) acc[c] = (v8){0};
    const char *vt = vbase;
    for (int64_t t = 0; t < span; t++, vt += vp * esize) {
        const float p = w[t];
        if (p == 0.f) continue;
        for (int64_t c = 0; c < H; c++) acc[c] += p * widen8(vt, bf16, c * L);
    }
    for (int64_t c = 0; c < C; c++) {
        v16 r;
        memcpy(&r, &acc[2 * c], sizeof r);
        r *= inv;
        if (bf16)
            put_bf16((uint16_t *)out + row * C * PANEL + c * PANEL, r);
        else
            memcpy((float *)out + row * C * PANEL + c * PANEL, &r, sizeof r);
    }
}
#else
/* Two vectors' lanes summed in pairs: u and v each hold 16 / (2 s) sources' partial sums, 2 s
   consecutive lanes per source; the result holds u's sources then v's, s lanes each, lane r of a
   source the sum of its lanes r and r + s. Only a source's own lanes are added together. */
static inline v16 halves(v16 u, v16 v, int s) {
    switch (s) {
    case 8:
        return SHUFFLE(u, v, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUFFLE(u, v, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    case 4:
        return SHUFFLE(u, v, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               SHUFFLE(u, v, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    case 2:
        return SHUFFLE(u, v, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               SHUFFLE(u, v, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    default:
        return SHUFFLE(u, v, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
               SHUFFLE(u, v, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    }
}

/* Lane j: the sum of x[j]'s 16 lanes (a tree: lanes j and j + 8, then + 4, + 2, + 1), for 16
   vectors at once: 15 pairs of shuffles and adds where summing each alone is 15 dependent adds. */
static inline v16 sums16(const v16 *x) {
    v16 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = halves(x[2 * i], x[2 * i + 1], 8);
    for (int i = 0; i < 4; i++) b[i] = halves(a[2 * i], a[2 * i + 1], 4);
    for (int i = 0; i < 2; i++) c[i] = halves(b[2 * i], b[2 * i + 1], 2);
    return halves(c[0], c[1], 1);
}

static inline v16 select16(w16 keep, v16 x, v16 otherwise) {
    return (v16)(((w16)x & keep) | ((w16)otherwise & ~keep));
}

/* Which of a block's 16 keys are attended: the first n (<= 16), less those whose byte of m (the
   block's mask bytes, or NULL: none masked) is zero. */
static inline w16 live16(const uint8_t *m, int64_t n) {
    const w16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    w16 live = (w16)(lane < (uint32_t)n);
    if (m && n == PANEL) {
        typedef uint8_t b16 __attribute__((vector_size(16)));
        b16 bytes;
        memcpy(&bytes, m, PANEL);
        live = (w16)(__builtin_convertvector(bytes, w16) != 0);
    } else if (m) {
        for (int64_t j = 0; j < n; j++) live[j] = m[j] ? live[j] : 0;
    }
    return live;
}

/* One query head qf (fp32, already scaled by 1 / sqrt(hd)) over keys and values 0 .. span - 1
   (m: which to attend, or NULL: all), hd = 16 C; its output into out's row `row`. Keys in blocks
   of 16: each key's 16 lanes of products (C vector FMAs), the block's 16 sums at once (`sums16`),
   masked keys -inf; exp16 of the scores less their max, masked keys 0; the values' sum weighted
   by them, in C vector registers, skipping keys of weight 0; divided by the weights' sum (its
   lanes summed by `sums16` too). Each key's score and weight depend on that key alone and the
   row's max, so a row's result does not depend on how many masked keys follow it. */
static inline void attend_head(const float *qf, const uint16_t *q16, float post, const char *kbase,
                               const char *vbase, const uint8_t *m, float *w, int64_t span, int64_t kp, int64_t vp,
                               int bf16, int64_t C, void *out, int64_t row) {
    const int64_t esize = bf16 ? 2 : 4, blocks = (span + PANEL - 1) / PANEL;
    const v16 ninf = (v16){0} - INFINITY;
    v16 qv[MAX_CHUNKS], acc[MAX_CHUNKS], odd[MAX_CHUNKS], top = ninf, total = {0};
#ifdef DPBF16
    __m512bh qp[MAX_CHUNKS / 2];
    if (q16)
        for (int64_t c = 0; c < C / 2; c++) qp[c] = (__m512bh)_mm512_loadu_si512((const void *)(q16 + c * 2 * PANEL));
    else
#endif
        for (int64_t c = 0; c < C; c++) memcpy(&qv[c], qf + c * PANEL, sizeof(v16));
    for (int64_t b = 0; b < blocks; b++) {
        v16 part[PANEL];
        const int64_t n = span - b * PANEL < PANEL ? span - b * PANEL : PANEL;
        const char *key = kbase + b * PANEL * kp * esize;
#ifdef DPBF16
        if (q16) { /* bf16 query and keys: pairs of products summed by vdpbf16ps, C / 2 a key */
            for (int64_t j = 0; j < n; j++, key += kp * esize) {
                __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), qp[0], (__m512bh)_mm512_loadu_si512((const void *)key));
                for (int64_t c = 1; c < C / 2; c++)
                    s = _mm512_dpbf16_ps(s, qp[c], (__m512bh)_mm512_loadu_si512((const void *)(key + c * 4 * PANEL)));
                part[j] = (v16)s;
            }
        } else
#endif
            for (int64_t j = 0; j < n; j++, key += kp * esize) {
                v16 s = qv[0] * widen(key, bf16, 0);
                for (int64_t c = 1; c < C; c++) s += qv[c] * widen(key, bf16, c * PANEL);
                part[j] = s;
            }
        for (int64_t j = n; j < PANEL; j++) part[j] = (v16){0};
        v16 s = select16(live16(m ? m + b * PANEL : NULL, n), sums16(part) * post, ninf);
        memcpy(w + b * PANEL, &s, sizeof s);
        top = select16((w16)(s > top), s, top);
    }
    float mx = top[0];
    for (int j = 1; j < PANEL; j++) mx = top[j] > mx ? top[j] : mx;
    for (int64_t b = 0; b < blocks; b++) {
        v16 s;
        memcpy(&s, w + b * PANEL, sizeof s);
        v16 p = select16((w16)(s > ninf), exp16(s - mx), (v16){0});
        memcpy(w + b * PANEL, &p, sizeof p);
        total += p;
    }
    v16 sums[PANEL] = {total};
    const float inv = 1.0f / sums16(sums)[0];
    for (int64_t c = 0; c < C; c++) acc[c] = odd[c] = (v16){0};
    /* even keys into acc, odd ones into `odd` (two chains of additions, not one: each a
       fused multiply-add's latency a key), added at the end; masked keys (weight 0) skipped.
       bf16 values (C even) are read 32 at a time and split by a shift and a mask into their even
       and odd elements, acc[2 i] and acc[2 i + 1] holding dims 32 i + 0, 2, .. and 1, 3, ..
       (each dim's sum the same additions in the same order), put back in order at the end. */
    const int pairs = bf16 && C % 2 == 0;
    const char *vt = vbase;
    int64_t t = 0;
    for (; t < span; t += 2, vt += 2 * vp * esize) {
        for (int64_t e = 0; e < 2 && t + e < span; e++) {
            const float p = w[t + e];
            const char *row = vt + e * vp * esize;
            v16 *sum = e ? odd : acc;
            if (p == 0.f) continue;
            if (pairs) {
                for (int64_t c = 0; c < C; c += 2) {
                    w16 u, lo, hi;
                    memcpy(&u, (const uint16_t *)row + c * PANEL, sizeof u);
                    lo = u << 16;
                    hi = u & 0xffff0000u;
                    sum[c] += p * (v16)lo;
                    sum[c + 1] += p * (v16)hi;
                }
            } else {
                for (int64_t c = 0; c < C; c++) sum[c] += p * widen(row, bf16, c * PANEL);
            }
        }
    }
    for (int64_t c = 0; c < C; c++) acc[c] += odd[c];
    if (pairs)
        for (int64_t c = 0; c < C; c += 2) {
            v16 even = acc[c], odds = acc[c + 1];
            acc[c] = SHUFFLE(even, odds, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            acc[c + 1] = SHUFFLE(even, odds, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        }
    for (int64_t c = 0; c < C; c++) {
        v16 r = acc[c] * inv;
        if (bf16)
            put_bf16((uint16_t *)out + row * C * PANEL + c * PANEL, r);
        else
            memcpy((float *)out + row * C * PANEL + c * PANEL, &r, sizeof r);
    }
}

#endif

#if defined(DPBF16)
/* Rows of one query head at consecutive positions (a prompt's or a verify pass's), `attend_head`
   for each of them with each value's loads and its split into even and odd elements shared by the
   rows that read it: nr <= ROW_BLOCK rows, row i's bf16 query q16[i] (C
   even), mask m[i] (or NULL), span[i] keys, scores w[i] and output row rows[i]. Each row's
   operations are attend_head's, in its order (a value past a row's span is not read for it), so
   every row's result is the one attend_head gives it alone, bit for bit. CPU reference model's
   heads (6 of 64, bf16, 2 threads, AMD EPYC), `native.attend` against one row a task, medians of
   300 alternating pairs (`benchmarks/native_ab.py --attention`): a 239-token prompt 0.915-0.917x
   the time, a verify pass's 6 rows over 266 keys 0.933x, 3 rows 0.966x (a scratch timing of the
   same pairing: 0.83 / 0.88 / 0.95x); SmolLM2's heads (3 groups of 3) 0.910x / 0.946x; the
   prompts' whole prefill 0.976x (`benchmarks/native_ab.py`, 240 pairs).
   Two rows, not more: with three, the sums (24 vectors) and the shared values left too few
   registers, and sharing the keys too (each row's 16 scores of a block kept at once) spilled them:
   1.02-1.14x the time. */
#define ROW_BLOCK 2
static inline __attribute__((always_inline)) void attend_rows(int nr, const uint16_t *const *q16, float post,
                                                              const char *kbase, const char *vbase,
                                                              const uint8_t *const *m, float *const *w,
                                                              const int64_t *span, int64_t kp, int64_t vp,
                                                              const int64_t C, void *out, const int64_t *rows) {
    const int64_t esize = 2;
    const v16 ninf = (v16){0} - INFINITY;
    __m512bh qp[ROW_BLOCK][MAX_CHUNKS / 2];
    v16 top[ROW_BLOCK], total[ROW_BLOCK];
    int64_t most = 0;
    for (int i = 0; i < nr; i++) {
        for (int64_t c = 0; c < C / 2; c++)
            qp[i][c] = (__m512bh)_mm512_loadu_si512((const void *)(q16[i] + c * 2 * PANEL));
        top[i] = ninf;
        total[i] = (v16){0};
        most = span[i] > most ? span[i] : most;
    }
    for (int i = 0; i < nr; i++) { /* each row's scores as attend_head makes them (a block's 16 sums in registers) */
        const char *key = kbase;
        for (int64_t b = 0; b * PANEL < span[i]; b++) {
            v16 part[PANEL];
            const int64_t n = span[i] - b * PANEL < PANEL ? span[i] - b * PANEL : PANEL;
            for (int64_t j = 0; j < n; j++, key += kp * esize) {
                __m512 sc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qp[i][0],
                                             (__m512bh)_mm512_loadu_si512((const void *)key));
                for (int64_t c = 1; c < C / 2; c++)
                    sc = _mm512_dpbf16_ps(sc, qp[i][c],
                                          (__m512bh)_mm512_loadu_si512((const void *)(key + c * 4 * PANEL)));
                part[j] = (v16)sc;
            }
            for (int64_t j = n; j < PANEL; j++) part[j] = (v16){0};
            v16 sc = select16(live16(m[i] ? m[i] + b * PANEL : NULL, n), sums16(part) * post, ninf);
            memcpy(w[i] + b * PANEL, &sc, sizeof sc);
            top[i] = select16((w16)(sc > top[i]), sc, top[i]);
        }
    }
    float inv[ROW_BLOCK];
    for (int i = 0; i < nr; i++) {
        float mx = top[i][0];
        for (int j = 1; j < PANEL; j++) mx = top[i][j] > mx ? top[i][j] : mx;
        const int64_t blocks = (span[i] + PANEL - 1) / PANEL;
        for (int64_t b = 0; b < blocks; b++) {
            v16 sc;
            memcpy(&sc, w[i] + b * PANEL, sizeof sc);
            v16 pr = select16((w16)(sc > ninf), exp16(sc - mx), (v16){0});
            memcpy(w[i] + b * PANEL, &pr, sizeof pr);
            total[i] += pr;
        }
        v16 sums[PANEL] = {total[i]};
        inv[i] = 1.0f / sums16(sums)[0];
    }
    v16 acc[ROW_BLOCK][MAX_CHUNKS], odd[ROW_BLOCK][MAX_CHUNKS];
    for (int i = 0; i < nr; i++)
        for (int64_t c = 0; c < C; c++) acc[i][c] = odd[i][c] = (v16){0};
    const char *vt = vbase;
    for (int64_t t = 0; t < most; t += 2, vt += 2 * vp * esize) {
        for (int64_t e = 0; e < 2 && t + e < most; e++) {
            const char *row = vt + e * vp * esize;
            v16 lo[MAX_CHUNKS / 2], hi[MAX_CHUNKS / 2];
            for (int64_t c = 0; c < C; c += 2) {
                w16 u;
                memcpy(&u, (const uint16_t *)row + c * PANEL, sizeof u);
                lo[c / 2] = (v16)(u << 16);
                hi[c / 2] = (v16)(u & 0xffff0000u);
            }
            for (int i = 0; i < nr; i++) {
                if (t + e >= span[i]) continue;
                const float p = w[i][t + e];
                if (p == 0.f) continue;
                v16 *sum = e ? odd[i] : acc[i];
                for (int64_t c = 0; c < C; c += 2) {
                    sum[c] += p * lo[c / 2];
                    sum[c + 1] += p * hi[c / 2];
                }
            }
        }
    }
    for (int i = 0; i < nr; i++) {
        for (int64_t c = 0; c < C; c++) acc[i][c] += odd[i][c];
        for (int64_t c = 0; c < C; c += 2) {
            v16 even = acc[i][c], odds = acc[i][c + 1];
            acc[i][c] = SHUFFLE(even, odds, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            acc[i][c + 1] = SHUFFLE(even, odds, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        }
        for (int64_t c = 0; c < C; c++) put_bf16((uint16_t *)out + rows[i] * C * PANEL + c * PANEL, acc[i][c] * inv[i]);
    }
}
#endif

/* The same for any hd (one key at a time, scalar softmax): where hd is not a multiple of 16 or
   above 16 MAX_CHUNKS. */
static void attend_head_any(const float *qf, const char *kbase, const char *vbase, const uint8_t *m, float *scores,
                            float *acc, int64_t span, int64_t kp, int64_t vp, int bf16, int64_t hd, void *out,
                            int64_t row) {
    const int64_t esize = bf16 ? 2 : 4;
    float top = -INFINITY;
    for (int64_t t = 0; t < span; t++) {
        scores[t] = m && !m[t] ? -INFINITY : dot(qf, kbase + t * kp * esize, bf16, hd);
        if (scores[t] > top) top = scores[t];
    }
    float total = 0.f;
    for (int64_t d = 0; d < hd; d++) acc[d] = 0.f;
    for (int64_t t = 0; t < span; t++) {
        if (scores[t] == -INFINITY) continue;
        float p = expf(scores[t] - top);
        total += p;
        const char *vt = vbase + t * vp * esize;
        for (int64_t d = 0; d < hd; d++) acc[d] += p * load(vt, bf16, d);
    }
    for (int64_t d = 0; d < hd; d++) {
        float r = acc[d] / total;
        if (bf16)
            ((uint16_t *)out)[row * hd + d] = f32_to_bf16(r);
        else
            ((float *)out)[row * hd + d] = r;
    }
}

/* How many keys row ar attends: up to its mask's last attended key (a causal row stops there), else
   up to its own position where the rows' positions are known, else all span. */
static inline int64_t row_keys(const uint8_t *m, const int64_t *pos, int64_t ar, int64_t span) {
    int64_t keys = span;
    if (m) { /* back over masked keys, 8 at a time where all 8 are (a causal prompt's rows: half the span) */
        uint64_t eight;
        while (keys > 8 && (memcpy(&eight, m + keys - 8, 8), eight == 0)) keys -= 8;
        while (keys > 1 && !m[keys - 1]) keys--;
    } else if (pos && pos[ar] < span)
        keys = pos[ar] + 1;
    return keys;
}

#if defined(DPBF16)
/* A prompt's rows of bf16 heads of 64 (from PROMPT_ROWS rows a sequence: a verify pass's rows,
   fewer, attend as the decode steps do, bit for bit, `attend_rows`): both products by vdpbf16ps
   on operands laid out for them once per group (`prompt_keys`, `prompt_values`), PROMPT_BLOCK rows
   of one head a task. A block of 16 keys' scores is 32 pair products of the query's pairs against
   the keys' pairs, 16 keys a vector, with no sum across lanes; the softmax's weights are rounded to
   bf16 (as SDPA's flash kernel rounds them for its second product) and a pair of keys' weighted
   values is one vdpbf16ps a 16-dim chunk. The numbers are the decode steps' within round-off (a
   weight's rounding, 2^-9 of it; the sums in another order), SDPA's nearly bit for bit. The CPU
   reference model's heads (6 of 64, bf16, AMD EPYC; `benchmarks/native_ab.py --attention
   --different-tokens`, 200 alternating pairs): 64 / 161 / 300 causal rows 0.67 / 0.60 / 0.55x the
   time of the rows two at a time (`attend_rows`; with `row_keys` skipping 8 masked keys at a time,
   which alone took ~10% of a prompt's call); its bf16 prefill 0.959x (80 prompt pairs), 14 of 40
   prompts' greedy tokens parting from the previous build's at near-ties. */
#define PROMPT_ROWS 64
#define PROMPT_BLOCK 4

/* Keys 0 .. span - 1 of one group (hd 64) as vdpbf16ps's operand: block b of 16 keys, pair c
   (dims 2c, 2c + 1): lane j key 16b + j's pair c; keys past span zero. kt: blocks x 32 x 16. */
static void prompt_keys(const char *kbase, int64_t kp, int64_t span, uint32_t *kt) {
    const int64_t blocks = (span + PANEL - 1) / PANEL;
    const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)kp)); /* key j's first pair, in elements */
    for (int64_t b = 0; b < blocks; b++) { /* a pair of 16 keys a gather (keys past span zero) */
        const int64_t n = span - b * PANEL < PANEL ? span - b * PANEL : PANEL;
        const __mmask16 live = (__mmask16)((1u << n) - 1u);
        const char *first = kbase + b * PANEL * kp * 2;
        for (int64_t c = 0; c < 32; c++)
            _mm512_storeu_si512((void *)(kt + (b * 32 + c) * PANEL),
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at, first + 4 * c, 2));
    }
}

/* Values 0 .. span - 1 of one group (hd 64) in pairs of keys: pair t, chunk c (dims 16c .. 16c +
   15), lane l = (V[2t][16c + l], V[2t + 1][16c + l]); a key past span zero. vt: pairs x 4. */
static void prompt_values(const char *vbase, int64_t vp, int64_t span, __m512i *vt) {
    const __m512i order = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                           37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0); /* V[2t][l], V[2t + 1][l] */
    for (int64_t t = 0; t < (span + 1) / 2; t++)
        for (int64_t c = 0; c < 4; c++) {
            __m256i lo = _mm256_loadu_si256((const __m256i *)(vbase + ((2 * t) * vp + 16 * c) * 2));
            __m256i hi = 2 * t + 1 < span ? _mm256_loadu_si256((const __m256i *)(vbase + ((2 * t + 1) * vp + 16 * c) * 2))
                                          : _mm256_setzero_si256();
            vt[t * 4 + c] = _mm512_permutex2var_epi16(_mm512_castsi256_si512(lo), order, _mm512_castsi256_si512(hi));
        }
}

/* nr <= PROMPT_BLOCK rows of one query head (hd 64): row i's bf16 query q16[i], mask m[i] (or
   NULL), keys[i] keys, its scores' scratch w[i] and weights' pb[i], its output row rows[i]. */
static inline __attribute__((always_inline)) void prompt_rows(const int nr, const uint16_t *const *q16, float scale, const uint32_t *kt, const __m512i *vt,
                        const uint8_t *const *m, float *const *w, uint32_t *const *pb, const int64_t *keys,
                        void *out, const int64_t *rows) {
    const v16 ninf = (v16){0} - INFINITY;
    int64_t most = 0;
    v16 top[PROMPT_BLOCK];
    for (int i = 0; i < nr; i++) {
        most = keys[i] > most ? keys[i] : most;
        top[i] = ninf;
    }
    const int64_t blocks = (most + PANEL - 1) / PANEL;
    for (int64_t b = 0; b < blocks; b += 2) { /* two blocks of keys a pass: 2 nr independent sums */
        const int two = b + 1 < blocks;
        __m512 acc[PROMPT_BLOCK][2];
        for (int i = 0; i < nr; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        for (int64_t c = 0; c < 32; c++) {
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512((const void *)(kt + (b * 32 + c) * PANEL));
            const __m512bh k1 = two ? (__m512bh)_mm512_loadu_si512((const void *)(kt + ((b + 1) * 32 + c) * PANEL)) : k0;
            for (int i = 0; i < nr; i++) {
                uint32_t qc;
                memcpy(&qc, q16[i] + 2 * c, sizeof qc);
                const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qc);
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], qb, k0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], qb, k1);
            }
        }
        for (int i = 0; i < nr; i++)
            for (int h = 0; h <= two; h++) {
                const int64_t at = (b + h) * PANEL;
                const int64_t n = keys[i] > at ? (keys[i] - at < PANEL ? keys[i] - at : PANEL) : 0;
                v16 sc = select16(live16(m[i] ? m[i] + at : NULL, n), (v16)acc[i][h] * scale, ninf);
                memcpy(w[i] + at, &sc, sizeof sc);
                top[i] = select16((w16)(sc > top[i]), sc, top[i]);
            }
    }
    float inv[PROMPT_BLOCK];
    for (int i = 0; i < nr; i++) { /* the weights: exp, summed in fp32, rounded to bf16 pairs */
        float mx = top[i][0];
        for (int j = 1; j < PANEL; j++) mx = top[i][j] > mx ? top[i][j] : mx;
        v16 total = {0};
        for (int64_t b = 0; b < blocks; b += 2) {
            v16 pr[2];
            for (int h = 0; h < 2; h++) {
                v16 sc;
                if (b + h < blocks) memcpy(&sc, w[i] + (b + h) * PANEL, sizeof sc);
                pr[h] = b + h < blocks ? select16((w16)(sc > ninf), exp16(sc - mx), (v16){0}) : (v16){0};
                total += pr[h];
            }
            __m512bh both = _mm512_cvtne2ps_pbh((__m512)pr[1], (__m512)pr[0]); /* keys 32b/2 .. in order */
            memcpy(pb[i] + b / 2 * PANEL, &both, sizeof both);
        }
        v16 sums[PANEL] = {total};
        inv[i] = 1.0f / sums16(sums)[0];
    }
    const int64_t pairs = (most + 1) / 2;
    __m512 acc[PROMPT_BLOCK][4];
    for (int i = 0; i < nr; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < pairs; t++) {
        const __m512bh v0 = (__m512bh)vt[t * 4], v1 = (__m512bh)vt[t * 4 + 1], v2 = (__m512bh)vt[t * 4 + 2],
                       v3 = (__m512bh)vt[t * 4 + 3];
        for (int i = 0; i < nr; i++) {
            const __m512bh pw = (__m512bh)_mm512_set1_epi32((int)pb[i][t]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], pw, v0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], pw, v1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], pw, v2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], pw, v3);
        }
    }
    for (int i = 0; i < nr; i++)
        for (int c = 0; c < 4; c++) put_bf16((uint16_t *)out + rows[i] * 64 + c * PANEL, (v16)acc[i][c] * inv[i]);
}

/* `attend` for R >= PROMPT_ROWS rows a sequence of bf16 heads of 64 (`prompt_rows`), PROMPT_BLOCK
   rows of one query head a task; each thread lays out a group's keys and values (`prompt_keys`,
   `prompt_values`) in its own scratch when its tasks reach that group (tasks in the order
   sequence, group, head, rows: once a group a thread, twice where the threads' shares split one). */
static int attend_prompt(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int64_t A,
                         int64_t R, int64_t G, int64_t per, int64_t span, int64_t kb, int64_t kg, int64_t kp,
                         int64_t vb, int64_t vg, int64_t vp, int threads, const int64_t *slots, const int64_t *pos) {
    const int64_t blocks = (span + PANEL - 1) / PANEL, room = (blocks + 1) / 2 * 2 * PANEL, tp = (span + 1) / 2;
    const int64_t kt_size = blocks * 32 * PANEL, vt_size = tp * 4; /* uint32s, vectors */
    const int64_t nb = (R + PROMPT_BLOCK - 1) / PROMPT_BLOCK;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* the scores and weights of PROMPT_BLOCK rows, a group's keys and values laid out */
        const size_t head = (sizeof(float) * (size_t)(PROMPT_BLOCK * (room + room / 2) + kt_size) + 63) / 64 * 64;
        char *buf = (char *)aligned_alloc(64, head + 64 * (size_t)vt_size);
        failed |= !buf;
        float *scores = (float *)buf;
        uint32_t *weights = (uint32_t *)(scores + PROMPT_BLOCK * room), *kt = weights + PROMPT_BLOCK * (room / 2);
        __m512i *vt = (__m512i *)(buf + head); /* after the scores, weights and keys, 64-byte aligned */
        int64_t laid = -1; /* the group laid out in kt and vt */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < A * G * per * nb; task++) {
            if (!buf) continue;
            const int64_t blk = task % nb, head = task / nb, p = head % per, ag = head / per, a = ag / G, g = ag % G;
            if (ag != laid) {
                const int64_t slot = slots ? slots[a] : a;
                prompt_keys((const char *)k + (slot * kb + g * kg) * 2, kp, span, kt);
                prompt_values((const char *)v + (slot * vb + g * vg) * 2, vp, span, vt);
                laid = ag;
            }
            const int nr = (int)(R - blk * PROMPT_BLOCK < PROMPT_BLOCK ? R - blk * PROMPT_BLOCK : PROMPT_BLOCK);
            const uint16_t *q16[PROMPT_BLOCK];
            const uint8_t *m[PROMPT_BLOCK];
            float *w[PROMPT_BLOCK];
            uint32_t *pb[PROMPT_BLOCK];
            int64_t keys[PROMPT_BLOCK], rows[PROMPT_BLOCK];
            for (int i = 0; i < nr; i++) {
                const int64_t ar = a * R + blk * PROMPT_BLOCK + i; /* the query's row */
                rows[i] = (ar * G + g) * per + p;                  /* q's and out's */
                q16[i] = (const uint16_t *)q + rows[i] * 64;
                m[i] = mask ? mask + ar * span : NULL;
                keys[i] = row_keys(m[i], pos, ar, span);
                w[i] = scores + i * room;
                pb[i] = weights + i * (room / 2);
            }
            const float scale = 1.0f / sqrtf(64.0f);
            if (nr == PROMPT_BLOCK) /* the row count a constant: the sums kept in registers */
                prompt_rows(PROMPT_BLOCK, q16, scale, kt, vt, m, w, pb, keys, out, rows);
            else
                prompt_rows(nr, q16, scale, kt, vt, m, w, pb, keys, out, rows);
        }
        free(buf);
    }
    return failed;
}
#endif

/* ee_attend, sequence a's keys and values at slot slots[a] of k and v (NULL: slot a); without a mask,
   row a * R + r attends keys 0 .. pos[a * R + r] where pos is given (ee_layer's rows), else all. */

static int attend(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int64_t A, int64_t R,
                  int64_t G, int64_t per, int64_t span, int64_t hd, int64_t kb, int64_t kg, int64_t kp, int64_t vb,
                  int64_t vg, int64_t vp, int bf16, int threads, const int64_t *slots, const int64_t *pos) {
    const int64_t esize = bf16 ? 2 : 4, C = hd % PANEL == 0 && hd <= MAX_CHUNKS * PANEL ? hd / PANEL : 0;
    const int64_t room = (span + PANEL - 1) / PANEL * PANEL; /* the scores' blocks of 16 */
    const float scale = 1.0f / sqrtf((float)hd);
    int failed = 0;
#if defined(DPBF16) && !defined(HALVES)
    if (bf16 && C == 4 && R >= PROMPT_ROWS) /* a prompt's rows (`attend_prompt`) */
        return attend_prompt(q, k, v, mask, out, A, R, G, per, span, kb, kg, kp, vb, vg, vp, threads, slots, pos);
    /* bf16 heads of 64 at several positions a sequence: ROW_BLOCK positions of a head a task, their
       loads shared (`attend_rows`) */
    const int64_t rb = bf16 && C == 4 && R > 1 ? ROW_BLOCK : 1;
#else
    const int64_t rb = 1;
#endif
    const int64_t nb = (R + rb - 1) / rb; /* blocks of positions a sequence */
    /* one query head at one position (or one block of positions) a task: a group's heads read its
       keys alike, and SmolLM2's 3 groups a row split 2 : 1 between two threads where its 9 heads
       split 5 : 4; a head's R positions one after another (tasks in the order sequence, group,
       head, position), so that its keys and values, read by the first, are in the core's caches for
       the others: a verify pass's rows on the CPU reference model (6 heads of 64, bf16, 400 keys, 8
       rows, 2 threads) had each thread read every head's keys once a row. Each thread's scratch
       made once. */
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(rb * room + 2 * hd));
        failed |= !buf;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < A * nb * G * per; task++) {
            if (!buf) continue;
            const int64_t blk = task % nb, head = task / nb, p = head % per, ag = head / per, a = ag / G, g = ag % G;
            const int64_t slot = slots ? slots[a] : a;
            const char *kbase = (const char *)k + (slot * kb + g * kg) * esize;
            const char *vbase = (const char *)v + (slot * vb + g * vg) * esize;
#if defined(DPBF16) && !defined(HALVES)
            if (rb > 1) {
                const int nr = (int)(R - blk * rb < rb ? R - blk * rb : rb);
                const uint16_t *q16[ROW_BLOCK];
                const uint8_t *m[ROW_BLOCK];
                float *w[ROW_BLOCK];
                int64_t keys[ROW_BLOCK], rows[ROW_BLOCK];
                for (int i = 0; i < nr; i++) {
                    const int64_t ar = a * R + blk * rb + i; /* the query's row */
                    rows[i] = (ar * G + g) * per + p;      /* q's and out's */
                    q16[i] = (const uint16_t *)q + rows[i] * hd;
                    m[i] = mask ? mask + ar * span : NULL;
                    keys[i] = row_keys(m[i], pos, ar, span);
                    w[i] = buf + i * room;
                }
                attend_rows(nr, q16, scale, kbase, vbase, m, w, keys, kp, vp, 4, out, rows);
                continue;
            }
#endif
            const int64_t ar = a * R + blk, row = (ar * G + g) * per + p; /* ar: the query's row; row: q's and out's */
            float *scores = buf, *qf = buf + room, *acc = buf + room + hd;
            const uint8_t *m = mask ? mask + ar * span : NULL;
            const int64_t keys = row_keys(m, pos, ar, span);
            for (int64_t d = 0; d < hd; d++) qf[d] = load(q, bf16, row * hd + d) * scale;
#if defined(DPBF16) && !defined(HALVES)
            /* bf16 scores by pairs (vdpbf16ps) on the unscaled query, scaled after the sums */
            const uint16_t *q16 = bf16 && C % 2 == 0 ? (const uint16_t *)q + row * hd : NULL;
#else
            const uint16_t *q16 = NULL;
#endif
            const float post = q16 ? scale : 1.0f;
            switch (C) { /* the common head sizes with their chunk count a constant */
            case 4: attend_head(qf, q16, post, kbase, vbase, m, scores, keys, kp, vp, bf16, 4, out, row); break;
            case 8: attend_head(qf, q16, post, kbase, vbase, m, scores, keys, kp, vp, bf16, 8, out, row); break;
            case 0: attend_head_any(qf, kbase, vbase, m, scores, acc, keys, kp, vp, bf16, hd, out, row); break;
            default: attend_head(qf, q16, post, kbase, vbase, m, scores, keys, kp, vp, bf16, C, out, row); break;
            }
        }
        free(buf);
    }
    return failed;
}

/* `ee_rope`'s row i (nothing where hd > 1024). */
static void rope_row(void *y, int64_t i, int64_t G, int64_t per2, int64_t heads, int64_t hd, const float *cos,
                     const float *sin_signed, int64_t cos_stride, int bf16) {
    float tmp[1024]; /* a head's elements where its halves are not whole vectors */
    if (hd > 1024) return;
    const int64_t half = hd / 2, esize = bf16 ? 2 : 4;
    const float *c = cos + i * cos_stride, *s = sin_signed + i * cos_stride;
    for (int64_t g = 0; g < G; g++)
        for (int64_t h = 0; h < heads; h++) {
            int64_t base = ((i * G + g) * per2 + h) * hd;
            if (half % PANEL == 0) { /* 16 lanes of each half at a time: the same sums, element by element */
                char *at = (char *)y + base * esize;
                for (int64_t d = 0; d < half; d += PANEL) {
                    v16 lo = widen(at, bf16, d), hi = widen(at, bf16, d + half), clo, chi, slo, shi;
                    memcpy(&clo, c + d, sizeof clo);
                    memcpy(&chi, c + d + half, sizeof chi);
                    memcpy(&slo, s + d, sizeof slo);
                    memcpy(&shi, s + d + half, sizeof shi);
                    v16 rlo = lo * clo + hi * slo, rhi = hi * chi + lo * shi;
                    if (bf16) {
                        put_bf16((uint16_t *)at + d, rlo);
                        put_bf16((uint16_t *)at + d + half, rhi);
                    } else {
                        memcpy((float *)at + d, &rlo, sizeof rlo);
                        memcpy((float *)at + d + half, &rhi, sizeof rhi);
                    }
                }
                continue;
            }
            for (int64_t d = 0; d < hd; d++) tmp[d] = load(y, bf16, base + d);
            for (int64_t d = 0; d < hd; d++) {
                float r = tmp[d] * c[d] + tmp[(d + hd / 2) % hd] * s[d];
                if (bf16)
                    ((uint16_t *)y)[base + d] = f32_to_bf16(r);
                else
                    ((float *)y)[base + d] = r;
            }
        }
}

/* Rotary positions in place on the QKV product's rows: y (n, G, per + 2, hd) contiguous, the
 * first `heads` heads of each group (its query heads and its key) rotated as `lean.rotated_qkv`
 * does: y * cos + roll(y, hd / 2) * sin_signed, in fp32 (bf16 widened, rounded once); cos and
 * sin_signed (fp32) hold one row of hd per row of y (cos_stride hd) or one for all (0). */
void ee_rope(void *y, int64_t n, int64_t G, int64_t per2, int64_t heads, int64_t hd, const float *cos,
             const float *sin_signed, int64_t cos_stride, int bf16) {
    for (int64_t i = 0; i < n; i++) rope_row(y, i, G, per2, heads, hd, cos, sin_signed, cos_stride, bf16);
}

/* An MLP probe's hidden sums v[j] = b1[j] + s . w1[:, j] for the 16-column blocks [b0, b1e) of
 * w1 packed block by block (`native.Probe`: block b holds w1[k, 16 b .. 16 b + 15] for k = 0 .. K - 1,
 * K x 16 contiguous, fp32 or bf16 (wbf16), the last block's missing columns zeros, as are b1's and
 * w2's past H): a thread's share of the weight is one stretch of memory (the rows' strided halves
 * of a row-major weight were each of 2 threads' prefetchers' guess, the weight read cold right
 * after a layer). bf16 in pairs of k (k even, k + 1 < K): lane j's 32 bits hold w1[k, j] in the low
 * half and w1[k + 1, j] in the high one (`probe_pair`), so one 64-byte load widens into both by a
 * shift and a mask (widening 16 stored in place took an extension and a shift each: the sums ran
 * 2.8x slower than fp32's, 3.1 against 1.1 us for 384 x 128 on one thread, with the weight in the
 * cache); an odd K's last k in place. Each block's sum runs as four chains side by side, one per
 * quarter of k (pairs: q = 2 floor(K / 8) k's a quarter, the pairs past 4 q in the first; fp32: q =
 * floor(K / 4), the k past 4 q in the first), added as (first + second) + (third + fourth) at the
 * end, and up to 4 blocks at a time: 16 independent chains, and each thread reading its share of the
 * weight as 16 streams at once. The weight is cold here in a decode step (the layer's own sweep
 * evicted it), and more streams keep more of its lines in flight: a check that does not fire in the
 * CPU reference model's decode step (`cost_model.check_in_step`, 16 x 3,000 rounds in alternating
 * blocks, AMD EPYC) cost bf16 4.76 us with one chain a block (k in order), 4.28 with two halves
 * and 4.13 with four quarters; fp32 7.79 -> 6.77 us. One chain of 16 columns at a time waited on each
 * sum's latency (~4x slower). Each v[j]'s arithmetic is the same whatever range or group it falls in
 * (the threads' split never moves it). */
#define PROBE_GROUP 4
static inline void probe_pair(const void *w1, int64_t i, v16 *lo, v16 *hi) {
    w16 u;
    memcpy(&u, (const uint16_t *)w1 + i, sizeof u);
    w16 l = u << 16, h = u & 0xffff0000u;
    memcpy(lo, &l, sizeof *lo);
    memcpy(hi, &h, sizeof *hi);
}

/* What one step of k adds to a block's chain acc: bf16, the pair k, k + 1 (`probe_pair`); fp32, k
   alone; the block's rows at element i of w1. */
static inline __attribute__((always_inline)) void probe_step(v16 *acc, const float *s, const void *w1, int wbf16,
                                                             int64_t k, int64_t i) {
    if (wbf16) {
        v16 lo, hi;
        probe_pair(w1, i, &lo, &hi);
        *acc += s[k] * lo;
        *acc += s[k + 1] * hi;
    } else {
        *acc += s[k] * widen(w1, 0, i);
    }
}

/* Blocks b .. b + G - 1 side by side (G a constant where it is inlined: the sums stay in registers). */
static inline __attribute__((always_inline)) void probe_group(const float *s, const void *w1, int wbf16,
                                                              const float *b1, int64_t K, int64_t b, int G,
                                                              float *v) {
    const int64_t step = wbf16 ? 2 : 1, ks = wbf16 ? K & ~(int64_t)1 : K; /* k below ks: `step` at a time */
    const int64_t q = ks / (4 * step) * step; /* k in [j q, (j + 1) q) into acc[.][j], the four side by side */
    v16 acc[PROBE_GROUP][4];
    for (int g = 0; g < G; g++) {
        memcpy(&acc[g][0], b1 + (b + g) * PANEL, sizeof(v16));
        acc[g][1] = acc[g][2] = acc[g][3] = (v16){0};
    }
    for (int64_t k = 0; k < q; k += step)
        for (int g = 0; g < G; g++)
            for (int j = 0; j < 4; j++)
                probe_step(&acc[g][j], s, w1, wbf16, k + j * q, ((b + g) * K + k + j * q) * PANEL);
    for (int64_t k = 4 * q; k < ks; k += step) /* the steps past the quarters, then an odd K's last k (bf16) */
        for (int g = 0; g < G; g++) probe_step(&acc[g][0], s, w1, wbf16, k, ((b + g) * K + k) * PANEL);
    for (int64_t k = ks; k < K; k++)
        for (int g = 0; g < G; g++) acc[g][0] += s[k] * widen(w1, wbf16, ((b + g) * K + k) * PANEL);
    for (int g = 0; g < G; g++) {
        v16 sum = (acc[g][0] + acc[g][1]) + (acc[g][2] + acc[g][3]);
        memcpy(v + (b + g) * PANEL, &sum, sizeof sum);
    }
}

/* Groups of 4 blocks, then one of 2 and 1 as they remain (a group's 16 chains held in registers
   beside its loads: 8 blocks' 32 would not fit in AVX-512's 32); a thread's share of 4 blocks
   summed one block at a time would wait on 4 blocks' chains in turn (2 threads on 8 blocks, k in
   order: 2.4 against 0.6 us). */
static inline __attribute__((always_inline)) void probe_hidden(const float *s, const void *w1, int wbf16,
                                                               const float *b1, int64_t K, int64_t b0, int64_t b1e,
                                                               float *v) {
    int64_t b = b0;
    for (; b + 4 <= b1e; b += 4) probe_group(s, w1, wbf16, b1, K, b, 4, v);
    if (b + 2 <= b1e) probe_group(s, w1, wbf16, b1, K, b, 2, v), b += 2;
    if (b < b1e) probe_group(s, w1, wbf16, b1, K, b, 1, v);
}

/* probe_hidden compiled once per weight format (the format's test out of the inner loop). */
static void probe_hidden_of(const float *s, const void *w1, int wbf16, const float *b1, int64_t K, int64_t b0,
                            int64_t b1e, float *v) {
    if (wbf16)
        probe_hidden(s, w1, 1, b1, K, b0, b1e, v);
    else
        probe_hidden(s, w1, 0, b1, K, b0, b1e, v);
}

/* 1 + erf(x) for 16 lanes, as erfc(-x): Abramowitz and Stegun 7.1.26 (absolute error <= 1.5e-7,
 * fp32 round-off beside the 1 it is added to) on |x|, t = 1 / (1 + p|x|), exp16 for exp(-x^2). */
static inline v16 one_plus_erf16(v16 x) {
    const v16 zero = {0};
    w16 neg = (w16)(x < zero), bits, tb, ob;
    memcpy(&bits, &x, sizeof bits);
    bits &= 0x7fffffffu; /* |x| */
    v16 ax;
    memcpy(&ax, &bits, sizeof ax);
    v16 t = 1.0f / (1.0f + 0.3275911f * ax);
    v16 poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    v16 tail = poly * exp16(-(ax * ax)); /* erfc(|x|) */
    v16 other = 2.0f - tail, r;
    memcpy(&tb, &tail, sizeof tb);
    memcpy(&ob, &other, sizeof ob);
    tb = (tb & neg) | (ob & ~neg);
    memcpy(&r, &tb, sizeof r);
    return r;
}

/* The probe's output: sum_j gelu(v[j]) * w2[j] over `blocks` blocks of 16 columns (the padding's
 * v and w2 are zeros: gelu(0) * 0 adds nothing), gelu the erf form. */
static float probe_out(const float *v, const float *w2, int64_t blocks) {
    v16 acc = {0};
    for (int64_t j = 0; j < blocks * PANEL; j += PANEL) {
        v16 a, w;
        memcpy(&a, v + j, sizeof a);
        memcpy(&w, w2 + j, sizeof w);
        acc += 0.5f * a * one_plus_erf16(a * 0.70710678118654752f) * w;
    }
    float score = 0.f;
    for (int i = 0; i < PANEL; i++) score += acc[i];
    return score;
}

/* A learned exit check's scores from the backbone's rows (`fused_check.FoldedProbe`, an RMSNorm
 * probe): per row of x (n x K, fp32 or bf16), s = x * rsqrt(mean(x^2) + eps) (the norm before its
 * gain), times the gain where p->gain is given (else it is folded into the weights), then
 *   H == 0 (linear probe)  score = s . w1            (w1: K, fp32)
 *   H  > 0 (MLP probe)     score = gelu(b1 + s @ w1) . w2   (w1: K x H packed in blocks of 16
 *                          columns, fp32 or bf16, see probe_hidden; b1 and w2: H padded with zeros to
 *                          whole blocks; gelu the exact (erf) form, as torch's)
 * into out (n, fp32); the probe's last bias is left out (the caller's bound holds it). fp32 sums.
 * An MLP probe's hidden sums are split over up to `threads` in blocks of 16 columns, one thread
 * per PROBE_SHARE bytes of its first weight begun: it is read cold (a layer streamed its own
 * before), and two threads read 384 x 128 in fp32 (192 KB) in less time than one, while at 96 KB
 * (bf16) the parallel region costs more than the second thread's share saves (one call, the caches
 * evicted before it, median of 400, Intel Xeon: fp32 4.9-5.0 us on two threads against 6.3-6.6 on
 * one, bf16 3.9-4.1 against 3.6-3.7). The same numbers whatever the thread count. A linear probe
 * runs in the calling thread. Where the probe follows a layer (`ee_layer`) it runs in the layer's
 * last parallel region instead (`linear`), on every thread. 0 on success, 1 when memory runs out. */
#define PROBE_SHARE (128 * 1024)
/* A probe's row: s = xi * rsqrt(mean(xi^2) + eps), times gain where given (K wide). */
static void probe_scaled(const char *xi, int bf16, int64_t K, const float *gain, float eps, float *s) {
    int64_t k = 0;
    v16 acc = {0};
    for (; k + PANEL <= K; k += PANEL) {
        v16 e = widen(xi, bf16, k);
        acc += e * e;
        memcpy(s + k, &e, sizeof e);
    }
    float ss = 0.f;
    for (int j = 0; j < PANEL; j++) ss += acc[j];
    for (; k < K; k++) {
        s[k] = load(xi, bf16, k);
        ss += s[k] * s[k];
    }
    const float scale = 1.0f / sqrtf(ss / (float)K + eps);
    if (gain)
        for (k = 0; k < K; k++) s[k] = s[k] * scale * gain[k];
    else
        for (k = 0; k < K; k++) s[k] *= scale;
}

static void probe_share(const void *y, int bf16, int64_t n, int64_t K, const ee_probe_t *p, float *s, float *v,
                        int64_t t, int64_t T) {
    const int64_t blocks = (p->hidden + PANEL - 1) / PANEL;
    for (int64_t i = 0; i < n; i++) {
        probe_scaled((const char *)y + i * K * (bf16 ? 2 : 4), bf16, K, p->gain, p->eps, s);
        probe_hidden_of(s, p->w1, p->w1_bf16, p->b1, K, blocks * t / T, blocks * (t + 1) / T, v + i * blocks * PANEL);
    }
}

static void probe_outs(const float *v, const ee_probe_t *p, int64_t n, float *out) {
    const int64_t blocks = (p->hidden + PANEL - 1) / PANEL;
    for (int64_t i = 0; i < n; i++) out[i] = probe_out(v + i * blocks * PANEL, p->w2, blocks);
}

int ee_probe(const void *x, int bf16, int64_t n, int64_t K, const ee_probe_t *p, float *out, int threads) {
    const int64_t blocks = (p->hidden + PANEL - 1) / PANEL;
    const int64_t shares = (K * blocks * PANEL * (p->w1_bf16 ? 2 : 4) + PROBE_SHARE - 1) / PROBE_SHARE;
    if (threads > shares) threads = (int)shares;
    if (threads > blocks) threads = (int)blocks;
    if (threads < 1) threads = 1; /* a linear probe */
    /* each thread's scaled row (K + PANEL), then the rows' hidden sums (`probe_share`) */
    float *s = (float *)malloc(sizeof(float) * (size_t)(threads * (K + PANEL) + n * blocks * PANEL));
    if (!s) return 1;
    if (!blocks) {
        for (int64_t i = 0; i < n; i++) {
            probe_scaled((const char *)x + i * K * (bf16 ? 2 : 4), bf16, K, p->gain, p->eps, s);
            out[i] = dot(s, p->w1, 0, K);
        }
    } else if (threads > 1) {
#pragma omp parallel num_threads(threads)
        {
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
            probe_share(x, bf16, n, K, p, s + t * (K + PANEL), s + threads * (K + PANEL), t, T);
        }
        probe_outs(s + threads * (K + PANEL), p, n, out);
    } else {
        probe_share(x, bf16, n, K, p, s, s + K + PANEL, 0, 1);
        probe_outs(s + K + PANEL, p, n, out);
    }
    free(s);
    return 0;
}

/* A vocabulary head in one call: rows x (n x h) through an RMSNorm (gain: its weight in x's dtype,
 * or NULL: none) onto K rows of an output weight (Wp: ee_pack's panels of the weight; only its
 * first K rows are read), then per row, as the torch operations of a head's projection and the
 * max-probability measure make them from the product:
 *   part (n x K, fp32)  the product, rounded to x's dtype as the product's own output is
 *   tokens (n)          the greedy token: the first largest of part, as ids[it] where ids is given
 *   conf (n)            its probability over the K, 1 / sum_j exp(part_j - max) (exp16)
 *   full (n x V, fp32)  where ids is given (a draft vocabulary: ids ascending, Wp the panels of
 *                       those rows): -inf, and part at the ids (NULL: not written)
 * where torch takes the norm's, a cast, a -inf row and a scatter, log-softmax, max and exp, and
 * an argmax over the row, ~10 calls of a few microseconds each around the product. 0 on success,
 * 1 when memory runs out. */
int ee_head(const void *x, const void *Wp, int64_t n, int64_t h, int64_t K, int bf16, int threads,
             const void *gain, float eps, const int64_t *ids, int64_t V, float *full, float *part, int64_t *tokens,
             float *conf) {
    void *y = malloc((size_t)(n * K * (bf16 ? 2 : 4)));
    if (!y) return 1;
    int failed = ee_linear(x, Wp, NULL, y, n, h, K, bf16, threads, gain ? RMSNORM : NONE, gain, eps, NULL);
    for (int64_t i = 0; i < n && !failed; i++) {
        float *restrict pr = part + i * K, top = -INFINITY, sum = 0.f;
        int64_t best = 0;
        for (int64_t j = 0; j < K; j++) {
            pr[j] = load(y, bf16, i * K + j);
            if (pr[j] > top) top = pr[j], best = j;
        }
        int64_t j = 0;
        v16 acc = {0};
        for (; j + PANEL <= K; j += PANEL) {
            v16 e;
            memcpy(&e, pr + j, sizeof e);
            acc += exp16(e - top);
        }
        for (int l = 0; l < PANEL; l++) sum += acc[l];
        for (; j < K; j++) sum += expf(pr[j] - top);
        tokens[i] = ids ? ids[best] : best;
        conf[i] = 1.0f / sum;
        if (full && ids) {
            float *restrict fr = full + i * V;
            for (int64_t v = 0; v < V; v++) fr[v] = -INFINITY;
            for (int64_t j = 0; j < K; j++) fr[ids[j]] = pr[j];
        }
    }
    free(y);
    return failed;
}

/* Rows of a layer's call from which its rotation and cache writes split over the threads. */
#define ROPE_SPLIT 32

/* Row a of a layer's QKV product (`ee_layer`'s qkv: G groups of per queries, a key and a value)
   rotated in place (`rope_row`), then its keys and values into the caches at its slot and
   position and its queries into q (G x per x hd a row). */
static inline void place_row(char *qkv, char *q, void *kc, void *vc, int64_t a, int64_t G, int64_t per, int64_t hd,
                             const float *cos, const float *sin, int64_t cos_stride, int64_t sb, int64_t sg,
                             int64_t st, const int64_t *slots, const int64_t *pos, int bf16) {
    const int64_t esize = bf16 ? 2 : 4, per2 = per + 2;
    rope_row(qkv, a, G, per2, per + 1, hd, cos, sin, cos_stride, bf16);
    for (int64_t g = 0; g < G; g++) {
        const char *grp = qkv + ((a * G + g) * per2) * hd * esize;
        int64_t at = (slots[a] * sb + g * sg + pos[a] * st) * esize;
        memcpy((char *)kc + at, grp + per * hd * esize, (size_t)(hd * esize));
        memcpy((char *)vc + at, grp + (per + 1) * hd * esize, (size_t)(hd * esize));
        memcpy(q + (a * G + g) * per * hd * esize, grp, (size_t)(per * hd * esize));
    }
}

/* A layer's decode step in one call (`lean.LeanLayer.__call__` where all four products run on this
 * kernel): n rows x (n x h, one new position per sequence) -> y (n x h), the position's keys and
 * values written into the layer's cache, each step the call the Python path makes, in its order
 * and with its roundings (so the numbers are that path's, bit for bit):
 *   qkv = rmsnorm(x, w_in) @ Wqkv^T          (n, G, per + 2, hd)
 *   rotary positions on the per + 1 query and key heads of each group (cos, sin: ee_rope's)
 *   K/V cache[slots[a], g, pos[a]] = the group's key and value heads
 *   o = attention of the query heads over cache positions 0 .. span - 1 of the row's slot
 *       (mask: (n, span) bytes, nonzero where attended, or NULL: row a attends keys 0 .. pos[a])
 *   x1 = x + o @ Wproj^T;  y = x1 + swiglu(rmsnorm(x1, w_mid) @ Wfc1^T) @ Wfc2^T
 * W* are ee_pack's panels; kc, vc: the layer's K/V cache (slots, G, positions, hd) with element
 * strides sb, sg, st (hd contiguous). probe non-NULL: the next exit's learned check on y as well, ee_probe's
 * scores into scores (n), so that a check that does not fire costs no call of its own (an MLP probe
 * inside the last product's parallel region: `linear`).
 * The step's Python operations, each a tensor operation of a
 * few microseconds, cost a SmolLM2 layer more than its attention. 0 on success, 1 when memory runs
 * out (nothing written to y; the cache may hold the new position's K/V, which a retry rewrites). */
int ee_layer(const void *x, void *y, int64_t n, int bf16, int threads, int64_t h, int64_t G, int64_t per, int64_t hd,
             int64_t ffn, const void *w_in, float eps_in, const void *qkv_p, const void *proj_p, const void *w_mid,
             float eps_mid, const void *fc1_p, const void *fc2_p, const float *cos, const float *sin,
             int64_t cos_stride, void *kc, void *vc, int64_t sb, int64_t sg, int64_t st, const int64_t *slots,
             const int64_t *pos, int64_t span, const uint8_t *mask, const ee_probe_t *probe, float *scores) {
    const int64_t esize = bf16 ? 2 : 4, per2 = per + 2, wq = G * per2 * hd, wo = G * per * hd;
    char *buf = (char *)malloc((size_t)(n * (wq + wo + wo + h + 2 * ffn) * esize));
    if (!buf) return 1;
    char *qkv = buf, *q = qkv + n * wq * esize, *o = q + n * wo * esize, *x1 = o + n * wo * esize;
    char *h1 = x1 + n * h * esize;
    int failed = ee_linear(x, qkv_p, NULL, qkv, n, h, wq, bf16, threads, RMSNORM, w_in, eps_in, NULL);
    if (!failed) {
        /* a prompt's rows split over the threads (one after the other, on one thread while the other
           waited: the CPU reference model's bf16 prefill 0.972 / 0.987x the time split, two runs of
           80 prompt pairs, `benchmarks/native_ab.py`) */
#define PLACE(a) place_row(qkv, q, kc, vc, a, G, per, hd, cos, sin, cos_stride, sb, sg, st, slots, pos, bf16)
        if (threads > 1 && n >= ROPE_SPLIT) {
#pragma omp parallel for num_threads(threads) schedule(static)
            for (int64_t a = 0; a < n; a++) PLACE(a);
        } else {
            for (int64_t a = 0; a < n; a++) PLACE(a);
        }
#undef PLACE
        /* rows of one sequence (a verify pass's, a fill's) attend as one sequence's positions: a head's
           keys and values then read once for ROW_BLOCK rows (`attend_rows`; the same numbers) */
        int64_t A = n, R = 1;
        if (n > 1) {
            int64_t a = 1;
            while (a < n && slots[a] == slots[0]) a++;
            if (a == n) A = 1, R = n;
        }
        failed = attend(q, kc, vc, mask, o, A, R, G, per, span, hd, sb, sg, st, sb, sg, st, bf16, threads, slots, pos);
    }
    if (!failed) failed = ee_linear(o, proj_p, NULL, x1, n, wo, h, bf16, threads, NONE, NULL, 0.f, x);
    if (!failed) failed = ee_linear(x1, fc1_p, NULL, h1, n, h, 2 * ffn, bf16, threads, RMSNORM, w_mid, eps_mid, NULL);
    const ee_probe_t *mlp = probe && probe->hidden ? probe : NULL; /* in the last product's region */
    if (!failed) failed = linear(h1, fc2_p, NULL, y, n, ffn, h, bf16, threads, SWIGLU, NULL, 0.f, x1, mlp, scores);
    if (!failed && probe && !mlp) failed = ee_probe(y, bf16, n, h, probe, scores, threads);
    free(buf);
    return failed;
}

/* Several consecutive layers' decode steps in one call: ee_layer over layers 0 .. L-1 in turn,
 * layer l's output its successor's input, the last one's into y (the same calls, so the same
 * numbers as L calls of ee_layer). Per layer l, ptrs[8 l .. 8 l + 7] = (w_in, qkv panels, proj
 * panels, w_mid, fc1 panels, fc2 panels, its K cache, its V cache) and eps[2 l], eps[2 l + 1] its
 * two norms' eps; every layer has the same shape, cache strides, rows and rotary angles. A decode
 * step then pays the Python between layers once for the run of layers, not once a layer.
 * Exits' learned checks on the way: where probes[l] is not NULL, that probe runs on layer l's
 * output (ee_probe's scores, into scores); where a row's score reaches bounds[l] (fp64, as the
 * caller compares), the run stops there: y gets that layer's output and *ran = l + 1, so the
 * caller need stop only where a check fires. Else *ran = L, scores those of the last probe run (the last layer's, where it has one).
 * 0 on success, 1 when memory runs out (layers before the failing one have written their K/V). */
int ee_layers(int64_t L, const int64_t *ptrs, const float *eps, const void *x, void *y, int64_t n, int bf16,
              int threads, int64_t h, int64_t G, int64_t per, int64_t hd, int64_t ffn, const float *cos,
              const float *sin, int64_t cos_stride, int64_t sb, int64_t sg, int64_t st, const int64_t *slots,
              const int64_t *pos, int64_t span, const uint8_t *mask, const ee_probe_t *const *probes,
              const double *bounds, float *scores, int64_t *ran) {
    const size_t rows = (size_t)(n * h * (bf16 ? 2 : 4));
    char *tmp = L > 1 ? (char *)malloc(2 * rows) : NULL;
    if (L > 1 && !tmp) return 1;
    int failed = 0;
    const void *in = x;
    *ran = L;
    for (int64_t l = 0; l < L && !failed; l++) {
        const int64_t *p = ptrs + 8 * l;
        const int last = l == L - 1;
        void *out = last ? y : tmp + (size_t)(l % 2) * rows;
        const ee_probe_t *probe = probes ? probes[l] : NULL;
        failed = ee_layer(in, out, n, bf16, threads, h, G, per, hd, ffn, (const void *)p[0], eps[2 * l],
                          (const void *)p[1], (const void *)p[2], (const void *)p[3], eps[2 * l + 1],
                          (const void *)p[4], (const void *)p[5], cos, sin, cos_stride, (void *)p[6], (void *)p[7], sb,
                          sg, st, slots, pos, span, mask, probe, scores); /* the probe in the layer's call */
        in = out;
        if (failed || !probe) continue;
        int fired = 0;
        for (int64_t i = 0; i < n && !last; i++) fired |= (double)scores[i] >= bounds[l];
        if (fired) {
            memcpy(y, out, rows);
            *ran = l + 1;
            break;
        }
    }
    free(tmp);
    return failed;
}

/* The controller's early stop in the loop (`DraftController.keep_drafting` for a plan without
   alternatives, `native.EarlyStop`): stop = {the bar, a, P(accepted) per max-probability bin (bins
   of them)}; *chance, P(the drafts so far all accepted), times the bin of this draft's confidence;
   another draft pays where that times a reaches the bar. Doubles, multiplied in the order Python does. */
static int early_stop(const double *stop, int64_t bins, double *chance, float conf) {
    const double v = (double)conf * (double)bins; /* Python's min(int(conf * BINS), BINS - 1) */
    const int64_t bin = v >= (double)(bins - 1) ? bins - 1 : v > 0.0 ? (int64_t)v : 0;
    *chance *= stop[2 + bin];
    return *chance * stop[1] >= stop[0];
}

/* A self-speculative round's drafts from a norm-only exit in one call, for S sequences side by
 * side: sequence s's draft j (j = 0 .. limit[s] - 1) feeds token t_j (t_0 = token[s], then each
 * draft's own) as a decode step feeds it: row t_j of the word embedding emb (V x h, the model's
 * dtype), layers 0 .. L - 1 as ee_layers runs them (ptrs, eps as it takes them; one row in cache
 * slot slots[s] at position pos[s] + j, attending to keys 0 .. pos[s] + j, its K/V written; cos,
 * sin: the rotary tables, a row of hd per position), its hidden state at depth L into row j of
 * pending[s] (the deeper layers' input, for the verify pass), then ee_head's exit norm (gain, eps_h)
 * and projection onto the K draft tokens ids (Wp: their rows of the exit's output weight, packed):
 * t_{j+1} = tokens[s D + j], the draft, and conf[s D + j] its max-probability. After each draft,
 * keep(s, j, conf) (NULL: always), or the early stop's numbers `stop` (NULL: none; `early_stop`),
 * says whether sequence s drafts another. With feed_last, a
 * sequence's last draft too is fed through layers 0 .. L - 1 (its K/V written at pos[s] + made[s],
 * its hidden state into row made[s] of pending[s]), so that the verify pass starts at depth L with
 * every drafted row pending. Each step runs the rows of the sequences still going together (one
 * ee_layers call, one ee_head call; a row's numbers do not depend on the rows beside it): the same
 * numbers as those decode steps, without a return to Python between them. made[s]: sequence s's
 * drafts. 0 on success, 1 when memory runs out (the drafts made by then are whole: K/V, pending
 * row, token). */
int ee_drafts(int64_t D, int64_t S, const int64_t *token, const void *emb, int64_t L, const int64_t *ptrs,
              const float *eps, int bf16, int threads, int64_t h, int64_t G, int64_t per, int64_t hd, int64_t ffn,
              const float *cos, const float *sin, int64_t sb, int64_t sg, int64_t st, const int64_t *slots,
              const int64_t *pos, const int64_t *pending, const int64_t *limit, const void *Wp, int64_t K,
              const int64_t *ids, const void *gain, float eps_h, int (*keep)(int64_t, int64_t, float),
              const double *stop, int64_t bins, int feed_last, int64_t *tokens, float *conf, int64_t *made) {
    const size_t row = (size_t)h * (bf16 ? 2 : 4);
    for (int64_t s = 0; s < S; s++) made[s] = 0;
    double *chance = (double *)malloc(sizeof(double) * (size_t)(S + 1)); /* the early stop's (`early_stop`) */
    /* per sequence: its token to feed, its phase (0 drafting, 1 its last draft fed below the exit, 2 done) */
    int64_t *next = (int64_t *)malloc(sizeof(int64_t) * (size_t)(6 * S + 1));
    int *phase = (int *)malloc(sizeof(int) * (size_t)(S + 1));
    char *x = (char *)malloc(row * (size_t)(2 * S + 1));
    float *tables = (float *)malloc(sizeof(float) * (size_t)(2 * S * hd + 1));
    float *part = (float *)malloc(sizeof(float) * (size_t)(K * S + 1));
    float *c = (float *)malloc(sizeof(float) * (size_t)(S + 1));
    int failed = !next || !phase || !x || !tables || !part || !c || !chance;
    int64_t *at = next + S, *rows = at + S, *slot = rows + S, *drafted = slot + S, *got = drafted + S;
    for (int64_t s = 0; s < S && !failed; s++) {
        next[s] = token[s];
        phase[s] = limit[s] > 0 ? 0 : 2;
        chance[s] = 1.0;
    }
    for (int64_t j = 0; !failed; j++) {
        int64_t m = 0, md = 0, top = 0;
        for (int64_t s = 0; s < S; s++) /* the rows of this step: every sequence not done */
            if (phase[s] < 2) {
                rows[m] = s, slot[m] = slots[s], at[m] = pos[s] + j;
                memcpy(x + (size_t)m * row, (const char *)emb + (size_t)next[s] * row, row);
                memcpy(tables + m * hd, cos + at[m] * hd, sizeof(float) * (size_t)hd);
                memcpy(tables + (S + m) * hd, sin + at[m] * hd, sizeof(float) * (size_t)hd);
                top = at[m] > top ? at[m] : top;
                m++;
            }
        if (!m) break;
        char *y = x + (size_t)S * row;
        int64_t ran = L;
        /* no mask: each row attends keys 0 .. its own position (ee_layer's rows) */
        failed = ee_layers(L, ptrs, eps, x, y, m, bf16, threads, h, G, per, hd, ffn, tables, tables + S * hd, hd, sb, sg,
                           st, slot, at, top + 1, NULL, NULL, NULL, NULL, &ran);
        if (failed) break;
        for (int64_t i = 0; i < m; i++) { /* each row into its sequence's pending rows; those drafting gathered */
            const int64_t s = rows[i];
            memcpy((char *)pending[s] + (size_t)j * row, y + (size_t)i * row, row);
            if (phase[s] == 0) {
                if (md != i) memcpy(y + (size_t)md * row, y + (size_t)i * row, row);
                drafted[md++] = s;
            } else {
                phase[s] = 2; /* its last draft fed below the exit */
            }
        }
        if (!md) break;
        failed = ee_head(y, Wp, md, h, K, bf16, threads, gain, eps_h, ids, 0, NULL, part, got, c);
        if (failed) break;
        for (int64_t i = 0; i < md; i++) {
            const int64_t s = drafted[i];
            tokens[s * D + j] = next[s] = got[i];
            conf[s * D + j] = c[i];
            made[s] = j + 1;
            /* the stop's numbers, else keep, asked after every draft, the last too */
            const int more = stop ? early_stop(stop, bins, &chance[s], c[i]) : keep ? keep(s, j, c[i]) : 1;
            if (!more || j + 1 == limit[s]) phase[s] = feed_last ? 1 : 2;
        }
    }
    free(next);
    free(phase);
    free(x);
    free(tables);
    free(part);
    free(c);
    free(chance);
    return failed;
}

/* One exit of a decode loop (`ee_decode`): its learned check and its head. */
typedef struct {
    int64_t depth;           /* the layers below it: its check reads layer depth - 1's output */
    int64_t layer;           /* its number, as a token's exit layer is recorded */
    const ee_probe_t *probe; /* its learned check (`native.Probe`), or NULL: a vocabulary check (the head
                                on every new row, its max-probability the score, its token a leaver's) */
    double bound;            /* a score at or above it leaves (fp64, as the caller compares) */
    const void *Wp;          /* its head: packed rows of its output weight (ee_head's) */
    int64_t K;               /* their count */
    const int64_t *ids;      /* the draft vocabulary's ids those rows are, or NULL: rows 0 .. K - 1 */
    const void *gain;        /* its norm's gain (x's dtype) */
    float eps;               /* its norm's eps */
    const void *fc1;         /* an MLP exit's sub-block (NULL: none): x + fc2(swiglu(fc1(rmsnorm(x)))), */
    const void *fc2;         /* packed as ee_linear takes them, before its norm (`lean.ExitMLP`) */
    const void *mlp_gain;    /* the sub-block's norm gain */
    float mlp_eps;
    int64_t ffn;             /* the sub-block's width (fc1: 2 ffn rows) */
} ee_exit_t;

/* Exit e's head on n leaving rows x: its MLP sub-block where it has one (`lean.mlp_block`'s two
   calls), then ee_head's norm and projection (tokens, max-probabilities). 0, or 1 out of memory. */
static int exit_head(const ee_exit_t *e, const void *x, int64_t n, int64_t h, int bf16, int threads, float *part,
                     int64_t *tok, float *c) {
    const size_t esize = bf16 ? 2 : 4;
    char *h1 = NULL, *y = NULL;
    if (e->fc1) {
        h1 = (char *)malloc(esize * (size_t)(n * 2 * e->ffn));
        y = (char *)malloc(esize * (size_t)(n * h));
        int failed = !h1 || !y;
        if (!failed)
            failed = ee_linear(x, e->fc1, NULL, h1, n, h, 2 * e->ffn, bf16, threads, RMSNORM, e->mlp_gain, e->mlp_eps,
                               NULL);
        if (!failed) failed = ee_linear(h1, e->fc2, NULL, y, n, e->ffn, h, bf16, threads, SWIGLU, NULL, 0.f, x);
        if (failed) {
            free(h1);
            free(y);
            return 1;
        }
        x = y;
    }
    int failed = ee_head(x, e->Wp, n, h, e->K, bf16, threads, e->gain, e->eps, e->ids, 0, NULL, part, tok, c);
    free(h1);
    free(y);
    return failed;
}

/* Greedy decode steps for S sequences in one call, each step as `Passes.run` makes it under
 * the exact policy with learned checks (or none: full decoding), the same calls in the same order,
 * so the same numbers: sequence s feeds token[s] at position fed[s] (its word embedding, a row of
 * emb), layers 0 .. L - 1 (ptrs, eps as ee_layers takes them) run over its new row and, from the
 * layer where each starts, its pending rows (positions q with filled[l B + slots[s]] <= q <
 * fed[s] at layer l, each joining at the first such layer from pending[s] + q rows, the rows of
 * every sequence still going together in one ee_layer call a layer); after layer depth - 1 of
 * exit e (exits: E, by depth), its probe on each new row (in the layer's call where the layer ran
 * new rows alone, else ee_probe on them: the same scores) and a row at or above its bound leaves
 * there: its token from the exit's head (its MLP sub-block if any, then ee_head: its norm and rows, the draft vocabulary's ids),
 * every row of its sequence into pending[s] at its position (the deeper layers' input, for a
 * later step). A new row through every layer takes the final head (Wp: K rows, gain, eps_h).
 * filled[l B + slots[s]] is set to fed[s] + 1 at every layer a step ran s's rows; then fed[s]
 * grows by one, token[s] is the step's token and keep(s, step j of this call, token, exit layer
 * (L at the final head), max-probability, probe score (0 at the final head)), asked of every
 * sequence of the step, says whether s goes on (1), stops (0), or every sequence stops after this
 * step (-1: the caller's clock ends its window, or an error in its callback). A sequence makes at most
 * limit[s] steps; the loop stops before a step whose rows in some layer call would exceed
 * rows_cap (the caller's native kernels take that many), *wanted then the rows it needed (else 0).
 * decide (NULL: every exit evaluated, every row at its bound leaving, the exact policy) is asked at
 * each exit a step reaches, before the layer below it runs: decide(e, 0, info, 0, NULL), info[s]
 * the rows sequence s has there (0: not there), info[S + s] whether it held pending rows as the
 * step began, says whether the exit is evaluated (0: its check skipped, as cost_aware skips it);
 * and after an evaluation, decide(e, 1, info, nf, fires), fires the indices (among the sequences
 * there, in order) of the nf rows at or above the bound, says whether they leave (0: all stay).
 * seen (NULL: not wanted), seen_conf: per sequence, the token and max-probability a vocabulary check
 * (an exit with no probe) made for its new row at the step's latest such exit, written before keep is
 * asked (an observed exit, `ExitPolicy.observe`, is a vocabulary check whose bound is +inf: it never
 * fires, and its token is what a draft from it would have been).
 * *steps: steps made. 0 on success, 1 when memory runs out (the steps made by then are whole). */
int ee_decode(int64_t S, const int64_t *slots, int64_t *token, int64_t *fed, int64_t *filled, int64_t B,
              const int64_t *pending, const int64_t *limit, int64_t rows_cap, const void *emb, int64_t L,
              const int64_t *ptrs, const float *eps, int bf16, int threads, int64_t h, int64_t G, int64_t per,
              int64_t hd, int64_t ffn, const float *cos, const float *sin, int64_t sb, int64_t sg, int64_t st,
              int64_t E, const ee_exit_t *exits, const void *Wp, int64_t K, const void *gain, float eps_h,
              int (*keep)(int64_t, int64_t, int64_t, int64_t, float, float),
              int (*decide)(int64_t, int64_t, const int64_t *, int64_t, const int64_t *), int64_t *steps,
              int64_t *wanted, int64_t *seen, float *seen_conf) {
    const size_t row = (size_t)h * (bf16 ? 2 : 4);
    int64_t Kmax = K;
    for (int64_t e = 0; e < E; e++) Kmax = exits[e].K > Kmax ? exits[e].K : Kmax;
    const int64_t R = rows_cap > S ? rows_cap : S;
    /* per sequence: going, its position this step, walking this step, the step's exit layer,
       max-probability and score, steps made; per row: its sequence, position, slot, and new or not */
    int64_t *ints = (int64_t *)malloc(sizeof(int64_t) * (size_t)(10 * S + 4 * R + L * S + S + 1));
    float *floats = (float *)malloc(sizeof(float) * (size_t)(3 * S + R + 2 * R * hd + S * Kmax + S + 1));
    char *bufs = (char *)malloc(row * (size_t)(2 * R + S + 1));
    int *exit_at = (int *)malloc(sizeof(int) * (size_t)(L + 2));
    int failed = !ints || !floats || !bufs || !exit_at;
    *steps = *wanted = 0;
    if (failed) goto done;
    int64_t *going = ints, *p = going + S, *walk = p + S, *layer_of = walk + S, *made = layer_of + S,
            *got = made + S, *rs = got + S, *rq = rs + R, *rslot = rq + R, *rnew = rslot + R, *f0 = rnew + R,
            *info = f0 + L * S, *fires = info + 2 * S, /* decide's: rows at the exit, held; firing indices */
            *vtok = fires + S; /* a vocabulary check's tokens (one per new row) */
    float *conf = floats, *score = conf + S, *scores = score + S, *tc = scores + R, *ts = tc + R * hd,
          *part = ts + R * hd, *c = part + S * Kmax, *vconf = c + S + 1;
    char *X = bufs, *Y = X + (size_t)R * row, *Z = Y + (size_t)R * row; /* Z: gathered new rows */
    for (int64_t l = 0; l <= L; l++) exit_at[l] = -1;
    for (int64_t e = 0; e < E; e++)
        if (exits[e].depth > 0 && exits[e].depth < L) exit_at[exits[e].depth] = (int)e;
    for (int64_t s = 0; s < S; s++) going[s] = limit[s] > 0, made[s] = 0;
    for (;;) {
        int64_t live = 0, need = 0;
        for (int64_t s = 0; s < S; s++) /* the most rows a layer call of this step can take */
            if (going[s]) {
                int64_t low = fed[s];
                for (int64_t l = 0; l < L; l++) low = filled[l * B + slots[s]] < low ? filled[l * B + slots[s]] : low;
                need += fed[s] - low + 1;
                live++;
            }
        if (live && need > R) *wanted = need;
        if (!live || need > R) break;
        int64_t n = 0, nw = 0;
        for (int64_t s = 0; s < S; s++) {
            walk[s] = going[s];
            if (!going[s]) continue;
            p[s] = fed[s], conf[s] = 0.f, score[s] = 0.f, layer_of[s] = L;
            for (int64_t l = 0; l < L; l++) f0[l * S + s] = filled[l * B + slots[s]];
            info[S + s] = f0[(L - 1) * S + s] < fed[s]; /* it holds pending rows as the step begins */
            memcpy(X + (size_t)n * row, (const char *)emb + (size_t)token[s] * row, row);
            rs[n] = s, rq[n] = p[s], rnew[n] = 1, n++;
        }
        for (int64_t l = 0; l < L && n && !failed; l++) {
            if (l > 0) /* pending rows whose first unfilled layer is l join here */
                for (int64_t s = 0; s < S; s++) {
                    if (!walk[s]) continue;
                    for (int64_t q = f0[l * S + s]; q < f0[(l - 1) * S + s]; q++) {
                        memcpy(X + (size_t)n * row, (const char *)pending[s] + (size_t)q * row, row);
                        rs[n] = s, rq[n] = q, rnew[n] = 0, n++;
                    }
                }
            int64_t top = 0;
            nw = 0;
            for (int64_t r = 0; r < n; r++) {
                rslot[r] = slots[rs[r]];
                memcpy(tc + r * hd, cos + rq[r] * hd, sizeof(float) * (size_t)hd);
                memcpy(ts + r * hd, sin + rq[r] * hd, sizeof(float) * (size_t)hd);
                top = rq[r] > top ? rq[r] : top;
                nw += rnew[r];
            }
            int e = exit_at[l + 1];
            if (e >= 0 && decide) { /* whether the exit is evaluated, from the rows each sequence has there */
                for (int64_t s = 0; s < S; s++) info[s] = 0;
                for (int64_t r = 0; r < n; r++) info[rs[r]]++;
                if (!decide(e, 0, info, 0, NULL)) e = -1;
            }
            const ee_probe_t *in_layer = e >= 0 && nw == n ? exits[e].probe : NULL;
            const int64_t *w = ptrs + 8 * l;
            failed = ee_layer(X, Y, n, bf16, threads, h, G, per, hd, ffn, (const void *)w[0], eps[2 * l],
                              (const void *)w[1], (const void *)w[2], (const void *)w[3], eps[2 * l + 1],
                              (const void *)w[4], (const void *)w[5], tc, ts, hd, (void *)w[6], (void *)w[7], sb, sg,
                              st, rslot, rq, top + 1, NULL, in_layer, scores);
            if (failed) break;
            for (int64_t s = 0; s < S; s++)
                if (walk[s]) filled[l * B + slots[s]] = p[s] + 1;
            if (e >= 0) {
                const int vocab = !exits[e].probe; /* a vocabulary check: the head on every new row */
                if (!in_layer) { /* the new rows gathered, the probe (or the head) on them alone */
                    for (int64_t r = 0, i = 0; r < n; r++)
                        if (rnew[r]) memcpy(Z + (size_t)i++ * row, Y + (size_t)r * row, row);
                    if (vocab) {
                        failed = exit_head(&exits[e], Z, nw, h, bf16, threads, part, vtok, vconf);
                        for (int64_t i = 0; i < nw; i++) scores[i] = vconf[i]; /* its max-probability */
                    } else
                        failed = ee_probe(Z, bf16, nw, h, exits[e].probe, scores, threads);
                    if (failed) break;
                } else /* new rows alone: scores in row order already */
                    ;
                int64_t nf = 0;
                for (int64_t r = 0, i = 0; r < n; r++) {
                    if (!rnew[r]) continue;
                    const int64_t s = rs[r];
                    score[s] = scores[i];
                    if (vocab && seen) seen[s] = vtok[i], seen_conf[s] = vconf[i];
                    if ((double)score[s] >= exits[e].bound) fires[nf] = i, got[nf++] = r;
                    i++;
                }
                if (decide && !decide(e, 1, info, nf, fires)) nf = 0; /* the firing rows stay */
                int64_t *tok = rslot; /* the head's tokens, then copied out (rslot is remade each layer) */
                for (int64_t i = 0; i < nf; i++) { /* the leavers' rows, for the head */
                    if (vocab) /* the check's own head made their tokens */
                        tok[i] = vtok[fires[i]], c[i] = vconf[fires[i]];
                    else
                        memcpy(Z + (size_t)i * row, Y + (size_t)got[i] * row, row);
                    got[i] = rs[got[i]];
                    walk[got[i]] = 0;
                }
                if (nf) {
                    if (!vocab) failed = exit_head(&exits[e], Z, nf, h, bf16, threads, part, tok, c);
                    if (failed) break;
                    for (int64_t i = 0; i < nf; i++)
                        token[got[i]] = tok[i], conf[got[i]] = c[i], layer_of[got[i]] = exits[e].layer;
                    int64_t kept = 0; /* every row of a leaving sequence to its pending rows; the rest go on */
                    for (int64_t r = 0; r < n; r++) {
                        const int64_t s = rs[r];
                        if (!walk[s]) {
                            memcpy((char *)pending[s] + (size_t)rq[r] * row, Y + (size_t)r * row, row);
                            continue;
                        }
                        if (kept != r) {
                            memcpy(Y + (size_t)kept * row, Y + (size_t)r * row, row);
                            rs[kept] = rs[r], rq[kept] = rq[r], rnew[kept] = rnew[r];
                        }
                        kept++;
                    }
                    n = kept;
                }
            }
            char *t = X;
            X = Y, Y = t;
        }
        if (failed) break;
        if (n) { /* the new rows through every layer: the final head */
            int64_t nf = 0;
            for (int64_t r = 0; r < n; r++)
                if (rnew[r]) {
                    memcpy(Z + (size_t)nf * row, X + (size_t)r * row, row);
                    got[nf++] = rs[r];
                }
            int64_t *tok = rslot;
            failed = ee_head(Z, Wp, nf, h, K, bf16, threads, gain, eps_h, NULL, 0, NULL, part, tok, c);
            if (failed) break;
            for (int64_t i = 0; i < nf; i++) token[got[i]] = tok[i], conf[got[i]] = c[i];
        }
        int stop = 0;
        for (int64_t s = 0; s < S; s++) { /* every sequence's token is told, a halt or not */
            if (!going[s]) continue;
            fed[s] = p[s] + 1;
            made[s]++;
            int k = keep(s, *steps, token[s], layer_of[s], conf[s], score[s]);
            if (k < 0) stop = 1;
            if (k <= 0 || made[s] >= limit[s]) going[s] = 0;
        }
        ++*steps;
        if (stop) break;
    }
done:
    free(ints);
    free(floats);
    free(bufs);
    free(exit_at);
    return failed;
}

/* A self-speculative round's verify pass in one call, for S sequences side by side: sequence s's
 * rows pending at depth d, positions lo[s] .. hi[s] - 1 (rows pending[s] + q, as drafting left
 * them: layers 0 .. d - 1 have filled them), through layers d .. d + L - 1 together (ptrs, eps as
 * ee_layers takes them, the run of layers from d; each row in cache slot slots[s] at its position,
 * attending to keys 0 .. its position: no mask), then the final head (Wp: K rows, its norm's gain
 * and eps_h) on every row: part (n x K, ee_head's product), tokens[i] and conf[i] (its
 * max-probability) for row i, s's rows after
 * s - 1's in position order, as `Passes.verify_pending` (`lean.native_run`, then `native.head`)
 * makes them: the same calls on the same rows, so the same numbers. filled[l B + slots[s]] is set
 * to hi[s] for l = d .. d + L - 1. 0 on success, 1 when memory runs out (layers before the failing
 * one have written their K/V). */
int ee_verify(int64_t S, const int64_t *slots, const int64_t *lo, const int64_t *hi, int64_t *filled, int64_t B,
              int64_t d, const int64_t *pending, int64_t L, const int64_t *ptrs, const float *eps, int bf16,
              int threads, int64_t h, int64_t G, int64_t per, int64_t hd, int64_t ffn, const float *cos,
              const float *sin, int64_t sb, int64_t sg, int64_t st, const void *Wp, int64_t K, const void *gain,
              float eps_h, float *part, int64_t *tokens, float *conf) {
    const size_t row = (size_t)h * (bf16 ? 2 : 4);
    int64_t n = 0, span = 0;
    for (int64_t s = 0; s < S; s++) {
        n += hi[s] - lo[s];
        span = hi[s] > span ? hi[s] : span;
    }
    if (n <= 0) return 0;
    char *X = (char *)malloc(2 * row * (size_t)n);
    int64_t *ints = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * n));
    float *floats = (float *)malloc(sizeof(float) * (size_t)(2 * n * hd));
    int failed = !X || !ints || !floats;
    if (!failed) {
        int64_t *rslot = ints, *rq = ints + n;
        float *tc = floats, *ts = tc + n * hd;
        for (int64_t s = 0, r = 0; s < S; s++)
            for (int64_t q = lo[s]; q < hi[s]; q++, r++) {
                memcpy(X + (size_t)r * row, (const char *)pending[s] + (size_t)q * row, row);
                rslot[r] = slots[s], rq[r] = q;
                memcpy(tc + r * hd, cos + q * hd, sizeof(float) * (size_t)hd);
                memcpy(ts + r * hd, sin + q * hd, sizeof(float) * (size_t)hd);
            }
        char *Y = X + (size_t)n * row;
        int64_t ran = 0;
        failed = ee_layers(L, ptrs, eps, X, Y, n, bf16, threads, h, G, per, hd, ffn, tc, ts, hd, sb, sg, st, rslot,
                           rq, span, NULL, NULL, NULL, NULL, &ran);
        if (!failed) {
            for (int64_t s = 0; s < S; s++)
                for (int64_t l = d; l < d + L; l++) filled[l * B + slots[s]] = hi[s];
            failed = ee_head(Y, Wp, n, h, K, bf16, threads, gain, eps_h, NULL, 0, NULL, part, tokens, conf);
        }
    }
    free(X);
    free(ints);
    free(floats);
    return failed;
}

/* Self-speculative rounds of one sequence in one call, each round the two calls `native_spec.spec_round`
 * makes and the bookkeeping `SelfSpeculative.verified_round` does after them, without returning to
 * Python between rounds. A round from the last kept token *token (not yet fed; position *fed):
 *   ee_drafts: up to cap drafts from the exit below layer Ld (its layers ptrs_d, eps_d; its head Wd,
 *     Kd rows, the draft vocabulary's ids, its norm gain_d, eps_hd), the early stop's numbers `stop`
 *     (bins of them, as ee_drafts takes them), the last draft fed below the exit too; its hidden
 *     states into the sequence's pending rows (`pending`: row q is position q), filled at layers
 *     0 .. Ld - 1 set to the round's last fed position + 1;
 *   ee_verify: those rows through layers Ld .. Ld + Lv - 1 (ptrs_v, eps_v) and the final head (Wf, Kf
 *     rows, gain_f, eps_hf): the final head's token after each fed position;
 *   the drafts that agree with it in a row are kept (exit layer draft_layer, the draft's
 *     max-probability), then the final head's token after them (exit layer `layers`, its
 *     max-probability): keep(j, token, layer, confidence) is asked after each, in order, and one that
 *     returns 0 ends the sequence (the round's later tokens are not kept);
 *   the cache forgets the positions past the kept ones (filled at every layer at most their end,
 *     as `DecodeState.reset`), *fed is that end and *token the final head's token;
 *   next(round, drafted, agreed, ended) (the round's drafts and their max-probabilities in drafts[0 ..
 *     drafted - 1] and dconf) gives the next round's cap (at most max_cap; stop's numbers may be
 *     rewritten in place before it returns), or 0: the loop returns. It is asked after every round, the
 *     last too (ended: keep ended the sequence; it then returns 0).
 * The loop returns too before a round whose positions would pass room (the cache's and the pending
 * rows' length). cos, sin: the rotary tables for every position below room. *rounds: rounds made.
 * 0 on success, 1 when memory runs out (the rounds made by then are whole; the failing round's fill
 * counts, *fed and *token are those of the round before it: its positions are forgotten). */
int ee_spec_rounds(int64_t slot, int64_t *token, int64_t *fed, int64_t *filled, int64_t B, int64_t layers,
                   const void *pending, const void *emb, int64_t Ld, const int64_t *ptrs_d, const float *eps_d,
                   const void *Wd, int64_t Kd, const int64_t *ids, const void *gain_d, float eps_hd,
                   int64_t draft_layer, int64_t Lv, const int64_t *ptrs_v, const float *eps_v, const void *Wf,
                   int64_t Kf, const void *gain_f, float eps_hf, int bf16, int threads, int64_t h, int64_t G,
                   int64_t per, int64_t hd, int64_t ffn, const float *cos, const float *sin, int64_t sb, int64_t sg,
                   int64_t st, int64_t room, int64_t cap, int64_t max_cap, const double *stop, int64_t bins,
                   int (*keep)(int64_t, int64_t, int64_t, float), int64_t (*next)(int64_t, int64_t, int64_t, int64_t),
                   int64_t *drafts, float *dconf, int64_t *rounds) {
    const size_t row = (size_t)h * (bf16 ? 2 : 4);
    *rounds = 0;
    if (cap > max_cap) cap = max_cap;
    float *part = (float *)malloc(sizeof(float) * (size_t)((max_cap + 1) * Kf));
    int64_t *vt = (int64_t *)malloc(sizeof(int64_t) * (size_t)(max_cap + 1));
    float *vc = (float *)malloc(sizeof(float) * (size_t)(max_cap + 1));
    int failed = !part || !vt || !vc;
    while (!failed && cap > 0) {
        const int64_t pos = *fed;
        if (pos + cap + 1 > room) break;
        int64_t made = 0, lim = cap, at = pos, hi, ok = 0, base = (int64_t)(intptr_t)pending;
        int64_t from = (int64_t)(intptr_t)((const char *)pending + (size_t)pos * row);
        failed = ee_drafts(cap, 1, token, emb, Ld, ptrs_d, eps_d, bf16, threads, h, G, per, hd, ffn, cos, sin, sb, sg,
                           st, &slot, &at, &from, &lim, Wd, Kd, ids, gain_d, eps_hd, NULL, stop, bins, 1, drafts, dconf,
                           &made);
        hi = pos + made + 1; /* every draft made fed below the exit, the last too */
        for (int64_t l = 0; l < Ld && !failed; l++) filled[l * B + slot] = hi;
        if (!failed)
            failed = ee_verify(1, &slot, &at, &hi, filled, B, Ld, &base, Lv, ptrs_v, eps_v, bf16, threads, h, G, per,
                               hd, ffn, cos, sin, sb, sg, st, Wf, Kf, gain_f, eps_hf, part, vt, vc);
        if (failed) { /* forget the round's positions */
            for (int64_t l = 0; l < layers; l++)
                if (filled[l * B + slot] > pos) filled[l * B + slot] = pos;
            break;
        }
        while (ok < made && vt[ok] == drafts[ok]) ok++;
        int ended = 0;
        for (int64_t i = 0; i <= ok && !ended; i++)
            ended = i < ok ? !keep(i, drafts[i], draft_layer, dconf[i]) : !keep(i, vt[ok], layers, vc[ok]);
        const int64_t end = pos + ok + 1; /* the agreeing drafts' positions kept, the final token not yet fed */
        for (int64_t l = 0; l < layers; l++)
            if (filled[l * B + slot] > end) filled[l * B + slot] = end;
        *fed = end;
        *token = vt[ok];
        (*rounds)++;
        cap = next(*rounds - 1, made, ok, ended);
        if (cap > max_cap) cap = max_cap;
    }
    free(part);
    free(vt);
    free(vc);
    return failed;
}
