/* Decode attention for thinkrl's fast engine: one new token per batch row, bf16 or fp32
 * caches, fp32 arithmetic. Compiled on first use by thinkrl/rollout/kernels.py (gcc -O3
 * -march=native), once as decode_attention_bf16 and once with -DTHINKRL_F32 as
 * decode_attention_f32, and called through ctypes; the torch-ops path in fast.py computes the
 * same thing and is used wherever this file cannot be built.
 *
 * Why a kernel: per layer and step the torch path runs ~11 small operators (two score
 * matmuls over a few hundred 3 x 64 matrices, a concatenation, the mask, a softmax, two
 * conversions, two value matmuls, the cache writes), each a full pass with its own
 * set-up; here each (key head, row) pair is one task that reads its keys and values once.
 *
 * Layouts (elem_t: bf16 as uint16_t, or float; row-major, kv = key head):
 *   q      [b, nkv * rep * hd] query heads of a row, already scaled by 1/sqrt(hd), row stride q_rs
 *   knew   [b, nkv * hd]       the new token's keys (row stride k_rs), vnew likewise (v_rs)
 *   kp_t   [nkv, g, hd, P]     prompt keys, transposed (shared by the n samples of a group)
 *   vp     [nkv, g, P, hd]     prompt values
 *   kg_t   [nkv, b, hd, T]     generated keys, transposed; slot t is written here
 *   vg     [nkv, b, T, hd]     generated values; slot t is written here
 *   group  [b]                 the prompt (group) of each row
 *   pstart [g]                 first real prompt slot of each group (left padding before it)
 *   out    [b, nkv * rep * hd] attention output, the layout the output projection reads
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16 lanes of fp32 / 16 cache values: GCC vector extensions, lowered to AVX-512, AVX2 or SSE,
 * whatever -march=native offers. */
typedef float v16f __attribute__((vector_size(64)));

#ifdef THINKRL_F32
/* fp32 caches (the engine on CPUs without bf16): loads and stores are plain copies. */
typedef float elem_t;
#define ENTRY decode_attention_f32
static inline float to_f32(float x) { return x; }
static inline float from_f32(float f) { return f; }
static inline v16f load16(const float *p) {
    v16f f;
    memcpy(&f, p, sizeof f);
    return f;
}
#else
/* bf16 caches stored as uint16_t. */
typedef uint16_t elem_t;
#define ENTRY decode_attention_bf16
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));

