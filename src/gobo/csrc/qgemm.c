/* gobo CPU GEMM on packed weights: y = act(x W^T + bias + residual), W (N x K) held as b-bit codes.
 *
 * A GEMM copies blocks of its right-hand matrix into "panels" (here: NR output features
 * side by side for every k) so that its inner kernel reads them contiguously. This one never
 * holds W in float32: it decodes each block of NR rows of codes straight into its panel (the
 * same bits as QuantizedTensor.dequantize()), so the decoding takes the place of the packing
 * copy. Codes of up to 4 bits with K a multiple of 8 (every BERT-family matrix) are looked up
 * eight per row and transposed in registers (decode_panel); other widths and shapes go through
 * gobo_decode_rows and a transposing copy. The inner kernel multiplies MR rows of x by one
 * panel slice of KC k's into MR x NR accumulators, the classic register blocking of
 * BLIS/GotoBLAS: 6 x 16 in 12 AVX2 registers, or, where the CPU has AVX-512, 8 x 32 in 16
 * of its 32 registers (half the instructions per multiply-add; on cores that split 512-bit
 * operations in two, such as AMD Zen 4, the gain is in the front end, not the FMA units).
 *
 * Every output is summed in the same order (bias, then k = 0, 1, ..., then the residual)
 * whatever the thread count, batch size or instruction set, so the result depends on none of
 * them. The optional epilogue (residual add, then GELU) runs on each tile of y right after
 * its last block of k, while the tile is in L1; an optional LayerNorm then normalises each
 * row once all threads have finished their columns. Threads split the output features (each
 * decodes only its own rows) and come from the host's OpenMP team or a small pool of POSIX
 * threads created on first use; idle workers sleep on a condition variable.
 *
 * gobo_attention (softmax(q k^T * scale + mask) v per batch and head) reuses the same inner
 * kernels on the same threads: the scores against panels of k^T, the softmax per row, the
 * probabilities against panels of v.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gobo_api.h"
#include "qmat.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QG_X86 1
#else
#define QG_X86 0
#endif

/* block sizes; KC and MC can be set at build time (-DKC=..., -DMC=...) to tune for a cache.
 * On Zen 4, KC from 256 to 512 and MC from 48 to 192 ran within noise of these. */
#ifndef KC
#define KC 384 /* k's per panel slice: K = 768 and 3072 split evenly */
#endif
#define NC 128 /* output features decoded per block, a multiple of both NRs */
#ifndef MC
#define MC 96  /* rows of x per L2 block, a multiple of both MRs (6 and 8) */
#endif
#define MR_MAX 8
#define NR_MAX 32
#define MAX_THREADS 64

typedef struct {
    const gobo_qmat *q;
    const float *x; /* m x K, row stride ldx */
    int64_t m, ldx;
    float *y;       /* m x N, row stride ldy */
    int64_t ldy;
    const float *bias; /* N or NULL */
    const float *res;  /* m x N, row stride ldres, or NULL: added after the sum */
    int64_t ldres;
    int act;           /* GOBO_ACT_* applied after the residual */
    int ln;            /* 1: then LayerNorm over each row of y, with ln_w, ln_b (NULL: 1, 0) and ln_eps */
    const float *ln_w, *ln_b;
    float ln_eps;
    int arrived;       /* threads done with their parts (the barrier before the LayerNorm) */
    int isa;           /* QG_AVX2 or QG_AVX512 */
    int64_t n_per;  /* output features per thread, a multiple of the panel width */
    int nthreads;
    int status[MAX_THREADS];
} qg_job;

/* attention: out = softmax(q k^T * scale + mask) v for every (batch, head); each tensor is
 * addressed through its strides (in floats; the feature dimension is contiguous) */
typedef struct {
    const float *q, *k, *v, *mask;
    float *out;
    int64_t B, H, SQ, SK, D;
    int64_t qs[3], ks[3], vs[3], os[3]; /* batch, head, position */
    int64_t ms[4];                      /* batch, head, query, key (0 where broadcast) */
    float scale;
    int isa;
    int64_t next; /* the next (batch, head) pair to claim */
    int status[MAX_THREADS];
} qa_job;

enum { QG_AVX2 = 1, QG_AVX512 = 2 };
enum { GOBO_ACT_NONE = 0, GOBO_ACT_GELU = 1 };

#if QG_X86
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx2,fma,avx512f")))
#define INLINE static inline __attribute__((always_inline))

/* C[6 x 16] (row stride ldc) = init or C, + A * B over kc steps. A: six rows of x, row i at
 * A + i * lda, one float per k; B: a panel slice, 16 floats per k */
