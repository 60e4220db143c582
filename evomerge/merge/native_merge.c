/* The hot merge operators in C, over many tensors in one call (a "segment" table).
 *
 * Why: a resident candidate of a 134M-parameter model is ~110 tensors. Calling a compiled kernel per
 * tensor costs ~50 us of dispatch each, and the per-tensor Python around it as much again: 20-30 ms a
 * candidate, a third of the memory-bandwidth floor. One call here merges every tensor of the model on
 * torch's OpenMP threads, work split in equal chunks across tensors. The loops are written for GCC's
 * and Clang's vectoriser: one pass per entry with the K task vectors in registers (K is a compile-time
 * constant of each variant, 1..KMAX), branch-free selects, no conditional loads.
 *
 * The arithmetic is evomerge.merge.kernels' bodies (_ta_body, _dare_body, _ties_body, _dare_ties_body)
 * operation for operation in float32, compiled with -ffp-contract=off (no fused multiply-add), and the
 * draws are evomerge.merge.draws' hash: the output is bit-identical to the compiled kernels', which
 * the tests check.
 */
#include <stdlib.h>

#include "native_common.h"

#define KMAX 8
#define CHUNK 16384 /* entries per work item: 32-64 KB of each stream */

enum { OP_LINEAR = 0, OP_TIES = 1, OP_DARE = 2, OP_DARE_TIES = 3 };

/* One tensor (or one draw segment of a tensor). Mirrored by native.SEGMENT (numpy, aligned). */
typedef struct {
    int64_t b, d, out;          /* addresses of the base, the first task vector and the output */
    int64_t n, dstride, pos0;   /* entries; entries between task vector rows; draw position of entry 0 */
    int32_t op, normalize;
    float lam, bscale;          /* lambda (TIES variants); the base's factor (OP_LINEAR) */
    float coef[KMAX], w[KMAX], thr[KMAX];
    int32_t below[KMAX], keys[KMAX / 2];
} seg_t;

int seg_size(void) { return (int)sizeof(seg_t); }


/* kernels._ties_value on x[0..K): base + lam * (disjoint sum of the entries that agree with the
 * elected sign), divided by the agreeing weights' sum when NORM */
#define TIES_TAIL(x, K, w, NORM, lam, bv, out)                    \
    do {                                                         \
        float s_ = x[0];                                         \
        for (int k = 1; k < K; k++) s_ = s_ + x[k];              \
        const float el_ = s_ >= 0.0f ? 1.0f : -1.0f;             \
        float num_ = 0.0f, dv_ = 0.0f;                           \
        for (int k = 0; k < K; k++) {                            \
            const float xe_ = x[k] * el_;                        \
            num_ = num_ + (xe_ < 0.0f ? 0.0f : xe_); /* NaN stays NaN, as torch.clamp_min */ \
            if (NORM) dv_ = dv_ + (xe_ > 0.0f ? w[k] : 0.0f);    \
        }                                                        \
        num_ = num_ * el_;                                       \
        if (NORM) num_ = num_ / (dv_ == 0.0f ? 1.0f : dv_);      \
        out = bv + num_ * lam;                                   \
    } while (0)

/* Source k's 16 draw bits from the pair hashes h (draws.source_bits) */
#define DRAW_BITS(h, k) ((int32_t)((h[(k) / 2] >> (((k) & 1) * 16)) & 0xFFFFu))

#define HASHES(h, K, ky, pos)                                                     \
    uint32_t h[(K + 1) / 2];                                                      \
    for (int p = 0; p < (K + 1) / 2; p++) h[p] = pair_hash((uint32_t)(pos) + ky[p])

/* Each variant copies its per-segment constants to locals first: the loop then keeps them in
 * registers instead of reloading through a pointer the compiler cannot prove unaliased. */
