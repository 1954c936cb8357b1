/* A quantized matrix as the C kernels see it; mirrored by gobo.kernels.QMat (ctypes). */
#ifndef GOBO_QMAT_H
#define GOBO_QMAT_H
#include <stdint.h>
#include "gobo_api.h"

typedef struct {
    const uint8_t *codes;      /* packed LSB-first bit stream, nbytes bytes */
    int64_t nbytes;
    int64_t rows;
    int64_t cols;
    int64_t group_rows;        /* rows sharing one codebook row */
    const float *codebook;     /* (ceil(rows / group_rows), 2**bits) */
    const void *row_scale;     /* NULL, or rows values: float32, or float16 when stats_f16 */
    const void *row_offset;    /* NULL, or like row_scale */
    const void *outlier_index; /* sorted flat positions: int32 when index32, else int64 */
    const float *outlier_value;
    int64_t n_outliers;
    int32_t bits;
    int32_t stats_f16;
    int32_t index32;
    int32_t pad_;
} gobo_qmat;

/* kernels.c: 1 when this CPU has AVX2 and FMA (the SIMD decoders and the GEMM run) */
GOBO_API int gobo_kernels_simd(void);

/* kernels.c: decode rows [r0, r1) into dst (row stride ld); 0 on success */
GOBO_API int gobo_decode_rows(const gobo_qmat *q, int64_t r0, int64_t r1, float *dst, int64_t ld, int32_t simd);

/* kernels.c, internal: the 2**bits decoded values of row r's codes (codebook, then row
 * statistics, rounded as numpy does) */
void gobo_row_lut(const gobo_qmat *q, int64_t r, float *lut);
/* kernels.c, internal: 1 when the fields are out of range or the code stream does not hold
 * exactly rows x cols x bits bits, else 0 */
int gobo_qmat_check(const gobo_qmat *q);
/* kernels.c, internal: index of the first outlier at flat position >= flat */
int64_t gobo_outlier_lower_bound(const gobo_qmat *q, int64_t flat);
static inline int64_t outlier_pos(const gobo_qmat *q, int64_t i) {
    return q->index32 ? (int64_t)((const int32_t *)q->outlier_index)[i] : ((const int64_t *)q->outlier_index)[i];
}
#endif