INLINE AVX2 void kernel_6x16(int64_t kc, const float *A, int64_t lda, const float *B, float *C, int64_t ldc, const float *init, int accum) {
    __m256 c[6][2];
    if (accum) {
        for (int i = 0; i < 6; ++i) {
            c[i][0] = _mm256_loadu_ps(C + i * ldc);
            c[i][1] = _mm256_loadu_ps(C + i * ldc + 8);
        }
    } else {
        const __m256 z0 = init ? _mm256_loadu_ps(init) : _mm256_setzero_ps();
        const __m256 z1 = init ? _mm256_loadu_ps(init + 8) : _mm256_setzero_ps();
        for (int i = 0; i < 6; ++i) { c[i][0] = z0; c[i][1] = z1; }
    }
    const float *a0 = A, *a1 = A + lda, *a2 = A + 2 * lda, *a3 = A + 3 * lda, *a4 = A + 4 * lda, *a5 = A + 5 * lda;
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k, B += 16) {
        const __m256 b0 = _mm256_load_ps(B), b1 = _mm256_load_ps(B + 8);
        __m256 a;
        a = _mm256_broadcast_ss(a0 + k); c[0][0] = _mm256_fmadd_ps(a, b0, c[0][0]); c[0][1] = _mm256_fmadd_ps(a, b1, c[0][1]);
        a = _mm256_broadcast_ss(a1 + k); c[1][0] = _mm256_fmadd_ps(a, b0, c[1][0]); c[1][1] = _mm256_fmadd_ps(a, b1, c[1][1]);
        a = _mm256_broadcast_ss(a2 + k); c[2][0] = _mm256_fmadd_ps(a, b0, c[2][0]); c[2][1] = _mm256_fmadd_ps(a, b1, c[2][1]);
        a = _mm256_broadcast_ss(a3 + k); c[3][0] = _mm256_fmadd_ps(a, b0, c[3][0]); c[3][1] = _mm256_fmadd_ps(a, b1, c[3][1]);
        a = _mm256_broadcast_ss(a4 + k); c[4][0] = _mm256_fmadd_ps(a, b0, c[4][0]); c[4][1] = _mm256_fmadd_ps(a, b1, c[4][1]);
        a = _mm256_broadcast_ss(a5 + k); c[5][0] = _mm256_fmadd_ps(a, b0, c[5][0]); c[5][1] = _mm256_fmadd_ps(a, b1, c[5][1]);
    }
    for (int i = 0; i < 6; ++i) {
        _mm256_storeu_ps(C + i * ldc, c[i][0]);
        _mm256_storeu_ps(C + i * ldc + 8, c[i][1]);
    }
}

/* the same with AVX-512: C[8 x 32], B 32 floats per k, 16 accumulators */
INLINE AVX512 void kernel_8x32(int64_t kc, const float *A, int64_t lda, const float *B, float *C, int64_t ldc, const float *init, int accum) {
    __m512 c[8][2];
    if (accum) {
        for (int i = 0; i < 8; ++i) {
            c[i][0] = _mm512_loadu_ps(C + i * ldc);
            c[i][1] = _mm512_loadu_ps(C + i * ldc + 16);
        }
    } else {
        const __m512 z0 = init ? _mm512_loadu_ps(init) : _mm512_setzero_ps();
        const __m512 z1 = init ? _mm512_loadu_ps(init + 16) : _mm512_setzero_ps();
        for (int i = 0; i < 8; ++i) { c[i][0] = z0; c[i][1] = z1; }
    }
#pragma GCC unroll 2
    for (int64_t k = 0; k < kc; ++k, B += 32) {
        const __m512 b0 = _mm512_load_ps(B), b1 = _mm512_load_ps(B + 16);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
            const __m512 a = _mm512_set1_ps(A[i * lda + k]);
            c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
            c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
        }
    }
    for (int i = 0; i < 8; ++i) {
        _mm512_storeu_ps(C + i * ldc, c[i][0]);
        _mm512_storeu_ps(C + i * ldc + 16, c[i][1]);
    }
}

/* ------------------------------------------------------------------------- epilogue */

/* exp(x) for x <= 0 (Cephes' expf: Cody-Waite reduction by ln 2 and a degree-6
 * polynomial, within 2 ulp); below -87 the result is 0 */
INLINE AVX2 __m256 exp_neg8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* GELU, x * (1 + erf(x / sqrt 2)) / 2, with erf by Abramowitz and Stegun 7.1.26 (absolute
 * error below 1.5e-7), the formula PyTorch's vectorised erf uses */
INLINE AVX2 __m256 gelu8(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
    const __m256 s = _mm256_and_ps(sign, z), a = _mm256_xor_ps(s, z);
    const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
    __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
    const __m256 e = exp_neg8(_mm256_xor_ps(sign, _mm256_mul_ps(z, z)));
    const __m256 erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(e, t), r, one);
    const __m256 erf = _mm256_xor_ps(s, erf_abs);
    return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(one, erf));
}

/* one row of n values of y: += residual, then the activation. Eight at a time; the last
 * few through a padded copy, so that every value gets the same arithmetic wherever it is */
static AVX2 void epilogue_row(float *y, int64_t n, const float *res, int act) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(y + i);
        if (res) v = _mm256_add_ps(v, _mm256_loadu_ps(res + i));
        if (act == GOBO_ACT_GELU) v = gelu8(v);
        _mm256_storeu_ps(y + i, v);
    }
    if (i < n) {
        float tmp[8] = {0}, rt[8] = {0};
        memcpy(tmp, y + i, sizeof(float) * (size_t)(n - i));
        if (res) memcpy(rt, res + i, sizeof(float) * (size_t)(n - i));
        __m256 v = _mm256_loadu_ps(tmp);
        if (res) v = _mm256_add_ps(v, _mm256_loadu_ps(rt));
        if (act == GOBO_ACT_GELU) v = gelu8(v);
        _mm256_storeu_ps(tmp, v);
        memcpy(y + i, tmp, sizeof(float) * (size_t)(n - i));
    }
}

/* the eight lanes of v added pairwise, in one fixed order */
INLINE AVX2 float hsum8(__m256 v) {
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

/* sum of the n floats at y (n >= 0), in four 8-wide partial sums then the tail */
INLINE AVX2 float sum_row(const float *y, int64_t n, float shift, int square) {
    const __m256 c = _mm256_set1_ps(shift);
    __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int u = 0; u < 4; ++u) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(y + i + 8 * u), c);
            s[u] = square ? _mm256_fmadd_ps(d, d, s[u]) : _mm256_add_ps(s[u], d);
        }
    for (; i + 8 <= n; i += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(y + i), c);
        s[0] = square ? _mm256_fmadd_ps(d, d, s[0]) : _mm256_add_ps(s[0], d);
    }
    float total = hsum8(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])));
    for (; i < n; ++i) {
        const float d = y[i] - shift;
        total += square ? d * d : d;
    }
    return total;
}

