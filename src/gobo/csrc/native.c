/* gobo native routines, called through ctypes (the GIL is released during calls).
 *
 * kmeans1d_exact: globally optimal 1-D k-means (minimal sum of squared errors) of sorted
 * data by dynamic programming, D_k[i] = min_j D_{k-1}[j] + cost(j, i), with the
 * divide-and-conquer speed-up that the monotone optimal split allows: O(k n log n) time,
 * O(k n) 32-bit split table.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "gobo_api.h"

typedef struct {
    const double *s1; /* prefix sums of x, length n + 1 */
    const double *s2; /* prefix sums of x^2 */
    const double *prev;
    double *cur;
    int32_t *opt;
} dp_ctx;

static inline double seg_cost(const dp_ctx *c, int64_t j, int64_t i) {
    /* squared error of x[j:i] around its mean; i > j */
    double s = c->s1[i] - c->s1[j];
    double q = c->s2[i] - c->s2[j];
    double v = q - s * s / (double)(i - j);
    return v > 0.0 ? v : 0.0;
}

static void dc_fill(const dp_ctx *c, int64_t lo, int64_t hi, int64_t jlo, int64_t jhi) {
    /* fill cur[i] for i in [lo, hi], knowing opt(i) lies in [jlo, jhi] */
    while (lo <= hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int64_t jend = jhi < mid - 1 ? jhi : mid - 1;
        double best = INFINITY;
        int64_t bj = jlo;
        for (int64_t j = jlo; j <= jend; ++j) {
            double v = c->prev[j] + seg_cost(c, j, mid);
            if (v < best) { best = v; bj = j; }
        }
        c->cur[mid] = best;
        c->opt[mid] = (int32_t)bj;
        /* recurse on the smaller side, loop on the other to bound the stack */
        if (mid - lo < hi - mid) {
            dc_fill(c, lo, mid - 1, jlo, bj);
            lo = mid + 1; jlo = bj;
        } else {
            dc_fill(c, mid + 1, hi, bj, jhi);
            hi = mid - 1; jhi = bj;
        }
    }
}

/* x: n sorted values; k clusters (1 <= k <= n).
 * Writes k centroids (ascending) and k+1 boundaries (bounds[0] = 0, bounds[k] = n).
 * Returns 0 on success, 1 on bad arguments, 2 when out of memory. */
GOBO_API int gobo_kmeans1d_exact(const double *x, int64_t n, int32_t k, double *centroids, int64_t *bounds) {
    if (n <= 0 || k <= 0 || k > n || n >= INT32_MAX) return 1;
    double *s1 = malloc(sizeof(double) * (size_t)(n + 1));
    double *s2 = malloc(sizeof(double) * (size_t)(n + 1));
    double *a = malloc(sizeof(double) * (size_t)(n + 1));
    double *b = malloc(sizeof(double) * (size_t)(n + 1));
    int32_t *opt = malloc(sizeof(int32_t) * (size_t)k * (size_t)(n + 1));
    if (!s1 || !s2 || !a || !b || !opt) { free(s1); free(s2); free(a); free(b); free(opt); return 2; }
    /* centre the data: prefix sums of squares stay well conditioned */
    double mean = 0.0;
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= (double)n;
    s1[0] = 0.0; s2[0] = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        double v = x[i] - mean;
        s1[i + 1] = s1[i] + v;
        s2[i + 1] = s2[i] + v * v;
    }
    dp_ctx c = {s1, s2, NULL, NULL, NULL};
    /* layer 1: one cluster over x[0:i] */
    a[0] = INFINITY;
    for (int64_t i = 1; i <= n; ++i) { a[i] = seg_cost(&c, 0, i); opt[i] = 0; }
    opt[0] = 0;
    double *prev = a, *cur = b;
    for (int32_t m = 2; m <= k; ++m) {
        int32_t *o = opt + (size_t)(m - 1) * (size_t)(n + 1);
        for (int64_t i = 0; i < m; ++i) { cur[i] = INFINITY; o[i] = 0; }
        c.prev = prev; c.cur = cur; c.opt = o;
        dc_fill(&c, m, n, m - 1, n - 1);
        double *t = prev; prev = cur; cur = t;
    }
    /* backtrack the splits */
    bounds[k] = n;
    int64_t i = n;
    for (int32_t m = k; m >= 1; --m) {
        int64_t j = opt[(size_t)(m - 1) * (size_t)(n + 1) + i];
        if (m == 1) j = 0;
        bounds[m - 1] = j;
        centroids[m - 1] = (s1[i] - s1[j]) / (double)(i - j) + mean;
        i = j;
    }
    free(s1); free(s2); free(a); free(b); free(opt);
    return 0;
}

