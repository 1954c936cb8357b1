/* gobo CPU kernels: decode packed b-bit weights (see gobo/packing.py and gobo/qtensor.py)
 * into float32 rows, called through ctypes from gobo/kernels.py.
 *
 * The decoded values are bit-identical to QuantizedTensor.dequantize():
 *
 *     v = codebook[r / group_rows][code]      (float32)
 *     v = v * row_scale[r]                    (if present; float16 widened exactly)
 *     v = v + row_offset[r]                   (if present)
 *     v.flat[outlier_index] = outlier_value
 *
 * Because the two row operations depend only on (row, code), they are applied once per row
 * to the 2**bits codebook entries (a per-row lookup table, built without fused multiply-add
 * so that the rounding matches numpy); decoding a row is then a pure table lookup. Outliers
 * are written over the decoded rows afterwards.
 *
 * Three decoders produce the same bits: a bit-by-bit reference, a portable one that reads
 * eight codes (exactly b bytes) as one 64-bit word, and an AVX2 one, selected at run time with
 * __builtin_cpu_supports, that extracts eight codes with variable shifts and looks them up
 * with in-register permutes (b <= 5; the word path is faster for wider codes).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GOBO_X86 1
#else
#define GOBO_X86 0
#endif

#ifndef AVX2_MAX_BITS
#define AVX2_MAX_BITS 5 /* wider codes use the portable word path even with AVX2 */
#endif

#include "gobo_api.h"
#include "qmat.h"

/* ------------------------------------------------------------------------- helpers */

static float half_to_float(uint16_t h) {
    /* exact IEEE binary16 -> binary32 widening (normals, subnormals, inf, nan) */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; ++e; } while (!(man & 0x400u));
            man &= 0x3FFu;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float stat_at(const void *p, int f16, int64_t r) {
    return f16 ? half_to_float(((const uint16_t *)p)[r]) : ((const float *)p)[r];
}

/* lut[j] = ((codebook[g][j] * scale) + offset), each step rounded to float32, as numpy does.
 * The multiply and the add must not be fused into one FMA (that would round once). */
#if defined(__clang__)
#define NO_CONTRACT
#elif defined(__GNUC__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif

NO_CONTRACT void gobo_row_lut(const gobo_qmat *q, int64_t r, float *lut) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    const int k = 1 << q->bits;
    const float *cb = q->codebook + (r / q->group_rows) * (int64_t)k;
    if (!q->row_scale && !q->row_offset) {
        memcpy(lut, cb, sizeof(float) * (size_t)k);
        return;
    }
    const float s = q->row_scale ? stat_at(q->row_scale, q->stats_f16, r) : 1.0f;
    const float o = q->row_offset ? stat_at(q->row_offset, q->stats_f16, r) : 0.0f;
    if (q->row_scale && q->row_offset) {
        for (int j = 0; j < k; ++j) lut[j] = cb[j] * s + o;
    } else if (q->row_scale) {
        for (int j = 0; j < k; ++j) lut[j] = cb[j] * s;
    } else {
        for (int j = 0; j < k; ++j) lut[j] = cb[j] + o;
    }
}

static inline uint32_t code_at(const uint8_t *codes, int64_t nbytes, int64_t bitpos, int bits) {
    int64_t byte = bitpos >> 3;
    int shift = (int)(bitpos & 7);
    uint32_t v = codes[byte];
    if (shift + bits > 8 && byte + 1 < nbytes) v |= (uint32_t)codes[byte + 1] << 8;
    return (v >> shift) & ((1u << bits) - 1u);
}

/* codes [c0, c1) of the row starting at stream bit `base` */
static void decode_span_scalar(const gobo_qmat *q, int64_t base, int64_t c0, int64_t c1, const float *lut, float *dst) {
    const int b = q->bits;
    for (int64_t c = c0; c < c1; ++c) dst[c] = lut[code_at(q->codes, q->nbytes, base + c * b, b)];
}

static void decode_row_scalar(const gobo_qmat *q, int64_t r, const float *lut, float *dst) {
    decode_span_scalar(q, r * q->cols * q->bits, 0, q->cols, lut, dst);
}

/* Portable fast path: eight codes are exactly b bytes, so once a row reaches a byte-aligned
 * code, every group of eight is one little-endian 64-bit word (b constant after inlining). */
static inline __attribute__((always_inline)) void decode_row_word_b(const gobo_qmat *q, int64_t r, const float *lut, float *dst, const int b) {
    const int64_t cols = q->cols;
    const int64_t base = r * cols * b;
    int64_t c = 0;
    while (c < cols && c < 8 && ((base + c * b) & 7)) ++c;
    if (c >= cols || ((base + c * b) & 7)) { decode_span_scalar(q, base, 0, cols, lut, dst); return; }
    decode_span_scalar(q, base, 0, c, lut, dst);
    const uint8_t *p = q->codes + ((base + c * b) >> 3);
    const uint8_t *end = q->codes + q->nbytes;
    const uint64_t mask = (1u << b) - 1u;
    for (; c + 8 <= cols && p + 8 <= end; c += 8, p += b) {
        uint64_t w;
        memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        float *d = dst + c;
        d[0] = lut[w & mask];
        d[1] = lut[(w >> b) & mask];
        d[2] = lut[(w >> (2 * b)) & mask];
        d[3] = lut[(w >> (3 * b)) & mask];
        d[4] = lut[(w >> (4 * b)) & mask];
        d[5] = lut[(w >> (5 * b)) & mask];
        d[6] = lut[(w >> (6 * b)) & mask];
        d[7] = lut[(w >> (7 * b)) & mask];
    }
    decode_span_scalar(q, base, c, cols, lut, dst);
}