#define VARIANTS(T, LD, ST, K)                                                                            \
    static void lin_##T##_##K(const seg_t *g, int64_t off, int64_t m) {                                  \
        const T *restrict b = (const T *)g->b + off, *restrict d = (const T *)g->d + off;                \
        T *restrict o = (T *)g->out + off;                                                                \
        const int64_t ds = g->dstride;                                                                    \
        const float bs = g->bscale;                                                                       \
        float c[K];                                                                                       \
        for (int k = 0; k < K; k++) c[k] = g->coef[k];                                                    \
        for (int64_t i = 0; i < m; i++) {                                                                 \
            float acc = LD(b, i) * bs;                                                                    \
            for (int k = 0; k < K; k++) acc = acc + LD(d + k * ds, i) * c[k];                             \
            o[i] = ST(acc);                                                                               \
        }                                                                                                 \
    }                                                                                                     \
    static void dare_##T##_##K(const seg_t *g, int64_t off, int64_t m) {                                 \
        const T *restrict b = (const T *)g->b + off, *restrict d = (const T *)g->d + off;                \
        T *restrict o = (T *)g->out + off;                                                                \
        const int64_t ds = g->dstride;                                                                    \
        const uint32_t pos = (uint32_t)(g->pos0 + off);                                                   \
        float c[K];                                                                                       \
        int32_t bl[K];                                                                                    \
        uint32_t ky[(K + 1) / 2];                                                                         \
        for (int k = 0; k < K; k++) { c[k] = g->coef[k]; bl[k] = g->below[k]; }                           \
        for (int k = 0; k < (K + 1) / 2; k++) ky[k] = (uint32_t)g->keys[k];                               \
        for (int64_t i = 0; i < m; i++) {                                                                 \
            HASHES(h, K, ky, pos + (uint32_t)i);                                                          \
            float acc = LD(b, i);                                                                         \
            for (int k = 0; k < K; k++) {                                                                 \
                const float v = LD(d + k * ds, i);                                                        \
                acc = acc + (DRAW_BITS(h, k) < bl[k] ? v * c[k] : 0.0f);                                  \
            }                                                                                             \
            o[i] = ST(acc);                                                                               \
        }                                                                                                 \
    }                                                                                                     \
    TIES_VARIANTS(T, LD, ST, K, 0)                                                                        \
    TIES_VARIANTS(T, LD, ST, K, 1)

#define TIES_VARIANTS(T, LD, ST, K, NORM)                                                                 \
    static void ties_##T##_##K##_##NORM(const seg_t *g, int64_t off, int64_t m) {                        \
        const T *restrict b = (const T *)g->b + off, *restrict d = (const T *)g->d + off;                \
        T *restrict o = (T *)g->out + off;                                                                \
        const int64_t ds = g->dstride;                                                                    \
        const float lam = g->lam;                                                                         \
        float w[K], th[K];                                                                                \
        for (int k = 0; k < K; k++) { w[k] = g->w[k]; th[k] = g->thr[k]; }                                \
        for (int64_t i = 0; i < m; i++) {                                                                 \
            float x[K], r;                                                                                \
            for (int k = 0; k < K; k++) {                                                                 \
                const float v = LD(d + k * ds, i);                                                        \
                x[k] = as_f32(as_u32(v) & 0x7FFFFFFFu) >= th[k] ? v * w[k] : 0.0f;                        \
            }                                                                                             \
            TIES_TAIL(x, K, w, NORM, lam, LD(b, i), r);                                                   \
            o[i] = ST(r);                                                                                 \
        }                                                                                                 \
    }                                                                                                     \
    static void dties_##T##_##K##_##NORM(const seg_t *g, int64_t off, int64_t m) {                       \
        const T *restrict b = (const T *)g->b + off, *restrict d = (const T *)g->d + off;                \
        T *restrict o = (T *)g->out + off;                                                                \
        const int64_t ds = g->dstride;                                                                    \
        const uint32_t pos = (uint32_t)(g->pos0 + off);                                                   \
        const float lam = g->lam;                                                                         \
        float c[K], w[K];                                                                                 \
        int32_t bl[K];                                                                                    \
        uint32_t ky[(K + 1) / 2];                                                                         \
        for (int k = 0; k < K; k++) { c[k] = g->coef[k]; w[k] = g->w[k]; bl[k] = g->below[k]; }          \
        for (int k = 0; k < (K + 1) / 2; k++) ky[k] = (uint32_t)g->keys[k];                               \
        for (int64_t i = 0; i < m; i++) {                                                                 \
            HASHES(h, K, ky, pos + (uint32_t)i);                                                          \
            float x[K], r;                                                                                \
            for (int k = 0; k < K; k++) {                                                                 \
                const float v = LD(d + k * ds, i); /* loaded unconditionally: keeps the loop branch-free */ \
                x[k] = DRAW_BITS(h, k) < bl[k] ? v * c[k] : 0.0f;                                         \
            }                                                                                             \
            TIES_TAIL(x, K, w, NORM, lam, LD(b, i), r);                                                   \
            o[i] = ST(r);                                                                                 \
        }                                                                                                 \
    }