/* Bit packing, format v1 (see gobo/packing.py): code i occupies stream bits [i*b, (i+1)*b),
 * LSB first; stream bit j is bit j % 8 of byte j / 8. out must hold ceil(n*b/8) bytes.
 * Eight codes fill exactly b bytes: they are gathered in one 64-bit word and stored (or
 * loaded) together, the last n % 8 a bit at a time. */
GOBO_API void gobo_pack_codes(const uint8_t *codes, int64_t n, int32_t bits, uint8_t *out) {
    const int64_t whole = n / 8;
    for (int64_t g = 0; g < whole; ++g) {
        const uint8_t *c = codes + 8 * g;
        uint64_t acc = 0;
        for (int k = 0; k < 8; ++k) acc |= (uint64_t)c[k] << (k * bits);
        uint8_t *o = out + g * bits;
        for (int k = 0; k < bits; ++k) o[k] = (uint8_t)(acc >> (8 * k));
    }
    uint64_t acc = 0;
    int filled = 0;
    int64_t o = whole * bits;
    for (int64_t i = whole * 8; i < n; ++i) {
        acc |= (uint64_t)codes[i] << filled;
        filled += bits;
        while (filled >= 8) {
            out[o++] = (uint8_t)(acc & 0xFF);
            acc >>= 8;
            filled -= 8;
        }
    }
    if (filled > 0) out[o++] = (uint8_t)(acc & 0xFF);
}

GOBO_API void gobo_unpack_codes(const uint8_t *packed, int64_t n, int32_t bits, uint8_t *out) {
    const uint64_t mask = (1u << bits) - 1u;
    const int64_t whole = n / 8;
    for (int64_t g = 0; g < whole; ++g) {
        const uint8_t *p = packed + g * bits;
        uint64_t acc = 0;
        for (int k = 0; k < bits; ++k) acc |= (uint64_t)p[k] << (8 * k);
        uint8_t *o = out + 8 * g;
        for (int k = 0; k < 8; ++k) o[k] = (uint8_t)((acc >> (k * bits)) & mask);
    }
    uint64_t acc = 0;
    int have = 0;
    int64_t p = whole * bits;
    for (int64_t i = whole * 8; i < n; ++i) {
        while (have < bits) {
            acc |= (uint64_t)packed[p++] << have;
            have += 8;
        }
        out[i] = (uint8_t)(acc & mask);
        acc >>= bits;
        have -= bits;
    }
}

/* byte_counts: counts[v] of the bytes of value v in x (256 of them), in four partial
 * tables so that runs of one value do not wait on their own increments. */
GOBO_API void gobo_byte_counts(const uint8_t *x, int64_t n, int64_t *counts) {
    uint32_t part[4][256];
    memset(part, 0, sizeof part);
    memset(counts, 0, 256 * sizeof *counts);
    for (int64_t s = 0; s < n; s += (int64_t)1 << 30) {  /* flushed before a partial count can wrap */
        const int64_t e = n - s < ((int64_t)1 << 30) ? n : s + ((int64_t)1 << 30);
        int64_t i = s;
        for (; i + 4 <= e; i += 4) {
            part[0][x[i]]++;
            part[1][x[i + 1]]++;
            part[2][x[i + 2]]++;
            part[3][x[i + 3]]++;
        }
        for (; i < e; ++i) part[0][x[i]]++;
        for (int v = 0; v < 256; ++v) {
            counts[v] += (int64_t)part[0][v] + part[1][v] + part[2][v] + part[3][v];
            part[0][v] = part[1][v] = part[2][v] = part[3][v] = 0;
        }
    }
}