/* LayerNorm of one row of n values in place: (y - mean) / sqrt(var + eps) * w + b, the
 * variance about the mean (two passes); w, b NULL: 1 and 0 */
static AVX2 void layer_norm_row(float *y, int64_t n, const float *w, const float *b, float eps) {
    const float mean = sum_row(y, n, 0.0f, 0) / (float)n;
    const float var = sum_row(y, n, mean, 1) / (float)n;
    const float rstd = 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(var + eps)));
    const __m256 m8 = _mm256_set1_ps(mean), r8 = _mm256_set1_ps(rstd);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(y + i), m8), r8);
        if (w) v = _mm256_mul_ps(v, _mm256_loadu_ps(w + i));
        if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + i));
        _mm256_storeu_ps(y + i, v);
    }
    for (; i < n; ++i) {
        float v = (y[i] - mean) * rstd;
        if (w) v *= w[i];
        if (b) v += b[i];
        y[i] = v;
    }
}

/* the last, ragged rows of x [0, mr) x [0, kc) (row stride ldx) copied into a zero-padded
 * MR x kc block (row stride kc) */
static void pad_a(const float *x, int64_t ldx, int64_t mr, int64_t kc, float *ap, int MR) {
    memset(ap, 0, sizeof(float) * (size_t)(MR * kc));
    for (int64_t i = 0; i < mr; ++i) memcpy(ap + i * kc, x + i * ldx, sizeof(float) * (size_t)kc);
}

/* 8 x 8 transpose in registers: v[i] (eight k's of row i) -> eight panel rows of 8 floats at
 * p, p + NR, ... (the eighth of an NR-wide panel row that rows i belong to) */
INLINE AVX2 void store_8x8_transposed(__m256 *v, float *p, const int NR) {
    __m256 u0 = _mm256_unpacklo_ps(v[0], v[1]), u1 = _mm256_unpackhi_ps(v[0], v[1]), u2 = _mm256_unpacklo_ps(v[2], v[3]), u3 = _mm256_unpackhi_ps(v[2], v[3]);
    __m256 u4 = _mm256_unpacklo_ps(v[4], v[5]), u5 = _mm256_unpackhi_ps(v[4], v[5]), u6 = _mm256_unpacklo_ps(v[6], v[7]), u7 = _mm256_unpackhi_ps(v[6], v[7]);
    __m256 w0 = _mm256_shuffle_ps(u0, u2, 0x44), w1 = _mm256_shuffle_ps(u0, u2, 0xEE), w2 = _mm256_shuffle_ps(u1, u3, 0x44), w3 = _mm256_shuffle_ps(u1, u3, 0xEE);
    __m256 w4 = _mm256_shuffle_ps(u4, u6, 0x44), w5 = _mm256_shuffle_ps(u4, u6, 0xEE), w6 = _mm256_shuffle_ps(u5, u7, 0x44), w7 = _mm256_shuffle_ps(u5, u7, 0xEE);
    _mm256_store_ps(p + 0 * NR, _mm256_permute2f128_ps(w0, w4, 0x20));
    _mm256_store_ps(p + 1 * NR, _mm256_permute2f128_ps(w1, w5, 0x20));
    _mm256_store_ps(p + 2 * NR, _mm256_permute2f128_ps(w2, w6, 0x20));
    _mm256_store_ps(p + 3 * NR, _mm256_permute2f128_ps(w3, w7, 0x20));
    _mm256_store_ps(p + 4 * NR, _mm256_permute2f128_ps(w0, w4, 0x31));
    _mm256_store_ps(p + 5 * NR, _mm256_permute2f128_ps(w1, w5, 0x31));
    _mm256_store_ps(p + 6 * NR, _mm256_permute2f128_ps(w2, w6, 0x31));
    _mm256_store_ps(p + 7 * NR, _mm256_permute2f128_ps(w3, w7, 0x31));
}

/* The panel (K x NR) of rows [r0, r0 + nr), nr <= NR, decoded straight from the codes, for
 * b <= 4 and K a multiple of 8: every row then starts on a byte, eight of its codes are b
 * bytes, and each row's 2**b decoded values fit one (b <= 3) or two registers. For every
 * eight k's, eight codes of each of the NR rows are looked up through the row's own table and
 * each eighth of the panel rows (8 x 8) is transposed in registers, so every panel row is
 * written whole. Rows past nr come out zero; the outliers of the rows are written in
 * afterwards. The same bits as gobo_decode_rows, without its row buffer. */
INLINE AVX2 void decode_panel_b(const gobo_qmat *q, int64_t r0, int64_t nr, float *panel, const int b, const int NR) {
    const int64_t K = q->cols;
    const int64_t row_bytes = K / 8 * b;
    const __m256i mask = _mm256_set1_epi32((1 << b) - 1);
    const __m256i sh = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    float lut[NR_MAX][16] __attribute__((aligned(32)));
    const uint8_t *p[NR_MAX];
    for (int i = 0; i < NR; ++i) {
        const int64_t r = r0 + i;
        memset(lut[i], 0, sizeof lut[i]);
        if (i < nr) gobo_row_lut(q, r, lut[i]);
        p[i] = q->codes + (i < nr ? r : r0) * row_bytes;
    }
    float *dst = panel;
    for (int64_t kb = 0; kb < K / 8; ++kb, dst += 8 * NR) {
        for (int h = 0; h < NR / 8; ++h) {
            __m256 v[8];
            for (int i = 0; i < 8; ++i) {
                const int row = 8 * h + i;
                uint32_t w;
                if (b == 4) memcpy(&w, p[row] + kb * 4, 4);
                else if (b == 3) { uint16_t lo; memcpy(&lo, p[row] + kb * 3, 2); w = lo | (uint32_t)p[row][kb * 3 + 2] << 16; }
                else if (b == 2) { uint16_t lo; memcpy(&lo, p[row] + kb * 2, 2); w = lo; }
                else w = p[row][kb];
                const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), mask);
                if (b <= 3) {
                    v[i] = _mm256_permutevar8x32_ps(_mm256_load_ps(lut[row]), idx);
                } else {
                    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(lut[row]), idx);
                    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(lut[row] + 8), idx);
                    v[i] = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                }
            }
            store_8x8_transposed(v, dst + 8 * h, NR);
        }
    }
    if (q->n_outliers) {
        const int64_t stop = (r0 + nr) * K;
        for (int64_t i = gobo_outlier_lower_bound(q, r0 * K); i < q->n_outliers; ++i) {
            const int64_t pos = outlier_pos(q, i);
            if (pos >= stop) break;
            const int64_t r = pos / K;
            panel[(pos - r * K) * NR + (r - r0)] = q->outlier_value[i];
        }
    }
}

