/* compare's one pass over a block: <a,b>, |a|^2, |b|^2 and the sign counts of two vectors (or
   of two models' deltas to a base), reading bfloat16 or float32 straight from the file's bytes.
   Built and loaded by mergekit_rl/kernels.py; torch needed ~8 passes over memory for the same.

   Summation order is fixed by this code alone: LANES independent float32 partial sums per run
   of RUN entries, each run's lanes added into float64 in lane order. No reassociation flags and
   no FMA contraction (-ffp-contract=off), so every build, vectorised or not, gives the same
   bits. Products of float32 deltas are rounded to float32 once and a lane sums 16 of them
   before float64 takes over: within about 2e-8 of the exact sums (1024-entry runs were as fast
   but 5x less accurate). */
#include <stdint.h>
#include <string.h>

#define LANES 16
#define RUN 256

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define DISPATCH __attribute__((target_clones("avx2", "default")))
#else
#define DISPATCH
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

INLINE float from_f32(float f) { return f; }

INLINE uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Entry i into lane k of the run's partial sums (the body of PAIR_SUMS's two loops). */
#define ENTRY(k, i, LOAD)                                                                     \
    do {                                                                                      \
        float x = LOAD(a[i]), y = LOAD(b[i]);                                                 \
        if (base) {                                                                           \
            float z = LOAD(base[i]);                                                          \
            x -= z;                                                                           \
            y -= z;                                                                           \
        }                                                                                     \
        d[k] += x * y;                                                                        \
        qa[k] += x * x;                                                                       \
        qb[k] += y * y;                                                                       \
        int32_t both = (x != 0.0f) & (y != 0.0f), agree = ((bits(x) ^ bits(y)) >> 31) == 0;  \
        s[k] += both & agree;                                                                 \
        o[k] += both & !agree;                                                                \
    } while (0)

/* NAME(a, b, base, n, out): out[0..4] = dot, sq_a, sq_b, #entries where both are non-zero with
   the same sign, with opposite signs, of a and b (or of a - base and b - base when base is not
   NULL), all n entries of type T read through LOAD. -0 is zero; the sign bits decide, so no
   product can underflow a count. Macros rather than inline functions: gcc 12 vectorises the
   lane loop written out like this (a constant trip count, typed pointers), and not the same
   loop split into inlined helpers, nor the sign test written as sign_bit(x) == sign_bit(y)
   (each 4x slower). */
#define PAIR_SUMS(NAME, T, LOAD)                                                              \
    DISPATCH void NAME(const T *a, const T *b, const T *base, int64_t n, double *out) {       \
        double dot = 0, sq_a = 0, sq_b = 0;                                                   \
        int64_t same = 0, opposite = 0;                                                       \
        for (int64_t r0 = 0; r0 < n; r0 += RUN) {                                             \
            int64_t r1 = r0 + RUN < n ? r0 + RUN : n, i = r0;                                 \
            float d[LANES] = {0}, qa[LANES] = {0}, qb[LANES] = {0};                           \
            int32_t s[LANES] = {0}, o[LANES] = {0};                                           \
            for (; i + LANES <= r1; i += LANES)                                               \
                for (int k = 0; k < LANES; k++) ENTRY(k, i + k, LOAD);                        \
            for (int k = 0; i < r1; i++, k++) ENTRY(k, i, LOAD);                              \
            for (int k = 0; k < LANES; k++) {                                                 \
                dot += d[k];                                                                  \
                sq_a += qa[k];                                                                \
                sq_b += qb[k];                                                                \
                same += s[k];                                                                 \
                opposite += o[k];                                                             \
            }                                                                                 \
        }                                                                                     \
        out[0] = dot;                                                                         \
        out[1] = sq_a;                                                                        \
        out[2] = sq_b;                                                                        \
        out[3] = (double)same;                                                                \
        out[4] = (double)opposite;                                                            \
    }

PAIR_SUMS(mkrl_pair_sums_bf16, uint16_t, from_bf16)
PAIR_SUMS(mkrl_pair_sums_f32, float, from_f32)