/* A Python module with no methods, so the shared object is an importable extension. */
static struct PyModuleDef gobo_native_module = {PyModuleDef_HEAD_INIT, "_native", "gobo native routines (ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&gobo_native_module); }

/* ------------------------------------------------------------------ one codebook per row
 *
 * cluster_rows: per row, the inliers x[r, 0:n[r]] (sorted ascending; what follows them is
 * ignored) go to k centroids: equal-population bins, then Lloyd (assign to the nearest,
 * move to the mean) until the centroids stop changing or max_iter rounds. Cluster sums
 * come from the row's prefix sums and its boundaries from short walks from the round
 * before's (binary searches when they move far), so a round costs O(k) per row once the
 * boundaries settle. A row with no inliers gets k zeros; an empty cluster
 * keeps its previous centroid. c: rows x k, ascending per row. Returns 0, or 2 when out
 * of memory. */

static int64_t count_below(const float *x, int64_t n, double v) {
    /* number of x[0:n] (ascending) strictly below v */
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t m = lo + (hi - lo) / 2;
        if ((double)x[m] < v) lo = m + 1; else hi = m;
    }
    return lo;
}

static int64_t count_below_near(const float *x, int64_t n, double v, int64_t g) {
    /* count_below, walking from the guess g (the boundary of the round before, which
     * late rounds move by a few elements at most); bisection after 8 steps */
    int64_t i = g < n ? g : n;
    int32_t steps = 0;
    while (i > 0 && (double)x[i - 1] >= v) {
        if (++steps > 8) return count_below(x, n, v);
        --i;
    }
    while (i < n && (double)x[i] < v) {
        if (++steps > 8) return count_below(x, n, v);
        ++i;
    }
    return i;
}

static void sort_small(double *c, int32_t k) {
    for (int32_t i = 1; i < k; ++i) {
        double v = c[i];
        int32_t j = i - 1;
        while (j >= 0 && c[j] > v) { c[j + 1] = c[j]; --j; }
        c[j + 1] = v;
    }
}

GOBO_API int gobo_cluster_rows(const float *x, const int64_t *n, int64_t rows, int64_t cols,
                               int32_t k, int32_t max_iter, double *c) {
    double *p = (double *)malloc(sizeof(double) * (size_t)(cols + 1));
    double *nc = (double *)malloc(sizeof(double) * (size_t)k);
    int64_t *b = (int64_t *)malloc(sizeof(int64_t) * (size_t)(k + 1));
    if (!p || !nc || !b) { free(p); free(nc); free(b); return 2; }
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * cols;
        const int64_t nr = n[r];
        double *cr = c + r * k;
        p[0] = 0.0;
        for (int64_t i = 0; i < nr; ++i) p[i + 1] = p[i] + (double)xr[i];
        const double last = nr > 0 ? (double)xr[nr - 1] : 0.0;
        for (int32_t j = 0; j < k; ++j) {
            int64_t b0 = (int64_t)j * nr / k, b1 = (int64_t)(j + 1) * nr / k;
            cr[j] = b1 > b0 ? (p[b1] - p[b0]) / (double)(b1 - b0) : last;
        }
        sort_small(cr, k);
        for (int32_t j = 0; j <= k; ++j) b[j] = (int64_t)j * nr / k;
        for (int32_t it = 0; it < max_iter; ++it) {
            b[0] = 0;
            b[k] = nr;
            for (int32_t j = 1; j < k; ++j) b[j] = count_below_near(xr, nr, (cr[j - 1] + cr[j]) * 0.5, b[j]);
            for (int32_t j = 0; j < k; ++j)
                nc[j] = b[j + 1] > b[j] ? (p[b[j + 1]] - p[b[j]]) / (double)(b[j + 1] - b[j]) : cr[j];
            sort_small(nc, k);
            if (memcmp(nc, cr, sizeof(double) * (size_t)k) == 0) break;
            memcpy(cr, nc, sizeof(double) * (size_t)k);
        }
    }
    free(p); free(nc); free(b);
    return 0;
}

/* assign_rows: codes[r, i] = the number of midpoints (c[r, j] + c[r, j + 1]) / 2 strictly
 * below z[r, i], i.e. the nearest of row r's ascending centroids, ties to the lower one. */