INLINE AVX2 void decode_panel(const gobo_qmat *q, int64_t r0, int64_t nr, float *panel, const int NR) {
    switch (q->bits) {
        case 1: decode_panel_b(q, r0, nr, panel, 1, NR); break;
        case 2: decode_panel_b(q, r0, nr, panel, 2, NR); break;
        case 3: decode_panel_b(q, r0, nr, panel, 3, NR); break;
        default: decode_panel_b(q, r0, nr, panel, 4, NR); break;
    }
}

/* panel (k x NR, contiguous) = transpose of rows (NR x K, stride K), columns [0, K) */
INLINE AVX2 void transpose_rows(const float *rows, int64_t K, float *panel, const int NR) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int h = 0; h < NR / 8; ++h) {
            const float *r = rows + (int64_t)(8 * h) * K + k;
            __m256 v[8];
            for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(r + i * K);
            store_8x8_transposed(v, panel + k * NR + 8 * h, NR);
        }
    for (; k < K; ++k)
        for (int j = 0; j < NR; ++j) panel[k * NR + j] = rows[(int64_t)j * K + k];
}

/* per-thread scratch: panels (NC x K), NR decoded rows (NR x K), a padded strip of A, an edge tile of C */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
typedef struct { float *buf; int64_t cap; } qg_scratch;
static void scratch_free(void *p) { qg_scratch *s = p; if (s) { free(s->buf); free(s); } }
static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

static float *scratch(int64_t n) {
    pthread_once(&scratch_once, scratch_init);
    qg_scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s) return NULL;
        pthread_setspecific(scratch_key, s);
    }
    if (s->cap < n) {
        free(s->buf);
        s->buf = aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64));
        s->cap = s->buf ? n : 0;
    }
    return s->buf;
}

/* output features [n_lo, n_hi) of the job, with an MR x NR kernel (6 x 16: AVX2, 8 x 32: AVX-512) */
INLINE AVX2 int run_part_t(const qg_job *j, int64_t n_lo, int64_t n_hi, const int MR, const int NR,
                           void (*kernel)(int64_t, const float *, int64_t, const float *, float *, int64_t, const float *, int)) {
    const gobo_qmat *q = j->q;
    const int64_t K = q->cols, M = j->m;
    const int64_t kpad = (K + 7) / 8 * 8;
    float *buf = scratch(NC * kpad + NR_MAX * kpad + MR_MAX * KC + MR_MAX * NR_MAX + NR_MAX);
    if (!buf) return 2;
    const int direct = q->bits <= 4 && K % 8 == 0; /* decode_panel applies */
    const int epilogue = j->res || j->act;
    float *panels = buf, *rows = panels + NC * kpad, *apad = rows + NR_MAX * kpad, *ctmp = apad + MR_MAX * KC, *itmp = ctmp + MR_MAX * NR_MAX;
    for (int64_t n0 = n_lo; n0 < n_hi; n0 += NC) {
        const int64_t nc = n_hi - n0 < NC ? n_hi - n0 : NC;
        const int64_t np = (nc + NR - 1) / NR;
        for (int64_t p = 0; p < np; ++p) {
            const int64_t r0 = n0 + p * NR, r1 = r0 + NR < n0 + nc ? r0 + NR : n0 + nc;
            if (direct) {
                decode_panel(q, r0, r1 - r0, panels + p * kpad * NR, NR);
                continue;
            }
            if (gobo_decode_rows(q, r0, r1, rows, K, 1)) return 1;
            if (r1 - r0 < NR) memset(rows + (r1 - r0) * K, 0, sizeof(float) * (size_t)((NR - (r1 - r0)) * K));
            transpose_rows(rows, K, panels + p * kpad * NR, NR);
        }
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = K - k0 < KC ? K - k0 : KC;
            const int accum = k0 > 0, last = k0 + kc == K;
            for (int64_t mc0 = 0; mc0 < M; mc0 += MC) { /* MC rows of x stay in L2 ... */
                const int64_t mend = M - mc0 < MC ? M : mc0 + MC;
                for (int64_t p = 0; p < np; ++p) { /* ... while one panel slice stays near L1 */
                    const int64_t c0 = n0 + p * NR;
                    const int64_t ncol = n0 + nc - c0 < NR ? n0 + nc - c0 : NR;
                    const float *B = panels + p * kpad * NR + k0 * NR;
                    const float *init = NULL;
                    if (!accum && j->bias) {
                        if (ncol == NR) init = j->bias + c0;
                        else {
                            memset(itmp, 0, sizeof(float) * NR_MAX);
                            memcpy(itmp, j->bias + c0, sizeof(float) * (size_t)ncol);
                            init = itmp;
                        }
                    }
                    for (int64_t m0 = mc0; m0 < mend; m0 += MR) {
                        const int64_t mr = mend - m0 < MR ? mend - m0 : MR;
                        float *C = j->y + m0 * j->ldy + c0;
                        if (mr == MR && ncol == NR) {
                            if (m0 + 2 * MR <= mend) { /* the next tile of y: from L3 on large batches */
                                const float *Cn = C + MR * j->ldy;
                                for (int i = 0; i < MR; ++i) {
                                    _mm_prefetch((const char *)(Cn + i * j->ldy), _MM_HINT_T0);
                                    _mm_prefetch((const char *)(Cn + i * j->ldy + NR - 1), _MM_HINT_T0);
                                }
                            }
                            kernel(kc, j->x + m0 * j->ldx + k0, j->ldx, B, C, j->ldy, init, accum);
                        } else {
                            /* edge tile: ragged rows through a zero-padded copy, columns through a buffer */
                            const float *A = j->x + m0 * j->ldx + k0;
                            int64_t lda = j->ldx;
                            if (mr < MR) {
                                pad_a(A, j->ldx, mr, kc, apad, MR);
                                A = apad;
                                lda = kc;
                            }
                            if (accum)
                                for (int64_t i = 0; i < mr; ++i) memcpy(ctmp + i * NR, C + i * j->ldy, sizeof(float) * (size_t)ncol);
                            kernel(kc, A, lda, B, ctmp, NR, init, accum);
                            for (int64_t i = 0; i < mr; ++i) memcpy(C + i * j->ldy, ctmp + i * NR, sizeof(float) * (size_t)ncol);
                        }
                        if (last && epilogue)
                            for (int64_t i = 0; i < mr; ++i)
                                epilogue_row(C + i * j->ldy, ncol, j->res ? j->res + (m0 + i) * j->ldres + c0 : NULL, j->act);
                    }
                }
            }
        }
    }
    return 0;
}