#define ALL_K(T, LD, ST) \
    VARIANTS(T, LD, ST, 1) VARIANTS(T, LD, ST, 2) VARIANTS(T, LD, ST, 3) VARIANTS(T, LD, ST, 4) \
    VARIANTS(T, LD, ST, 5) VARIANTS(T, LD, ST, 6) VARIANTS(T, LD, ST, 7) VARIANTS(T, LD, ST, 8)

ALL_K(uint16_t, load_bf16, store_bf16)
ALL_K(float, load_f32, store_f32)

typedef void (*variant_t)(const seg_t *, int64_t, int64_t);

#define ROW(T, K) {lin_##T##_##K, ties_##T##_##K##_0, ties_##T##_##K##_1, dare_##T##_##K, \
                   dties_##T##_##K##_0, dties_##T##_##K##_1}
/* [bf16?][K - 1][variant]: variant 0 linear, 1-2 TIES (normalize 0/1), 3 DARE, 4-5 DARE-TIES */
static const variant_t TABLE[2][KMAX][6] = {
    {ROW(float, 1), ROW(float, 2), ROW(float, 3), ROW(float, 4),
     ROW(float, 5), ROW(float, 6), ROW(float, 7), ROW(float, 8)},
    {ROW(uint16_t, 1), ROW(uint16_t, 2), ROW(uint16_t, 3), ROW(uint16_t, 4),
     ROW(uint16_t, 5), ROW(uint16_t, 6), ROW(uint16_t, 7), ROW(uint16_t, 8)},
};

static int variant_of(const seg_t *g) {
    const int nz = g->normalize != 0;
    switch (g->op) {
    case OP_LINEAR: return 0;
    case OP_TIES: return 1 + nz;
    case OP_DARE: return 3;
    case OP_DARE_TIES: return 4 + nz;
    default: return -1;
    }
}

/* Merge every segment: bf16 != 0 for bfloat16 data (else float32), K task vectors each. Returns 0, or
 * a negative code for arguments out of range (nothing is written then). */
int merge_segments(const seg_t *segs, int64_t nseg, int K, int bf16, int nthreads) {
    if (K < 1 || K > KMAX || nseg < 0) return -1;
    for (int64_t s = 0; s < nseg; s++)
        if (variant_of(segs + s) < 0 || segs[s].n < 0) return -2;
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(nseg + 1)); /* first work item of each segment */
    if (!first) return -3;
    int64_t total = 0;
    for (int64_t s = 0; s < nseg; s++) {
        first[s] = total;
        total += (segs[s].n + CHUNK - 1) / CHUNK;
    }
    first[nseg] = total;
    const variant_t *row = TABLE[bf16 != 0][K - 1];
    /* libgomp.so.1 is torch's, loaded already: its threads are warm, Python's would sleep */
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1 && total > 1)")
    for (int64_t t = 0; t < total; t++) {
        int64_t lo = 0, hi = nseg - 1; /* the segment s with first[s] <= t < first[s + 1] */
        while (lo < hi) {
            const int64_t mid = (lo + hi + 1) / 2;
            if (first[mid] <= t) lo = mid;
            else hi = mid - 1;
        }
        const seg_t *g = segs + lo;
        const int64_t off = (t - first[lo]) * CHUNK;
        const int64_t m = g->n - off < CHUNK ? g->n - off : CHUNK;
        row[variant_of(g)](g, off, m);
    }
    free(first);
    return 0;
}