GOBO_API void gobo_assign_rows(const float *z, const double *c, int64_t rows, int64_t cols,
                               int32_t k, uint8_t *codes) {
    double mids[256];
    for (int64_t r = 0; r < rows; ++r) {
        const double *cr = c + r * k;
        for (int32_t j = 0; j + 1 < k; ++j) mids[j] = (cr[j] + cr[j + 1]) * 0.5;
        const float *zr = z + r * cols;
        uint8_t *o = codes + r * cols;
        if (k <= 16) {
            for (int64_t i = 0; i < cols; ++i) {
                const double v = (double)zr[i];
                int32_t q = 0;
                for (int32_t j = 0; j + 1 < k; ++j) q += mids[j] < v;
                o[i] = (uint8_t)q;
            }
        } else {
            for (int64_t i = 0; i < cols; ++i) {
                const double v = (double)zr[i];
                int32_t lo = 0, hi = k - 1;
                while (lo < hi) {
                    int32_t m = (lo + hi) / 2;
                    if (mids[m] < v) lo = m + 1; else hi = m;
                }
                o[i] = (uint8_t)lo;
            }
        }
    }
}

/* drop_sorted: take values out of sorted rows. Row r of x (rows x cols) holds n[r] values
 * ascending, then +inf; counts[r] values of vals (row after row, each row's ascending) are
 * removed from it, each one where an equal value is (zeros of either sign alike: the sort
 * that made x does not keep their signs either). The rest move up in order, +inf fills the
 * end, n[r] shrinks. Returns 1 if a value is not in its row (x is then left part done),
 * else 0. */
GOBO_API int gobo_drop_sorted(float *x, int64_t *n, int64_t rows, int64_t cols, const float *vals,
                              const int64_t *counts) {
    const float *v = vals;
    for (int64_t r = 0; r < rows; ++r) {
        float *xr = x + r * cols;
        const int64_t nr = n[r], m = counts[r];
        int64_t i = 0, w = 0;
        for (int64_t j = 0; j < m; ++j) { /* keep what is below v[j], drop one equal to it */
            while (i < nr && xr[i] < v[j]) xr[w++] = xr[i++];
            if (i >= nr || xr[i] != v[j]) return 1;
            ++i;
        }
        if (m > 0) {
            while (i < nr) xr[w++] = xr[i++];
            for (int64_t t = w; t < nr; ++t) xr[t] = INFINITY;
            n[r] = w;
        }
        v += m;
    }
    return 0;
}

/* act_scores: the error of each weight coded to its row's nearest centroid (as
 * gobo_assign_rows picks it; the centroid rounded to float32, the difference taken in
 * float32), squared in double and times its column's energy e[i]; -1 where mask[r, i] is
 * set. What activation-weighted outliers are ranked by. */
GOBO_API void gobo_act_scores(const float *z, const double *c, int64_t rows, int64_t cols, int32_t k,
                              const double *e, const uint8_t *mask, double *score) {
    double mids[256];
    for (int64_t r = 0; r < rows; ++r) {
        const double *cr = c + r * k;
        for (int32_t j = 0; j + 1 < k; ++j) mids[j] = (cr[j] + cr[j + 1]) * 0.5;
        const float *zr = z + r * cols;
        const uint8_t *mr = mask + r * cols;
        double *o = score + r * cols;
        for (int64_t i = 0; i < cols; ++i) {
            const double v = (double)zr[i];
            int32_t q;
            if (k <= 16) {
                q = 0;
                for (int32_t j = 0; j + 1 < k; ++j) q += mids[j] < v;
            } else {
                int32_t lo = 0, hi = k - 1;
                while (lo < hi) {
                    int32_t m = (lo + hi) / 2;
                    if (mids[m] < v) lo = m + 1; else hi = m;
                }
                q = lo;
            }
            const double d = (double)(zr[i] - (float)cr[q]);
            o[i] = mr[i] ? -1.0 : (d * d) * e[i];
        }
    }
}

/* feedback_block: one block of error feedback with a codebook per row, in the LDL form of
 * GPTQ's update (Frantar et al. 2023; "LDLQ", Chee et al. 2023): with the damped input
 * moments written H = T D T^T, T unit upper triangular, column i is coded from its
 * fed-forward value and its error against the *original* weight, w0[i] - value, is pushed
 * onto the later columns through row i of T. w: rows x n (row stride ldw) working space,
 * first set to the block's fed-forward weights w0 + p (in double; w0 alone where p is NULL)
 * and overwritten; w0: the original weights (row stride ldw0); p: the float32 push of the
 * earlier blocks' errors (row stride ldp); t: the
 * n x n unit upper-triangular block of T (row stride ldt); cb: rows x k ascending centroids
 * (double); mask: rows x n (row stride ldm), 1 where the weight is an outlier (NULL: none); err: rows x n
 * (row stride lde) receives each error w0[i] - value rounded to float32. Each row codes
 * its columns in order: the value x goes to the nearest centroid (ties to the lower one; an
 * outlier keeps x rounded to float32 and code 0), then w[j] += (w0[i] - value) * t[i, j].
 * Rows are independent and each runs one fixed sequence of operations, so any split of the
 * rows gives the same bits; the wider vector versions chosen on CPUs that have them give the
 * same bits too (no contraction to FMA). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif
/* The nearest centroid of x (ties to the lower one): the number of midpoints strictly below
 * it. Without branches for small codebooks (a data-dependent binary search mispredicts about
 * every other step), by bisection for wide ones; both count the same midpoints. */