static AVX2 void kernel_avx2(int64_t kc, const float *A, int64_t lda, const float *B, float *C, int64_t ldc, const float *init, int accum) {
    kernel_6x16(kc, A, lda, B, C, ldc, init, accum);
}
static AVX512 void kernel_avx512(int64_t kc, const float *A, int64_t lda, const float *B, float *C, int64_t ldc, const float *init, int accum) {
    kernel_8x32(kc, A, lda, B, C, ldc, init, accum);
}
static AVX2 int run_part_avx2(const qg_job *j, int64_t lo, int64_t hi) { return run_part_t(j, lo, hi, 6, 16, kernel_avx2); }
static AVX512 int run_part_avx512(const qg_job *j, int64_t lo, int64_t hi) { return run_part_t(j, lo, hi, 8, 32, kernel_avx512); }
static int run_part(const qg_job *j, int64_t lo, int64_t hi) { return j->isa == QG_AVX512 ? run_part_avx512(j, lo, hi) : run_part_avx2(j, lo, hi); }

static int have_avx512(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = gobo_kernels_simd() && __builtin_cpu_supports("avx512f");
    }
    return cached;
}

/* ------------------------------------------------------------------------- attention */

/* one row of scores in place: x = s * scale + mask over [0, n) (mask read every mstride
 * floats; NULL: none), then exp(x - max x) / sum, and zeros over [n, npad). A row whose x are
 * all -inf comes out zero. */
static AVX2 void softmax_row(float *s, int64_t n, int64_t npad, float scale, const float *mask, int64_t mstride) {
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 mx8 = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    if (!mask || mstride == 1) {
        for (; j + 8 <= n; j += 8) {
            __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), sc);
            if (mask) x = _mm256_add_ps(x, _mm256_loadu_ps(mask + j));
            _mm256_storeu_ps(s + j, x);
            mx8 = _mm256_max_ps(mx8, x);
        }
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, mx8);
    float mx = lanes[0];
    for (int i = 1; i < 8; ++i) mx = lanes[i] > mx ? lanes[i] : mx;
    for (; j < n; ++j) {
        s[j] = s[j] * scale + (mask ? mask[j * mstride] : 0.0f);
        mx = s[j] > mx ? s[j] : mx;
    }
    if (mx == -INFINITY) {
        memset(s, 0, sizeof(float) * (size_t)npad);
        return;
    }
    const __m256 m8 = _mm256_set1_ps(mx);
    __m256 sum8 = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    if (j < n) { /* the tail through a padded copy: the same arithmetic as the rest */
        float t[8];
        for (int i = 0; i < 8; ++i) t[i] = j + i < n ? s[j + i] - mx : -INFINITY;
        const __m256 e = exp_neg8(_mm256_loadu_ps(t));
        _mm256_storeu_ps(t, _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(_mm256_loadu_ps(t), _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ)));
        for (int i = 0; j + i < n; ++i) s[j + i] = t[i];
        sum8 = _mm256_add_ps(sum8, _mm256_loadu_ps(t));
    }
    const float sum = hsum8(sum8);
    const __m256 r8 = _mm256_set1_ps(1.0f / sum);
    for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), r8));
    for (; j < n; ++j) s[j] *= 1.0f / sum;
    for (j = n; j < npad; ++j) s[j] = 0.0f;
}

/* the attention of one (batch, head) with the MR x NR kernel: the scores q k^T by the GEMM
 * kernel against panels of k^T, a softmax per row, then the rows of probabilities by the
 * kernel against panels of v, written straight into out */