static void decode_row_word(const gobo_qmat *q, int64_t r, const float *lut, float *dst) {
    switch (q->bits) {
        case 1: decode_row_word_b(q, r, lut, dst, 1); break;
        case 2: decode_row_word_b(q, r, lut, dst, 2); break;
        case 3: decode_row_word_b(q, r, lut, dst, 3); break;
        case 4: decode_row_word_b(q, r, lut, dst, 4); break;
        case 5: decode_row_word_b(q, r, lut, dst, 5); break;
        case 6: decode_row_word_b(q, r, lut, dst, 6); break;
        case 7: decode_row_word_b(q, r, lut, dst, 7); break;
        default: decode_row_word_b(q, r, lut, dst, 8); break;
    }
}

/* ------------------------------------------------------------------------- AVX2 */
#if GOBO_X86
#define AVX2 __attribute__((target("avx2,fma")))

static inline __attribute__((always_inline)) AVX2 __m256 lookup_avx2(__m256i idx, const __m256 *t, const float *lut, int b) {
    if (b <= 3) return _mm256_permutevar8x32_ps(t[0], idx);
    if (b >= 7) return _mm256_i32gather_ps(lut, idx, 4);
    /* b = 4, 5, 6: 2, 4 or 8 permutes, then a binary tree of blends on bits 3, 4, 5 */
    __m256 v[8];
    const int n = 1 << (b - 3);
    for (int i = 0; i < n; ++i) v[i] = _mm256_permutevar8x32_ps(t[i], idx);
    for (int lvl = 3; lvl < b; ++lvl) {
        __m256 m = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 31 - lvl));
        const int half = 1 << (b - lvl - 1);
        for (int i = 0; i < half; ++i) v[i] = _mm256_blendv_ps(v[2 * i], v[2 * i + 1], m);
    }
    return v[0];
}

static inline __attribute__((always_inline)) AVX2 void decode_row_avx2_b(const gobo_qmat *q, int64_t r, const float *lut, float *dst, const int b) {
    const int64_t cols = q->cols;
    const int64_t base = r * cols * b;
    /* first code whose stream position is byte aligned (exists within 8 codes for every b) */
    int64_t c = 0;
    while (c < cols && c < 8 && ((base + c * b) & 7)) ++c;
    if (c >= cols || ((base + c * b) & 7)) { decode_span_scalar(q, base, 0, cols, lut, dst); return; }
    decode_span_scalar(q, base, 0, c, lut, dst);
    __m256 t[8];
    const int ntab = b <= 3 ? 1 : (b <= 6 ? 1 << (b - 3) : 0);
    float padded[8] = {0};
    if (b < 3) { /* 2 or 4 entries: pad to 8 */
        memcpy(padded, lut, sizeof(float) * (size_t)(1 << b));
        t[0] = _mm256_loadu_ps(padded);
    } else {
        for (int i = 0; i < ntab; ++i) t[i] = _mm256_loadu_ps(lut + 8 * i);
    }
    const __m256i mask = _mm256_set1_epi32((1 << b) - 1);
    const __m256i sh_lo = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    const __m256i sh_hi = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 0, b, 2 * b, 3 * b);
    const uint8_t *p = q->codes + ((base + c * b) >> 3);
    const uint8_t *end = q->codes + q->nbytes;
    /* eight codes = b bytes; the loads read 4 (b <= 4) or 8 bytes, which must stay inside */
    const int load = b <= 4 ? 4 : 8;
    for (; c + 8 <= cols && p + load <= end; c += 8, p += b) {
        __m256i idx;
        if (b <= 4) {
            uint32_t w;
            memcpy(&w, p, 4);
            idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh_lo), mask);
        } else {
            uint64_t w;
            memcpy(&w, p, 8);
            __m256i v = _mm256_set_m128i(_mm_set1_epi32((int)(uint32_t)(w >> (4 * b))), _mm_set1_epi32((int)(uint32_t)w));
            idx = _mm256_and_si256(_mm256_srlv_epi32(v, sh_hi), mask);
        }
        _mm256_storeu_ps(dst + c, lookup_avx2(idx, t, lut, b));
    }
    decode_span_scalar(q, base, c, cols, lut, dst);
}