static inline int32_t nearest_code(const double *mids, int32_t k, double x) {
    int32_t q = 0;
    if (k <= 16) {
        for (int32_t j = 0; j + 1 < k; ++j) q += mids[j] < x;
        return q;
    }
    int32_t lo = 0, hi = k - 1;
    while (lo < hi) {
        const int32_t m = (lo + hi) / 2;
        if (mids[m] < x) lo = m + 1; else hi = m;
    }
    return lo;
}

/* nearest_code for a wide codebook c (k > 16 ascending centroids), its midpoints formed as
 * needed ((c[j] + c[j + 1]) * 0.5, the same numbers): a guess from the spacing of the ends
 * (per: (k - 1) / (c[k - 1] - c[0]), formed once per row; 0 when the ends meet), exact for a
 * uniform grid (error feedback's grids), kept when the two midpoints around it confirm it,
 * bisection otherwise. The same code as nearest_code in every case. */
static inline int32_t nearest_wide(const double *c, int32_t k, double x, double per) {
    if (per > 0) {
        const double g = (x - c[0]) * per + 0.5;
        const int32_t q = !(g > 0) ? 0 : g >= (double)(k - 1) ? k - 1 : (int32_t)g;  /* NaN: 0 */
        if ((q == 0 || (c[q - 1] + c[q]) * 0.5 < x) && (q == k - 1 || !((c[q] + c[q + 1]) * 0.5 < x))) return q;
    }
    int32_t lo = 0, hi = k - 1;
    while (lo < hi) {
        const int32_t m = (lo + hi) / 2;
        if ((c[m] + c[m + 1]) * 0.5 < x) lo = m + 1; else hi = m;
    }
    return lo;
}

/* Rows coded together by gobo_feedback_block: their chains of columns are independent, and
 * each row of t read serves all of them. */
#define FEEDBACK_ROWS 4