INLINE AVX2 int attention_task_t(const qa_job *j, int64_t b, int64_t h, const int MR, const int NR,
                                 void (*kernel)(int64_t, const float *, int64_t, const float *, float *, int64_t, const float *, int)) {
    const int64_t SQ = j->SQ, SK = j->SK, D = j->D;
    const int64_t skp = (SK + NR - 1) / NR * NR, dp = (D + NR - 1) / NR * NR, sqp = (SQ + MR - 1) / MR * MR;
    float *buf = scratch(D * skp + sqp * skp + SK * dp + MR * D + MR * NR);
    if (!buf) return 2;
    float *kt = buf, *p = kt + D * skp, *vp = p + sqp * skp, *apad = vp + SK * dp, *ctmp = apad + MR * D;
    const float *Q = j->q + b * j->qs[0] + h * j->qs[1], *K = j->k + b * j->ks[0] + h * j->ks[1], *V = j->v + b * j->vs[0] + h * j->vs[1];
    const float *Mk = j->mask ? j->mask + b * j->ms[0] + h * j->ms[1] : NULL;
    float *O = j->out + b * j->os[0] + h * j->os[1];
    for (int64_t c = 0; c < skp; ++c) { /* k^T in panels of NR keys: panel[d * NR + key] */
        float *dst = kt + (c / NR) * D * NR + c % NR;
        const float *kr = K + c * j->ks[2];
        for (int64_t d = 0; d < D; ++d) dst[d * NR] = c < SK ? kr[d] : 0.0f;
    }
    for (int64_t i0 = 0; i0 < SQ; i0 += MR) {
        const int64_t mr = SQ - i0 < MR ? SQ - i0 : MR;
        const float *A = Q + i0 * j->qs[2];
        int64_t lda = j->qs[2];
        if (mr < MR) {
            pad_a(A, lda, mr, D, apad, MR);
            A = apad;
            lda = D;
        }
        for (int64_t pn = 0; pn < skp / NR; ++pn) kernel(D, A, lda, kt + pn * D * NR, p + i0 * skp + pn * NR, skp, NULL, 0);
    }
    for (int64_t i = 0; i < SQ; ++i) softmax_row(p + i * skp, SK, skp, j->scale, Mk ? Mk + i * j->ms[2] : NULL, j->ms[3]);
    if (sqp > SQ) memset(p + SQ * skp, 0, sizeof(float) * (size_t)((sqp - SQ) * skp));
    for (int64_t c = 0; c < SK; ++c) { /* v in panels of NR features: panel[key * NR + feature] */
        const float *vr = V + c * j->vs[2];
        for (int64_t pn = 0; pn < dp / NR; ++pn) {
            float *dst = vp + pn * SK * NR + c * NR;
            for (int64_t e = 0; e < NR; ++e) dst[e] = pn * NR + e < D ? vr[pn * NR + e] : 0.0f;
        }
    }
    for (int64_t i0 = 0; i0 < SQ; i0 += MR) {
        const int64_t mr = SQ - i0 < MR ? SQ - i0 : MR;
        for (int64_t pn = 0; pn < dp / NR; ++pn) {
            const int64_t d0 = pn * NR, nc = D - d0 < NR ? D - d0 : NR;
            float *C = O + i0 * j->os[2] + d0;
            if (mr == MR && nc == NR) {
                kernel(SK, p + i0 * skp, skp, vp + pn * SK * NR, C, j->os[2], NULL, 0);
            } else {
                kernel(SK, p + i0 * skp, skp, vp + pn * SK * NR, ctmp, NR, NULL, 0);
                for (int64_t r = 0; r < mr; ++r) memcpy(C + r * j->os[2], ctmp + r * NR, sizeof(float) * (size_t)nc);
            }
        }
    }
    return 0;
}

static AVX2 int attention_task_avx2(const qa_job *j, int64_t b, int64_t h) { return attention_task_t(j, b, h, 6, 16, kernel_avx2); }
static AVX512 int attention_task_avx512(const qa_job *j, int64_t b, int64_t h) { return attention_task_t(j, b, h, 8, 32, kernel_avx512); }
static int attention_task(const qa_job *j, int64_t b, int64_t h) {
    return j->isa == QG_AVX512 ? attention_task_avx512(j, b, h) : attention_task_avx2(j, b, h);
}

#else
static int attention_task(const qa_job *j, int64_t b, int64_t h) { (void)j; (void)b; (void)h; return 3; }
static int run_part(const qg_job *j, int64_t n_lo, int64_t n_hi) { (void)j; (void)n_lo; (void)n_hi; return 3; }
static int have_avx512(void) { return 0; }
#endif

static void run_thread(qg_job *j, int t) {
    const int64_t N = j->q->rows;
    const int64_t lo = (int64_t)t * j->n_per, hi = lo + j->n_per < N ? lo + j->n_per : N;
    j->status[t] = lo < hi ? run_part(j, lo, hi) : 0;
}

/* thread t of a team of `team` working on job j: its parts t, t + team, ... (all parts run
 * even when fewer threads came than parts), then, with a LayerNorm, a wait for the whole team
 * (every row of y complete) and the LayerNorm of its share of the rows */
static void job_member(qg_job *j, int t, int team) {
    for (int p = t; p < j->nthreads; p += team) run_thread(j, p);
    if (!j->ln) return;
    if (team > 1) {
        __atomic_add_fetch(&j->arrived, 1, __ATOMIC_ACQ_REL);
        while (__atomic_load_n(&j->arrived, __ATOMIC_ACQUIRE) < team) {
#if QG_X86
            _mm_pause();
#endif
        }
    }
#if QG_X86
    const int64_t lo = j->m * t / team, hi = j->m * (t + 1) / team;
    for (int64_t i = lo; i < hi; ++i) layer_norm_row(j->y + i * j->ldy, j->q->rows, j->ln_w, j->ln_b, j->ln_eps);
#endif
}

static void gemm_member(void *arg, int t, int team) { job_member(arg, t, team); }

/* ------------------------------------------------------------------------- thread pool */

/* work for a team of threads: member(arg, t, team) runs on each thread t of the team that
 * came (team <= want; the caller is thread 0) and must do all the work whatever team is */
