/* Decode attention for thinkrl's fast engine: one new token per batch row, bf16 or fp32
 * caches (and inputs and output of the same type), fp32 arithmetic. Compiled on first use
 * by thinkrl/rollout/kernels.py (gcc -O3 -march=native) and called through ctypes; the
 * torch-ops path in fast.py computes the same thing and is used wherever this file cannot
 * be built.
 *
 * Why a kernel: per layer and step the torch path runs ~11 small operators (two score
 * matmuls over a few hundred 3 x 64 matrices, a concatenation, the mask, a softmax, two
 * conversions, two value matmuls, the cache writes), each a full pass with its own
 * set-up; here each (key head, row) pair is one task that reads its keys and values once.
 *
 * Layouts (row-major, kv = key head; element type E: bf16 as uint16_t when f32 == 0, else float):
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

/* VL lanes of fp32 / VL bf16 values: GCC vector extensions, lowered to AVX-512, AVX2, SSE or
 * NEON, whatever -march=native offers. 16 lanes (one zmm register) where AVX-512 has 32 such
 * registers; 8 elsewhere, where 16-lane vectors would take two registers each and the value
 * accumulators below would no longer fit in the 16 ymm registers of AVX2 (spilled, the build
 * ran 5x slower: benchmarks/decode_attention.py with THINKRL_KERNEL_MARCH=haswell). WMAX is the
 * number of VL-dim vectors a values pass keeps per query row. */
#if defined(__AVX512F__)
#define VL 16
#define WMAX 4
#else
#define VL 8
#define WMAX 2
#endif
typedef float vf __attribute__((vector_size(4 * VL)));