GOBO_API VECTOR_CLONES void gobo_feedback_block(double *w, int64_t ldw, const double *w0, int64_t ldw0,
                                  const float *p, int64_t ldp, int64_t rows,
                                  int64_t n, const double *t, int64_t ldt, const double *cb, int32_t k,
                                  const uint8_t *mask, int64_t ldm, uint8_t *codes, int64_t ldc, double *val,
                                  int64_t ldv, float *err, int64_t lde) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    double mids[FEEDBACK_ROWS][16], per[FEEDBACK_ROWS];
    for (int64_t r0 = 0; r0 < rows; r0 += FEEDBACK_ROWS) {
        const int64_t nr = rows - r0 < FEEDBACK_ROWS ? rows - r0 : FEEDBACK_ROWS;
        for (int64_t a = 0; a < nr; ++a) {  /* the rows' fed values: the weights plus the earlier blocks' push */
            double *wr = w + (r0 + a) * ldw;
            const double *w0r = w0 + (r0 + a) * ldw0;
            if (p) {
                const float *pr = p + (r0 + a) * ldp;
                for (int64_t j = 0; j < n; ++j) wr[j] = w0r[j] + (double)pr[j];
            } else {
                for (int64_t j = 0; j < n; ++j) wr[j] = w0r[j];
            }
        }
        if (k <= 16) {  /* wide codebooks form their midpoints as needed (nearest_wide) */
            for (int64_t a = 0; a < nr; ++a) {
                const double *cr = cb + (r0 + a) * k;
                for (int32_t j = 0; j + 1 < k; ++j) mids[a][j] = (cr[j] + cr[j + 1]) * 0.5;
            }
        } else {
            for (int64_t a = 0; a < nr; ++a) {
                const double *cr = cb + (r0 + a) * k;
                const double span = cr[k - 1] - cr[0];
                per[a] = span > 0 ? (double)(k - 1) / span : 0.0;
            }
        }
        for (int64_t i = 0; i < n; ++i) {
            double e[FEEDBACK_ROWS] = {0};
            for (int64_t a = 0; a < nr; ++a) {
                const int64_t r = r0 + a;
                const double x = w[r * ldw + i];
                double v;
                int32_t q = 0;
                if (mask && mask[r * ldm + i]) {
                    v = (double)(float)x;
                } else {
                    q = k <= 16 ? nearest_code(mids[a], k, x) : nearest_wide(cb + r * k, k, x, per[a]);
                    v = cb[r * k + q];
                }
                codes[r * ldc + i] = (uint8_t)q;
                val[r * ldv + i] = v;
                e[a] = w0[r * ldw0 + i] - v;
                err[r * lde + i] = (float)e[a];
            }
            const double *restrict ti = t + i * ldt;
            if (nr == FEEDBACK_ROWS) {
                double *restrict w_0 = w + r0 * ldw, *restrict w_1 = w_0 + ldw, *restrict w_2 = w_1 + ldw,
                       *restrict w_3 = w_2 + ldw;
                const double e0 = e[0], e1 = e[1], e2 = e[2], e3 = e[3];
                for (int64_t j = i + 1; j < n; ++j) {
                    const double tj = ti[j];
                    w_0[j] += e0 * tj;
                    w_1[j] += e1 * tj;
                    w_2[j] += e2 * tj;
                    w_3[j] += e3 * tj;
                }
            } else {
                for (int64_t a = 0; a < nr; ++a) {
                    double *restrict wr = w + (r0 + a) * ldw;
                    const double ea = e[a];
                    for (int64_t j = i + 1; j < n; ++j) wr[j] += ea * ti[j];
                }
            }
        }
    }
}

/* Interleaved rANS, byte-wise renormalisation (see gobo/rans.py for the format): state in
 * [L, 256 L), L = 2^23, frequencies summing to 2^14, code i in lane i % lanes. */
#define RANS_L (1u << 23)
#define RANS_PROB_BITS 14
#define RANS_M (1u << RANS_PROB_BITS)

/* Codes in, stream out (written backwards from out + cap, then moved to out). cap must be
 * at least 2 n + 4 lanes. Returns the stream's length. */
GOBO_API int64_t gobo_rans_encode(const uint8_t *codes, int64_t n, const uint16_t *freq, int32_t nsym, int32_t lanes,
                                  uint8_t *out, int64_t cap) {
    uint32_t cum[257], x[256];
    cum[0] = 0;
    for (int32_t s = 0; s < nsym; ++s) cum[s + 1] = cum[s] + freq[s];
    for (int32_t l = 0; l < lanes; ++l) x[l] = RANS_L;
    uint8_t *ptr = out + cap;
    int32_t l = n ? (int32_t)((n - 1) % lanes) : 0;
    for (int64_t i = n - 1; i >= 0; --i) {
        uint32_t s = codes[i], f = freq[s], X = x[l];
        const uint64_t xmax = (uint64_t)((RANS_L >> RANS_PROB_BITS) << 8) * f;
        /* bytes out without a branch: X < 2^31 leaves at most two above xmax >= 2^17 */
        const int out1 = X >= xmax, out2 = (uint64_t)X >= xmax << 8;
        if (ptr - out < 2) return -1;  /* out of room: the caller gives more */
        ptr[-1] = (uint8_t)(X & 0xff);
        ptr[-2] = (uint8_t)((X >> 8) & 0xff);
        ptr -= out1 + out2;
        X >>= 8 * (out1 + out2);
        x[l] = ((X / f) << RANS_PROB_BITS) + (X % f) + cum[s];
        l = l ? l - 1 : lanes - 1;
    }
    if (ptr - out < 4 * (int64_t)lanes) return -1;
    for (int32_t k = lanes - 1; k >= 0; --k) {
        ptr -= 4;
        ptr[0] = (uint8_t)x[k]; ptr[1] = (uint8_t)(x[k] >> 8); ptr[2] = (uint8_t)(x[k] >> 16); ptr[3] = (uint8_t)(x[k] >> 24);
    }
    int64_t len = (int64_t)(out + cap - ptr);
    memmove(out, ptr, (size_t)len);
    return len;
}