typedef struct {
    void (*member)(void *arg, int t, int team);
    void *arg;
    int want;
    int team;
} qg_task;

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;   /* guards the fields below */
static pthread_cond_t pool_go = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;   /* one GEMM at a time uses the pool */
static int pool_size;          /* workers started (thread ids 1..pool_size) */
static uint64_t pool_gen;
static qg_task *pool_task;
static int pool_pending;

typedef struct { int id; uint64_t gen; } qg_start;

static void *worker(void *arg) {
    /* the generation at creation: a job posted right after counts this worker in */
    const qg_start st = *(qg_start *)arg;
    free(arg);
    const int id = st.id;
    uint64_t seen = st.gen;
    pthread_mutex_lock(&pool_mu);
    for (;;) {
        while (pool_gen == seen) pthread_cond_wait(&pool_go, &pool_mu);
        seen = pool_gen;
        qg_task *tk = pool_task;
        pthread_mutex_unlock(&pool_mu);
        if (id < tk->team) tk->member(tk->arg, id, tk->team);
        pthread_mutex_lock(&pool_mu);
        if (--pool_pending == 0) pthread_cond_signal(&pool_done);
    }
    return NULL;
}

/* The host's OpenMP runtime (torch's libgomp), when the caller hands it over: the GEMM then
 * runs on the same team of threads as torch's own operators. Two sets of threads on the same
 * cores fight: OpenMP workers spin for a while after each of torch's operators, so pool
 * workers woken meanwhile wait for a core, and the other way round. */
typedef void (*omp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static omp_parallel_fn host_parallel;
static omp_int_fn host_thread_num, host_num_threads;

static void fork_init(void);
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

GOBO_API void gobo_qgemm_use_openmp(void *gomp_parallel, void *omp_get_thread_num, void *omp_get_num_threads) {
    pthread_once(&fork_once, fork_init);
    if (gomp_parallel && omp_get_thread_num && omp_get_num_threads) {
        host_thread_num = (omp_int_fn)omp_get_thread_num;
        host_num_threads = (omp_int_fn)omp_get_num_threads;
        host_parallel = (omp_parallel_fn)gomp_parallel;
    } else {
        host_parallel = NULL;
    }
}

/* 1 when gobo_qgemm runs on the host's OpenMP team, 0 on gobo's own pool */
GOBO_API int gobo_qgemm_openmp(void) { return host_parallel != NULL; }

static void team_body(void *arg) {
    /* the runtime may grant fewer threads than asked (a nested region gets one) */
    qg_task *tk = arg;
    tk->member(tk->arg, host_thread_num(), host_num_threads());
}

static void after_fork_child(void) {
    host_parallel = NULL; /* GNU libgomp's threads do not survive fork(); the pool restarts */
    /* the workers do not exist in a forked child: start afresh */
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&call_mu, NULL);
    pthread_cond_init(&pool_go, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_size = 0;
    pool_pending = 0;
}
static void fork_init(void) { pthread_atfork(NULL, NULL, after_fork_child); }

/* start workers up to `want` (caller holds pool_mu); returns how many exist */
static int grow_pool(int want) {
    while (pool_size < want) {
        pthread_t th;
        pthread_attr_t at;
        qg_start *st = malloc(sizeof *st);
        if (!st) break;
        st->id = pool_size + 1;
        st->gen = pool_gen;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &at, worker, st);
        pthread_attr_destroy(&at);
        if (rc) { free(st); break; }
        ++pool_size;
    }
    return pool_size;
}

/* runs tk on up to tk->want threads: torch's OpenMP team where handed over, else the pool
 * (one task at a time), the caller always among them */
static void run_team(qg_task *tk) {
    if (tk->want <= 1) {
        tk->member(tk->arg, 0, 1);
        return;
    }
    pthread_once(&fork_once, fork_init);
    if (host_parallel) {
        host_parallel(team_body, tk, (unsigned)tk->want, 0);
        return;
    }
    pthread_mutex_lock(&call_mu);
    pthread_mutex_lock(&pool_mu);
    const int have = grow_pool(tk->want - 1) + 1;
    tk->team = have < tk->want ? have : tk->want;
    if (tk->team > 1) {
        pool_task = tk;
        pool_pending = pool_size;
        ++pool_gen;
        pthread_cond_broadcast(&pool_go);
    }
    pthread_mutex_unlock(&pool_mu);
    tk->member(tk->arg, 0, tk->team);
    pthread_mutex_lock(&pool_mu);
    while (pool_pending > 0) pthread_cond_wait(&pool_done, &pool_mu);
    pthread_mutex_unlock(&pool_mu);
    pthread_mutex_unlock(&call_mu);
}

/* ------------------------------------------------------------------------- entry points */

/* 2 when gobo_qgemm's default kernel is the AVX-512 one, 1 when it is the AVX2 one, 0 when
 * neither runs on this CPU */
GOBO_API int gobo_qgemm_isa(void) { return have_avx512() ? QG_AVX512 : (gobo_kernels_simd() ? QG_AVX2 : 0); }

/* the kernel an entry point runs: isa 0 is the fastest this CPU runs; 0 when this CPU lacks
 * AVX2/FMA or the asked-for isa */
static int resolve_isa(int32_t isa) {
    if (!gobo_kernels_simd()) return 0;
    if (isa == 0) isa = gobo_qgemm_isa();
    if ((isa == QG_AVX512 && !have_avx512()) || (isa != QG_AVX2 && isa != QG_AVX512)) return 0;
    return isa;
}

/* threads for `parts` units of work: the caller's nthreads within [1, MAX_THREADS], no more than parts */
static int clamp_threads(int32_t nthreads, int64_t parts) {
    int t = nthreads < 1 ? 1 : (nthreads > MAX_THREADS ? MAX_THREADS : nthreads);
    return t > parts ? (int)parts : t;
}