typedef uint16_t vh __attribute__((vector_size(2 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));

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

static inline vf loadv(const uint16_t *p) {  /* VL bf16 -> fp32: the bf16 bits are the high half */
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}
typedef int32_t vi __attribute__((vector_size(4 * VL)));

/* e^x for VL values x <= 0 (softmax arguments after subtracting the row max), as 2^k e^r with
 * k = round(x / ln 2) and |r| <= ln(2) / 2: a degree-6 Taylor-like polynomial for e^r (the
 * classic minimax coefficients, relative error ~1e-7) and k added to the exponent bits.
 * Arguments under -87 give e^-87 ~ 1.6e-38 instead of less: nothing next to the row max's 1.
 * About 4x faster than glibc's scalar expf in the softmax below. */
static inline vf vexp(vf x) {
    const vi under = x < -87.0f;  /* all ones where x < -87 */
    const vf lo = (vf)(((vi)x & ~under) | ((vi)((vf){0} - 87.0f) & under));
    const vf y = lo * 1.44269504088896341f;
    const vi k = __builtin_convertvector(y - 0.5f, vi);  /* truncation of y - 1/2: round(y) for y <= 0 */
    const vf kf = __builtin_convertvector(k, vf);
    const vf r = (lo - kf * 0.693359375f) + kf * 2.12194440e-4f;  /* x - k ln 2, ln 2 in two parts */
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi bits = (k + 127) << 23;
    vf scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

typedef struct {
    const void *q, *knew, *vnew, *kp_t, *vp;
    void *kg_t, *vg, *out;
    const int64_t *group, *pstart;
    int64_t b, g, nkv, rep, hd, P, T, t, q_rs, k_rs, v_rs;
} Job;

static inline vf load_tail(const uint16_t *p, int64_t m) {  /* m < VL values, the rest 0 */
    uint16_t tmp[VL] = {0};
    memcpy(tmp, p, sizeof(uint16_t) * (size_t)m);
    return loadv(tmp);
}

/* The element type as a compile-time constant F32 (0: bf16, 1: fp32) of always-inlined helpers:
 * each caller passes a literal, so gcc emits one loop per type with no branch inside it. */
#define ES(F32) ((F32) ? sizeof(float) : sizeof(uint16_t))
#define AT(F32, p, i) ((const char *)(p) + (size_t)(i) * ES(F32))

static inline __attribute__((always_inline)) vf loadc(const int F32, const void *p, int64_t i) {
    if (F32) {
        vf f;
        memcpy(&f, AT(1, p, i), sizeof f);
        return f;
    }
    return loadv((const uint16_t *)p + i);
}

static inline __attribute__((always_inline)) vf loadc_tail(const int F32, const void *p, int64_t i, int64_t m) {
    if (F32) {
        float tmp[VL] = {0};
        vf f;
        memcpy(tmp, AT(1, p, i), sizeof(float) * (size_t)m);
        memcpy(&f, tmp, sizeof f);
        return f;
    }
    return load_tail((const uint16_t *)p + i, m);
}

static inline __attribute__((always_inline)) float get1(const int F32, const void *p, int64_t i) {
    return F32 ? ((const float *)p)[i] : to_f32(((const uint16_t *)p)[i]);
}

static inline __attribute__((always_inline)) void put1(const int F32, void *p, int64_t i, float x) {
    if (F32)
        ((float *)p)[i] = x;
    else
        ((uint16_t *)p)[i] = from_f32(x);
}

/* s[i][j] = sum_d q[i][d] keys[d][j] for j < n and the NQ (<= 4) query rows i, keys transposed
 * (row stride ld). VL keys at a time, the NQ sums held in registers across d. */
static inline __attribute__((always_inline)) void scores_nq(const int F32, const int NQ, const float *qf,
                                                            int64_t hd, const void *keys, int64_t ld, int64_t n,
                                                            float *s, int64_t sstride) {
    int64_t j0 = 0;
    /* KC key vectors at once: NQ * KC independent sums, enough to hide the FMA latency (with
     * NQ = 3 sums alone, each waits on its previous FMA: a third of the FMA rate) */
    enum { KC = 2 };
    for (; j0 + KC * VL <= n; j0 += KC * VL) {
        vf a[4][KC] = {{{0}}};
        for (int64_t d = 0; d < hd; d++) {
            vf k[KC];
            for (int c = 0; c < KC; c++) k[c] = loadc(F32, keys, d * ld + j0 + c * VL);
            for (int i = 0; i < NQ; i++) {
                const float qd = qf[i * hd + d];
                for (int c = 0; c < KC; c++) a[i][c] += qd * k[c];
            }
        }
        for (int i = 0; i < NQ; i++) memcpy(s + i * sstride + j0, a[i], sizeof a[i]);
    }
    for (; j0 < n; j0 += VL) {
        const int64_t m = n - j0 < VL ? n - j0 : VL;
        vf a[4] = {{0}, {0}, {0}, {0}};
        for (int64_t d = 0; d < hd; d++) {
            const vf k = m == VL ? loadc(F32, keys, d * ld + j0) : loadc_tail(F32, keys, d * ld + j0, m);
            for (int i = 0; i < NQ; i++) a[i] += qf[i * hd + d] * k;
        }
        for (int i = 0; i < NQ; i++) {
            float out[VL];
            memcpy(out, &a[i], sizeof out);
            memcpy(s + i * sstride + j0, out, sizeof(float) * (size_t)m);
        }
    }
}

static inline __attribute__((always_inline)) void scores_t(const int F32, const float *qf, int64_t nq,
                                                           int64_t hd, const void *keys, int64_t ld, int64_t n,
                                                           float *s, int64_t sstride) {
    for (int64_t i0 = 0; i0 < nq; i0 += 4) {
        const float *q = qf + i0 * hd;
        float *si = s + i0 * sstride;
        switch (nq - i0 < 4 ? nq - i0 : 4) {
            case 1: scores_nq(F32, 1, q, hd, keys, ld, n, si, sstride); break;
            case 2: scores_nq(F32, 2, q, hd, keys, ld, n, si, sstride); break;
            case 3: scores_nq(F32, 3, q, hd, keys, ld, n, si, sstride); break;
            default: scores_nq(F32, 4, q, hd, keys, ld, n, si, sstride); break;
        }
    }
}

/* acc[i][c0 + .. + VL W) += sum_j p[i][j] values[j][c0 + ..] for the NQ (<= 4) rows, W (<= WMAX)
 * vectors of VL dims: up to 4 WMAX accumulators in registers, each value row read once. */
static inline __attribute__((always_inline)) void values_nq(const int F32, const int NQ, const int W,
                                                            const float *p, int64_t sstride, int64_t hd,
                                                            int64_t c0, const void *values, int64_t n,
                                                            float *acc) {
    vf a[4][WMAX];
    for (int i = 0; i < NQ; i++)
        for (int c = 0; c < W; c++) memcpy(&a[i][c], acc + i * hd + c0 + VL * c, sizeof(vf));
    for (int64_t j = 0; j < n; j++) {
        vf v[WMAX];
        for (int c = 0; c < W; c++) v[c] = loadc(F32, values, j * hd + c0 + VL * c);
        for (int i = 0; i < NQ; i++) {
            const float w = p[i * sstride + j];
            for (int c = 0; c < W; c++) a[i][c] += w * v[c];
        }
    }
    for (int i = 0; i < NQ; i++)
        for (int c = 0; c < W; c++) memcpy(acc + i * hd + c0 + VL * c, &a[i][c], sizeof(vf));
}

#if WMAX == 4
#define VALUES_W(NQ)                                                                   \
    switch (w) {                                                                       \
        case 1: values_nq(F32, NQ, 1, pi, sstride, hd, c0, values, n, ai); break;          \
        case 2: values_nq(F32, NQ, 2, pi, sstride, hd, c0, values, n, ai); break;          \
        case 3: values_nq(F32, NQ, 3, pi, sstride, hd, c0, values, n, ai); break;          \
        default: values_nq(F32, NQ, 4, pi, sstride, hd, c0, values, n, ai); break;         \
    }
#else
#define VALUES_W(NQ)                                                                   \
    switch (w) {                                                                       \
        case 1: values_nq(F32, NQ, 1, pi, sstride, hd, c0, values, n, ai); break;          \
        default: values_nq(F32, NQ, 2, pi, sstride, hd, c0, values, n, ai); break;         \
    }
#endif

/* acc[i][:] += sum_j p[i][j] * values[j][:] over j < n (hd a multiple of VL) */
static inline __attribute__((always_inline)) void weighted_values(const int F32, const float *p,
                                                                  int64_t sstride, int64_t nq, int64_t hd,
                                                                  const void *values, int64_t n, float *acc) {
    for (int64_t i0 = 0; i0 < nq; i0 += 4) {
        const float *pi = p + i0 * sstride;
        float *ai = acc + i0 * hd;
        for (int64_t c0 = 0; c0 < hd; c0 += WMAX * VL) {
            const int64_t w = (hd - c0) / VL < WMAX ? (hd - c0) / VL : WMAX;
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
static inline __attribute__((always_inline)) int run(const int F32, const Job *J, int64_t task0, int64_t task1) {
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
        char *kg_t = (char *)AT(F32, J->kg_t, (h * b + r) * hd * T);
        char *vg = (char *)AT(F32, J->vg, (h * b + r) * T * hd);
        const char *kn = AT(F32, J->knew, r * J->k_rs + h * hd), *vn = AT(F32, J->vnew, r * J->v_rs + h * hd);
        for (int64_t d = 0; d < hd; d++) memcpy(kg_t + (d * T + t) * ES(F32), kn + d * ES(F32), ES(F32));
        memcpy(vg + t * hd * ES(F32), vn, ES(F32) * (size_t)hd);
        const void *qr = AT(F32, J->q, r * J->q_rs + h * rep * hd);
        for (int64_t i = 0; i < rep * hd; i++) qf[i] = get1(F32, qr, i);
        const void *kp_t = AT(F32, J->kp_t, (h * J->g + grp) * hd * P + ps);
        scores_t(F32, qf, rep, hd, kp_t, P, np, scores, n);
        scores_t(F32, qf, rep, hd, kg_t, T, t + 1, scores + np, n);
        for (int64_t i = 0; i < rep; i++) {  /* softmax of each query head's row */
            float *s = scores + i * n, m = s[0], z = 0.0f;
            for (int64_t j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
            int64_t j = 0;
            for (; j + VL <= n; j += VL) {
                vf x;
                memcpy(&x, s + j, sizeof x);
                x = vexp(x - m);
                memcpy(s + j, &x, sizeof x);
            }
            for (; j < n; j++) s[j] = expf(s[j] - m);
            for (int64_t j = 0; j < n; j++) z += s[j];
            const float inv = 1.0f / z;
            for (int64_t j = 0; j < n; j++) s[j] *= inv;
        }
        memset(acc, 0, sizeof(float) * (size_t)(rep * hd));
        weighted_values(F32, scores, n, rep, hd, AT(F32, J->vp, ((h * J->g + grp) * P + ps) * hd), np, acc);
        weighted_values(F32, scores + np, n, rep, hd, vg, t + 1, acc);
        void *o = (char *)J->out + (size_t)(r * nkv * rep * hd + h * rep * hd) * ES(F32);
        for (int64_t i = 0; i < rep * hd; i++) put1(F32, o, i, acc[i]);
    }
    free(scores); free(qf); free(acc);
    return 0;
}

static int run_bf16(const Job *J, int64_t task0, int64_t task1) { return run(0, J, task0, task1); }
static int run_f32(const Job *J, int64_t task0, int64_t task1) { return run(1, J, task0, task1); }

/* Returns 0 on success; f32 says the element type E (nonzero: fp32, 0: bf16). Tasks (key head,
 * row) are split evenly over `threads` OpenMP threads;
 * loaded into a process that runs PyTorch, libgomp is PyTorch's own (same soname), so this
 * uses the same thread pool as its operators instead of competing with it. */
int decode_attention(const void *q, const void *knew, const void *vnew, const void *kp_t, const void *vp,
                     void *kg_t, void *vg, const int64_t *group, const int64_t *pstart, void *out,
                     int64_t b, int64_t g, int64_t nkv, int64_t rep, int64_t hd, int64_t P, int64_t T,
                     int64_t t, int64_t q_rs, int64_t k_rs, int64_t v_rs, int64_t threads, int64_t f32) {
    const Job job = {q, knew, vnew, kp_t, vp, kg_t, vg, out, group, pstart,
                     b, g, nkv, rep, hd, P, T, t, q_rs, k_rs, v_rs};
    const int64_t tasks = nkv * b;
    if (threads < 1) threads = 1;
    if (threads > tasks) threads = tasks;
    int (*const work)(const Job *, int64_t, int64_t) = f32 ? run_f32 : run_bf16;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed)
    for (int64_t k = 0; k < threads; k++) failed |= work(&job, tasks * k / threads, tasks * (k + 1) / threads);
    return failed;
}