/* Stream in, n codes out. Returns 0, or 1 when the stream is damaged (an invalid starting
 * state, too few or too many bytes, or lanes that do not end at L). */
GOBO_API int gobo_rans_decode(const uint8_t *in, int64_t len, const uint16_t *freq, int32_t nsym, int32_t lanes, int64_t n,
                              uint8_t *out) {
    uint32_t cum[257], x[256];
    uint8_t sym[RANS_M];
    cum[0] = 0;
    for (int32_t s = 0; s < nsym; ++s) {
        cum[s + 1] = cum[s] + freq[s];
        memset(sym + cum[s], s, freq[s]);
    }
    if (len < 4 * (int64_t)lanes) return 1;
    for (int32_t k = 0; k < lanes; ++k) {
        const uint8_t *p = in + 4 * k;
        x[k] = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
        if (x[k] < RANS_L || x[k] >= (RANS_L << 8)) return 1;
    }
    const uint8_t *p = in + 4 * lanes, *end = in + len;
    int32_t l = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t X = x[l], slot = X & (RANS_M - 1), s = sym[slot];
        out[i] = (uint8_t)s;
        X = freq[s] * (X >> RANS_PROB_BITS) + slot - cum[s];
        while (X < RANS_L) {
            if (p == end) return 1;
            X = (X << 8) | *p++;
        }
        x[l] = X;
        l = l + 1 == lanes ? 0 : l + 1;
    }
    if (p != end) return 1;
    for (int32_t k = 0; k < lanes; ++k)
        if (x[k] != RANS_L) return 1;
    return 0;
}

/* The level of weight z on the grid of step c: its float32 quotient z / c (numpy's division),
 * clamped to [lo, hi] (integers), rounded half to even by the 1.5 * 2^23 sum (exact within
 * 2^22). Clamping before rounding gives what rounding, then clipping, gives. */
static inline int32_t level_of(float z, float c, float lo, float hi) {
    float q = z / c;
    q = q < lo ? lo : q;
    q = q > hi ? hi : q;
    return (int32_t)((q + 12582912.0f) - 12582912.0f);
}

/* grid_levels: each weight of w (rows x cols, row stride ldw) rounded to its row's grid
 * (level_of, step step[r]): code level + grid where the level lies in -grid .. grid - 1, else
 * code grid (level 0) and beyond[i] = 1. Returns the number of weights beyond the grid. */
GOBO_API VECTOR_CLONES int64_t gobo_grid_levels(const float *w, int64_t rows, int64_t cols, int64_t ldw,
                                                const float *step, int32_t grid, uint8_t *codes, uint8_t *beyond) {
    const float lo = (float)(-grid - 1), hi = (float)grid;
    int64_t far = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const float *x = w + r * ldw;
        const float s = step[r];
        uint8_t *c = codes + r * cols, *b = beyond + r * cols;
        int64_t n = 0;
        for (int64_t i = 0; i < cols; ++i) {
            const int32_t l = level_of(x[i], s, lo, hi);
            const int32_t out = (l < -grid) | (l > grid - 1);
            b[i] = (uint8_t)out;
            c[i] = (uint8_t)(out ? grid : l + grid);
            n += out;
        }
        far += n;
    }
    return far;
}

/* sorted_level_counts: counts[1 + grid + l] of the weights of ascending zs whose level
 * (level_of, step c) is l, for l from -grid to grid - 1; counts[0] and counts[2 grid + 1]
 * those below and above (the grid step search's histogram). A weight's level never falls as
 * the weight grows, so the weights of each level are one run of zs: its end is found by
 * bisection (a few thousand quotients, not n). */
GOBO_API void gobo_sorted_level_counts(const float *zs, int64_t n, float c, int32_t grid, int64_t *counts) {
    const float lo = (float)(-grid - 1), hi = (float)grid;
    int64_t start = 0;
    for (int32_t l = -grid - 1; l < grid; ++l) {
        int64_t a = start, b = n;  /* the first index whose level exceeds l lies in [a, b] */
        while (a < b) {
            const int64_t m = a + (b - a) / 2;
            if (level_of(zs[m], c, lo, hi) > l) b = m; else a = m + 1;
        }
        counts[l + grid + 1] = a - start;
        start = a;
    }
    counts[2 * grid + 1] = n - start;
}