/* y (m x rows, row stride ldy) = act(x (m x cols, row stride ldx) W^T + bias + res), with W
 * decoded from q, on up to nthreads threads. bias (rows values) and res (m x rows, row stride
 * ldres) may be NULL; act is 0 (none) or 1 (GELU, erf form); ln 1 then normalises each row
 * of y (LayerNorm: ln_w and ln_b hold rows values, or are NULL for 1 and 0; ln_eps > 0 is
 * added to the variance), once the whole row is summed, by the same threads after they wait
 * for each other (no second pass of threads); isa is 0 (the fastest this CPU
 * runs), 1 (AVX2) or 2 (AVX-512): all give the same bits but GELU's, which are the same for
 * a given isa. Returns 0; 1 on bad arguments; 2 when out of memory; 3 when this CPU lacks
 * AVX2/FMA (gobo_kernels_simd() tells beforehand: the caller computes another way) or the
 * asked-for isa. */
GOBO_API int gobo_qgemm(const gobo_qmat *q, const float *x, int64_t m, int64_t ldx, float *y, int64_t ldy, const float *bias,
                        const float *res, int64_t ldres, int32_t act, int32_t ln, const float *ln_w, const float *ln_b, float ln_eps,
                        int32_t isa, int32_t nthreads) {
    if (!(isa = resolve_isa(isa))) return 3;
    if (gobo_qmat_check(q) || !x || !y || m < 0 || ldx < q->cols || ldy < q->rows || (res && ldres < q->rows) || act < 0 || act > GOBO_ACT_GELU ||
        (ln != 0 && ln != 1) || (ln && !(ln_eps > 0.0f))) return 1;
    if (m == 0 || q->rows == 0) return 0;
    if (q->cols == 0) { /* an empty sum: the bias alone */
        for (int64_t i = 0; i < m; ++i) {
            for (int64_t n = 0; n < q->rows; ++n) y[i * ldy + n] = bias ? bias[n] : 0.0f;
#if QG_X86
            if (res || act) epilogue_row(y + i * ldy, q->rows, res ? res + i * ldres : NULL, act);
            if (ln) layer_norm_row(y + i * ldy, q->rows, ln_w, ln_b, ln_eps);
#endif
        }
        return 0;
    }
    const int nr = isa == QG_AVX512 ? 32 : 16;
    qg_job j = {.q = q, .x = x, .m = m, .ldx = ldx, .y = y, .ldy = ldy, .bias = bias, .res = res, .ldres = ldres, .act = act, .isa = isa,
                .ln = ln, .ln_w = ln_w, .ln_b = ln_b, .ln_eps = ln_eps};
    const int64_t panels = (q->rows + nr - 1) / nr;
    const int t = clamp_threads(nthreads, panels);
    j.n_per = (panels + t - 1) / t * nr;
    j.nthreads = (int)((q->rows + j.n_per - 1) / j.n_per);
    qg_task tk = {.member = gemm_member, .arg = &j, .want = j.nthreads};
    run_team(&tk);
    for (int i = 0; i < j.nthreads; ++i)
        if (j.status[i]) return j.status[i];
    return 0;
}

static void attention_member(void *arg, int t, int team) {
    /* pairs are claimed one at a time, so that a thread that woke late takes fewer */
    qa_job *j = arg;
    (void)team;
    for (int64_t task; (task = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED)) < j->B * j->H;) {
        const int rc = attention_task(j, task / j->H, task % j->H);
        if (rc) j->status[t] = rc;
    }
}

/* out = softmax(q k^T * scale + mask) v for B x H (batch, head) pairs: q (SQ x D), k and v
 * (SK x D) and out (SQ x D) per pair, each tensor given by its strides in floats (qs, ks, vs,
 * os: batch, head, position; the D features contiguous), mask (NULL, or SQ x SK per pair,
 * strides ms: batch, head, query, key, 0 where broadcast) added to the scaled scores. The
 * pairs are shared among up to nthreads threads (the GEMM's); every output is computed by
 * the same code whatever the thread count. A query whose scores are all -inf gets zeros.
 * isa as for gobo_qgemm. Returns 0; 1 on bad arguments; 2 when out of memory; 3 when this
 * CPU lacks AVX2/FMA or the asked-for isa. */
GOBO_API int gobo_attention(const float *q, const int64_t *qs, const float *k, const int64_t *ks, const float *v, const int64_t *vs,
                            const float *mask, const int64_t *ms, float *out, const int64_t *os, int64_t B, int64_t H, int64_t SQ,
                            int64_t SK, int64_t D, float scale, int32_t isa, int32_t nthreads) {
    if (!(isa = resolve_isa(isa))) return 3;
    if (!q || !qs || !k || !ks || !v || !vs || !out || !os || (mask && !ms) || B < 0 || H < 0 || SQ < 0 || SK < 1 || D < 1) return 1;
    if (B == 0 || H == 0 || SQ == 0) return 0;
    qa_job j = {.q = q, .k = k, .v = v, .mask = mask, .out = out, .B = B, .H = H, .SQ = SQ, .SK = SK, .D = D, .scale = scale, .isa = isa};
    for (int i = 0; i < 3; ++i) {
        j.qs[i] = qs[i];
        j.ks[i] = ks[i];
        j.vs[i] = vs[i];
        j.os[i] = os[i];
    }
    for (int i = 0; i < 4; ++i) j.ms[i] = mask ? ms[i] : 0;
    const int t = clamp_threads(nthreads, B * H);
    qg_task tk = {.member = attention_member, .arg = &j, .want = t};
    run_team(&tk);
    for (int i = 0; i < t; ++i)
        if (j.status[i]) return j.status[i];
    return 0;
}
