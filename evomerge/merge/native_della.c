/* DELLA's fused CPU kernel in C, so that its histogram lookup is a vector gather.
 *
 * Why by hand: inductor emits an indirect load as sixteen scalar loads through a stack buffer, and
 * that lookup (one per entry and source) was half of DELLA's compiled kernel. GCC and Clang
 * vectorise the loops below, the lookup included (vpgatherdd on AVX2 / AVX-512). (TIES and
 * DARE-TIES written the same way, K + 1 passes through L1, were slower than inductor's kernels on
 * whole models; native_merge.c keeps each entry's K values in registers in one pass instead.)
 *
 * The arithmetic is kernels._della_value's, operation for operation in float32 (compiled with
 * -ffp-contract=off, so no multiply-add is fused), and the draws are evomerge.merge.draws' hash:
 * the output is bit-identical to the compiled kernel's, which the tests check.
 *
 * One call merges entries [lo, hi) of one draw segment on nthreads OpenMP threads; positions (the
 * draws' counters) are indices from the segment's start.
 */
#include "native_common.h"

#define BLOCK 256 /* entries per pass: K x BLOCK float32 temporaries stay in L1 */
#define KMAX 16

/* Arguments, per source k < K: scale[k] (histogram bins per unit |tau|), a[k] = density - epsilon,
 * pmin[k] / pmax[k] (the keep probability's clamp: 0 / 1, both 0 at density <= 0 and both 1 at
 * density >= 1), coef[k] (the task vector's weight), w[k] (what normalize divides by); cdf is
 * K x bins; keys are the draws' keys, one per pair of sources. d's rows are dstride apart. */
#define DELLA_KERNEL(NAME, T, LOAD, STORE)                                                                   \
    int NAME(const T *restrict b, const T *restrict d, int64_t dstride, int K, int64_t lo, int64_t hi,       \
             const int32_t *restrict keys, const float *restrict cdf, int bins, const float *restrict scale, \
             const float *restrict a, const float *restrict pmin, const float *restrict pmax, float two_eps, \
             const float *restrict coef, const float *restrict w, float lam, int normalize, int ties,        \
             int inverse, T *restrict out, int nthreads) {                                                   \
        if (K < 1 || K > KMAX || bins < 1) return -1;                                                        \
        const float top = (float)(bins - 1);                                                                 \
        const int64_t nblocks = (hi - lo + BLOCK - 1) / BLOCK;                                               \
        /* libgomp.so.1 is torch's, loaded already: its threads are warm, Python's would sleep */            \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)")                  \
        for (int64_t j = 0; j < nblocks; j++) {                                                              \
            float wd[KMAX][BLOCK];                                                                           \
            float sum[BLOCK], el[BLOCK], num[BLOCK], dv[BLOCK];                                              \
            uint32_t hb[BLOCK];                                                                              \
            const int64_t s = lo + j * BLOCK;                                                                \
            const int m = (int)(hi - s < BLOCK ? hi - s : BLOCK);                                            \
            for (int k = 0; k < K; k++) {                                                                    \
                const T *dk = d + k * dstride + s;                                                           \
                const float *ck = cdf + (int64_t)k * bins;                                                   \
                const float sc = scale[k], ak = a[k], lok = pmin[k], hik = pmax[k], cf = coef[k];            \
                const int shift = (k & 1) ? 16 : 0;                                                          \
                float *wk = wd[k];                                                                           \
                if (!(k & 1)) { /* one hash per pair of sources */                                           \
                    const uint32_t key = (uint32_t)keys[k / 2];                                              \
                    for (int i = 0; i < m; i++) hb[i] = pair_hash((uint32_t)(s + i) + key);                 \
                }                                                                                            \
                for (int i = 0; i < m; i++) {                                                                \
                    const float x = LOAD(dk, i);                                                             \
                    float q = as_f32(as_u32(x) & 0x7FFFFFFFu) * sc;                                          \
                    q = q >= 0.0f ? q : 0.0f; /* a NaN goes to bin 0, as in the eager ranks */               \
                    q = q <= top ? q : top;                                                                  \
                    float p = ak + two_eps * ck[(int32_t)q];                                                 \
                    p = p < lok ? lok : p;                                                                   \
                    p = p > hik ? hik : p;                                                                   \
                    const uint32_t bits = (hb[i] >> shift) & 0xFFFFu;                                        \
                    const float u = (float)(int32_t)bits * (1.0f / 65536.0f);                                \
                    const float v = inverse ? x / p : x;                                                     \
                    wk[i] = u < p ? v * cf : 0.0f;                                                           \
                }                                                                                            \
            }                                                                                                \
            const T *bs = b + s;                                                                             \
            T *os = out + s;                                                                                 \
            for (int i = 0; i < m; i++) sum[i] = wd[0][i];                                                   \
            for (int k = 1; k < K; k++) {                                                                    \
                const float *wk = wd[k];                                                                     \
                for (int i = 0; i < m; i++) sum[i] = sum[i] + wk[i];                                         \
            }                                                                                                \
            if (!ties) {                                                                                     \
                for (int i = 0; i < m; i++) os[i] = STORE(LOAD(bs, i) + sum[i] * lam);                       \
                continue;                                                                                    \
            }                                                                                                \
            for (int i = 0; i < m; i++) {                                                                    \
                el[i] = sum[i] >= 0.0f ? 1.0f : -1.0f;                                                       \
                num[i] = 0.0f;                                                                               \
                dv[i] = 0.0f;                                                                                \
            }                                                                                                \
            for (int k = 0; k < K; k++) {                                                                    \
                const float *wk = wd[k];                                                                     \
                const float wt = w[k];                                                                       \
                for (int i = 0; i < m; i++) {                                                                \
                    const float xe = wk[i] * el[i];                                                          \
                    num[i] = num[i] + (xe < 0.0f ? 0.0f : xe); /* NaN stays NaN, as torch.clamp_min */       \
                    dv[i] = dv[i] + (xe > 0.0f ? wt : 0.0f);                                                 \
                }                                                                                            \
            }                                                                                                \
            if (normalize) {                                                                                 \
                for (int i = 0; i < m; i++) {                                                                \
                    const float nm = num[i] * el[i];                                                         \
                    os[i] = STORE(LOAD(bs, i) + nm / (dv[i] == 0.0f ? 1.0f : dv[i]) * lam);                  \
                }                                                                                            \
            } else {                                                                                         \
                for (int i = 0; i < m; i++) os[i] = STORE(LOAD(bs, i) + num[i] * el[i] * lam);               \
            }                                                                                                \
        }                                                                                                    \
        return 0;                                                                                            \
    }

DELLA_KERNEL(della_bf16, uint16_t, load_bf16, store_bf16)
DELLA_KERNEL(della_f32, float, load_f32, store_f32)