static inline float to_f32(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

static inline uint16_t from_f32(float f) {  /* round to nearest, ties to even (finite inputs) */
    union { uint32_t u; float f; } v;
    v.f = f;
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

static inline v16f load16(const uint16_t *p) {  /* 16 bf16 -> fp32: the bf16 bits are the high half */
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#endif

typedef struct {
    const elem_t *q, *knew, *vnew, *kp_t, *vp;
    elem_t *kg_t, *vg, *out;
    const int64_t *group, *pstart;
    int64_t b, g, nkv, rep, hd, P, T, t, q_rs, k_rs, v_rs;
} Job;

static inline v16f load_tail(const elem_t *p, int64_t m) {  /* m < 16 values, the rest 0 */
    elem_t tmp[16] = {0};
    memcpy(tmp, p, sizeof(elem_t) * (size_t)m);
    return load16(tmp);
}

/* s[i][j] = sum_d q[i][d] keys[d][j] for j < n and the NQ (<= 4) query rows i, keys transposed
 * (row stride ld). Sixteen keys at a time, the NQ sums held in registers across d. */
static inline __attribute__((always_inline)) void scores_nq(const int NQ, const float *qf, int64_t hd,
                                                            const elem_t *keys, int64_t ld, int64_t n,
                                                            float *s, int64_t sstride) {
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t m = n - j0 < 16 ? n - j0 : 16;
        v16f a[4] = {{0}, {0}, {0}, {0}};
        for (int64_t d = 0; d < hd; d++) {
            const v16f k = m == 16 ? load16(keys + d * ld + j0) : load_tail(keys + d * ld + j0, m);
            for (int i = 0; i < NQ; i++) a[i] += qf[i * hd + d] * k;
        }
        for (int i = 0; i < NQ; i++) {
            float out[16];
            memcpy(out, &a[i], sizeof out);
            memcpy(s + i * sstride + j0, out, sizeof(float) * (size_t)m);
        }
    }
}

static void scores_t(const float *qf, int64_t nq, int64_t hd, const elem_t *keys, int64_t ld, int64_t n,
                     float *s, int64_t sstride) {
    for (int64_t i0 = 0; i0 < nq; i0 += 4) {
        const float *q = qf + i0 * hd;
        float *si = s + i0 * sstride;
        switch (nq - i0 < 4 ? nq - i0 : 4) {
            case 1: scores_nq(1, q, hd, keys, ld, n, si, sstride); break;
            case 2: scores_nq(2, q, hd, keys, ld, n, si, sstride); break;
            case 3: scores_nq(3, q, hd, keys, ld, n, si, sstride); break;
            default: scores_nq(4, q, hd, keys, ld, n, si, sstride); break;
        }
    }
}

/* acc[i][c0 + .. + 16 W) += sum_j p[i][j] values[j][c0 + ..] for the NQ (<= 4) rows, W (<= 4)
 * vectors of 16 dims: up to 16 accumulators in registers, each value row read once. */
static inline __attribute__((always_inline)) void values_nq(const int NQ, const int W, const float *p,
                                                            int64_t sstride, int64_t hd, int64_t c0,
                                                            const elem_t *values, int64_t n, float *acc) {
    v16f a[4][4];
    for (int i = 0; i < NQ; i++)
        for (int c = 0; c < W; c++) memcpy(&a[i][c], acc + i * hd + c0 + 16 * c, sizeof(v16f));
    for (int64_t j = 0; j < n; j++) {
        v16f v[4];
        for (int c = 0; c < W; c++) v[c] = load16(values + j * hd + c0 + 16 * c);
        for (int i = 0; i < NQ; i++) {
            const float w = p[i * sstride + j];
            for (int c = 0; c < W; c++) a[i][c] += w * v[c];
        }
    }
    for (int i = 0; i < NQ; i++)
        for (int c = 0; c < W; c++) memcpy(acc + i * hd + c0 + 16 * c, &a[i][c], sizeof(v16f));
}

#define VALUES_W(NQ)                                                                   \
    switch (w) {                                                                       \
        case 1: values_nq(NQ, 1, pi, sstride, hd, c0, values, n, ai); break;          \
        case 2: values_nq(NQ, 2, pi, sstride, hd, c0, values, n, ai); break;          \
        case 3: values_nq(NQ, 3, pi, sstride, hd, c0, values, n, ai); break;          \
        default: values_nq(NQ, 4, pi, sstride, hd, c0, values, n, ai); break;         \
    }

/* acc[i][:] += sum_j p[i][j] * values[j][:] over j < n (hd a multiple of 16) */
static void weighted_values(const float *p, int64_t sstride, int64_t nq, int64_t hd, const elem_t *values,
                            int64_t n, float *acc) {
    for (int64_t i0 = 0; i0 < nq; i0 += 4) {
        const float *pi = p + i0 * sstride;
        float *ai = acc + i0 * hd;
        for (int64_t c0 = 0; c0 < hd; c0 += 64) {
            const int64_t w = (hd - c0) / 16 < 4 ? (hd - c0) / 16 : 4;
            switch (nq - i0 < 4 ? nq - i0 : 4) {
                case 1: VALUES_W(1); break;
                case 2: VALUES_W(2); break;
                case 3: VALUES_W(3); break;
                default: VALUES_W(4); break;
            }
        }
    }
}

/* Tasks task0..task1-1 of the job; returns nonzero if its buffers could not be allocated. */
static int run(const Job *J, int64_t task0, int64_t task1) {
    const int64_t rep = J->rep, hd = J->hd, P = J->P, T = J->T, t = J->t, nkv = J->nkv, b = J->b;
    const int64_t width = P + T;  /* longest score row: every prompt slot and every generated one */
    float *scores = malloc(sizeof(float) * (size_t)(rep * width));
    float *qf = malloc(sizeof(float) * (size_t)(rep * hd));
    float *acc = malloc(sizeof(float) * (size_t)(rep * hd));
    if (!scores || !qf || !acc) {
        free(scores); free(qf); free(acc);
        return 1;
    }
    for (int64_t task = task0; task < task1; task++) {
        const int64_t h = task / b, r = task % b, grp = J->group[r], ps = J->pstart[grp];
        const int64_t np = P - ps, n = np + t + 1;
        elem_t *kg_t = J->kg_t + (h * b + r) * hd * T;
        elem_t *vg = J->vg + (h * b + r) * T * hd;
        const elem_t *kn = J->knew + r * J->k_rs + h * hd, *vn = J->vnew + r * J->v_rs + h * hd;
        for (int64_t d = 0; d < hd; d++) kg_t[d * T + t] = kn[d];
        memcpy(vg + t * hd, vn, sizeof(elem_t) * (size_t)hd);
        const elem_t *qr = J->q + r * J->q_rs + h * rep * hd;
        for (int64_t i = 0; i < rep * hd; i++) qf[i] = to_f32(qr[i]);
        const elem_t *kp_t = J->kp_t + (h * J->g + grp) * hd * P + ps;
        scores_t(qf, rep, hd, kp_t, P, np, scores, n);
        scores_t(qf, rep, hd, kg_t, T, t + 1, scores + np, n);
        for (int64_t i = 0; i < rep; i++) {  /* softmax of each query head's row */
            float *s = scores + i * n, m = s[0], z = 0.0f;
            for (int64_t j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
            for (int64_t j = 0; j < n; j++) s[j] = expf(s[j] - m);
            for (int64_t j = 0; j < n; j++) z += s[j];
            const float inv = 1.0f / z;
            for (int64_t j = 0; j < n; j++) s[j] *= inv;
        }
        memset(acc, 0, sizeof(float) * (size_t)(rep * hd));
        weighted_values(scores, n, rep, hd, J->vp + ((h * J->g + grp) * P + ps) * hd, np, acc);
        weighted_values(scores + np, n, rep, hd, vg, t + 1, acc);
        elem_t *o = J->out + r * nkv * rep * hd + h * rep * hd;
        for (int64_t i = 0; i < rep * hd; i++) o[i] = from_f32(acc[i]);
    }
    free(scores); free(qf); free(acc);
    return 0;
}

/* Returns 0 on success. Tasks (key head, row) are split evenly over `threads` OpenMP threads;
 * loaded into a process that runs PyTorch, libgomp is PyTorch's own (same soname), so this
 * uses the same thread pool as its operators instead of competing with it. */
int ENTRY(const elem_t *q, const elem_t *knew, const elem_t *vnew,
           const elem_t *kp_t, const elem_t *vp, elem_t *kg_t, elem_t *vg,
           const int64_t *group, const int64_t *pstart, elem_t *out,
           int64_t b, int64_t g, int64_t nkv, int64_t rep, int64_t hd, int64_t P, int64_t T,
           int64_t t, int64_t q_rs, int64_t k_rs, int64_t v_rs, int64_t threads) {
    const Job job = {q, knew, vnew, kp_t, vp, kg_t, vg, out, group, pstart,
                     b, g, nkv, rep, hd, P, T, t, q_rs, k_rs, v_rs};
    const int64_t tasks = nkv * b;
    if (threads < 1) threads = 1;
    if (threads > tasks) threads = tasks;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed)
    for (int64_t k = 0; k < threads; k++) failed |= run(&job, tasks * k / threads, tasks * (k + 1) / threads);
    return failed;
}