static AVX2 void decode_row_avx2(const gobo_qmat *q, int64_t r, const float *lut, float *dst) {
    switch (q->bits) {
        case 1: decode_row_avx2_b(q, r, lut, dst, 1); break;
        case 2: decode_row_avx2_b(q, r, lut, dst, 2); break;
        case 3: decode_row_avx2_b(q, r, lut, dst, 3); break;
        case 4: decode_row_avx2_b(q, r, lut, dst, 4); break;
        case 5: decode_row_avx2_b(q, r, lut, dst, 5); break;
        case 6: decode_row_avx2_b(q, r, lut, dst, 6); break;
        case 7: decode_row_avx2_b(q, r, lut, dst, 7); break;
        default: decode_row_avx2_b(q, r, lut, dst, 8); break;
    }
}

static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached;
}
#else
static int have_avx2(void) { return 0; }
static void decode_row_avx2(const gobo_qmat *q, int64_t r, const float *lut, float *dst) { decode_row_scalar(q, r, lut, dst); }
#endif

/* simd: 0 = reference bit-by-bit C, 1 = fastest available, 2 = portable word path,
 * 3 = AVX2 path (falls back to the word path without AVX2) */
static int decode_mode(int32_t simd) {
    if (simd == 3 || simd == 1) return have_avx2() ? simd : 2;
    return simd == 2 ? 2 : 0;
}

static void decode_row(const gobo_qmat *q, int64_t r, const float *lut, float *dst, int mode) {
    if (mode == 3 || (mode == 1 && q->bits <= AVX2_MAX_BITS)) decode_row_avx2(q, r, lut, dst);
    else if (mode) decode_row_word(q, r, lut, dst);
    else decode_row_scalar(q, r, lut, dst);
}

/* ------------------------------------------------------------------------- outliers */

int64_t gobo_outlier_lower_bound(const gobo_qmat *q, int64_t flat) {
    int64_t lo = 0, hi = q->n_outliers;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (outlier_pos(q, mid) < flat) lo = mid + 1; else hi = mid;
    }
    return lo;
}

int gobo_qmat_check(const gobo_qmat *q) {
    if (!q || q->bits < 1 || q->bits > 8 || q->rows < 0 || q->cols < 0 || q->group_rows < 1) return 1;
    if (q->nbytes != (q->rows * q->cols * q->bits + 7) / 8) return 1;
    return 0;
}

/* ------------------------------------------------------------------------- entry points */

/* 1 when the AVX2 decoder is used on this CPU, 0 for the portable one. */
GOBO_API int gobo_kernels_simd(void) { return have_avx2(); }

/* Decode rows [r0, r1) into dst (row i at dst + (i - r0) * ld). simd = 0 forces the
 * portable path. Returns 0, or 1 on bad arguments. */
GOBO_API int gobo_decode_rows(const gobo_qmat *q, int64_t r0, int64_t r1, float *dst, int64_t ld, int32_t simd) {
    if (gobo_qmat_check(q) || r0 < 0 || r1 > q->rows || r0 > r1 || ld < q->cols) return 1;
    float lut[256];
    const int mode = decode_mode(simd);
    const int per_row = q->row_scale || q->row_offset;
    int64_t built = -1; /* codebook group the table holds, when no row statistics */
    for (int64_t r = r0; r < r1; ++r) {
        if (per_row || built != r / q->group_rows) {
            gobo_row_lut(q, r, lut);
            built = r / q->group_rows;
        }
        float *d = dst + (r - r0) * ld;
        decode_row(q, r, lut, d, mode);
    }
    if (q->n_outliers && r1 > r0) {
        const int64_t stop = r1 * q->cols;
        for (int64_t i = gobo_outlier_lower_bound(q, r0 * q->cols); i < q->n_outliers; ++i) {
            int64_t pos = outlier_pos(q, i);
            if (pos >= stop) break;
            int64_t r = pos / q->cols;
            dst[(r - r0) * ld + (pos - r * q->cols)] = q->outlier_value[i];
        }
    }
    return 0;
}

/* Decode the listed rows (an embedding lookup): row ids[i] goes to dst + i * cols.
 * Returns 0, 1 on bad arguments, or 2 when an id is out of range (nothing is promised
 * about dst then). */
GOBO_API int gobo_decode_row_list(const gobo_qmat *q, const int64_t *ids, int64_t n, float *dst, int32_t simd) {
    if (gobo_qmat_check(q) || n < 0) return 1;
    for (int64_t i = 0; i < n; ++i)
        if (ids[i] < 0 || ids[i] >= q->rows) return 2;
    float lut[256];
    const int mode = decode_mode(simd);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t r = ids[i];
        float *d = dst + i * q->cols;
        gobo_row_lut(q, r, lut);
        decode_row(q, r, lut, d, mode);
        if (q->n_outliers) {
            const int64_t stop = (r + 1) * q->cols;
            for (int64_t j = gobo_outlier_lower_bound(q, r * q->cols); j < q->n_outliers; ++j) {
                int64_t pos = outlier_pos(q, j);
                if (pos >= stop) break;
                d[pos - r * q->cols] = q->outlier_value[j];
            }
        }
    }
    return 0;
}
