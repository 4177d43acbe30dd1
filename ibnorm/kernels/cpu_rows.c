/* Row-wise IBNorm (rms, layer) on CPU: one fused call for any number of rows.
 *
 * Used by ibnorm/kernels/cpu_fused.py for inference (no autograd).  Plain C99, no torch headers
 * and no libm calls in the loops, so it builds in about a second.  Follows docs/math.md step by
 * step in float32 with float64 row totals, in three passes over each row:
 *   1.   Σx² (and Σx first, when centred), read straight from the input
 *   2-3. z = (x − mean)·rstd, c = s_λ(z) into a row buffer, with Σc, Σc² (and Σz when centred);
 *        λ = 0 channels give c = z exactly
 *   4.   y = (c − μ)·√max(v_z, δ)/√max(v_c, δ)·γ + β
 * The loops are written to be vectorized by the compiler (-O3, `omp simd`, one loop per op, λ
 * layout and dtype): s_λ uses branch-free polynomial forms (Cephes' coefficients, float32, a few
 * ulp) instead of libm's scalar calls, and 1/λ is computed once per call, not per element.
 * Three entry points: ibnorm_rows (rms, layer), ibnorm_groups (group), ibnorm_channels (batch in
 * eval).  Rows are split across `threads` OpenMP threads (the GIL is released by ctypes during the
 * call).  γ, β and λ come as float32.  dtype codes: 0 float32, 1 bfloat16.  op codes: 0 tanh, 1 log, 2 power.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define INLINE static inline __attribute__((always_inline))
#define CHUNK 1024 /* reduction block: float lanes inside, double totals across blocks */

INLINE float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t float_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

INLINE float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

INLINE uint16_t float_to_bf16(float f) {
    uint32_t u = float_to_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; /* round to nearest even, as torch */
    uint32_t quiet = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? quiet : rounded);
}

/* e^x − 1 for −87 ≤ x ≤ 88 (clamped), branch-free: with x = n·ln2 + r, |r| ≤ ln2/2,
 * e^x − 1 = 2^n·expm1(r) + (2^n − 1), where both terms are exact or nearly so: a few ulp everywhere,
 * including small |x| (n = 0), unlike e^x − 1. */
INLINE float expm1_clamped(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.0f / 40320.0f;
    p = p * r + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * (r * r) + r; /* expm1(r) */
    float scale = bits_to_float((uint32_t)((int32_t)n + 127) << 23);
    return scale * p + (scale - 1.0f);
}

/* log(1 + a) for finite a ≥ 0; the rounding of 1 + a is corrected by (a − (u − 1))/u. */
INLINE float log1p_pos(float a) {
    float u = 1.0f + a;
    uint32_t bits = float_to_bits(u);
    float e = (float)((int32_t)(bits >> 23) - 126);
    float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u); /* u = m·2^e, m in [0.5, 1) */
    int below = m < 0.707106781186547524f;
    e = below ? e - 1.0f : e;
    m = below ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float p = 7.0376836292e-2f;
    p = p * m - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    float y = m * z * p + e * -2.12194440e-4f - 0.5f * z;
    return m + y + e * 0.693359375f + (a - (u - 1.0f)) / u;
}

/* s_λ(z) for one element.  scale and inv come from channel_constants: tanh and log take λ and 1/λ,
 * power p = 1/(1 + λ) and 1/p.  λ = 0 gives z (the other lanes' value is discarded). */
INLINE float compress(float z, float scale, float inv, int lam_zero, int op) {
    float a = fabsf(z), c;
    if (op == 0) {
        float t = expm1_clamped(-2.0f * scale * a); /* tanh(u) = −expm1(−2u)/(2 + expm1(−2u)) */
        c = (-t / (2.0f + t)) * inv;
    } else if (op == 1) {
        c = log1p_pos(scale * a) * inv;
    } else {
        c = expm1_clamped(scale * log1p_pos(a)) * inv;
    }
    c = copysignf(c, z);
    return lam_zero ? z : c;
}

INLINE float load(const void *p, long i, int dt) {
    return dt == 0 ? ((const float *)p)[i] : bf16_to_float(((const uint16_t *)p)[i]);
}

/* Σ (x − shift)^power over one row (power 1 or 2), float lanes inside blocks, double across. */
INLINE double row_moment(const void *x, long o, long n, int dt, float shift, int power) {
    double total = 0.0;
    for (long j0 = 0; j0 < n; j0 += CHUNK) {
        long j1 = j0 + CHUNK < n ? j0 + CHUNK : n;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (long j = j0; j < j1; j++) { float v = load(x, o + j, dt) - shift; s += power == 1 ? v : v * v; }
        total += s;
    }
    return total;
}

/* c = s_λ((x − mean)·rstd) into d; sums[0..2] = Σc, Σc², Σz.  Inlined with constant dt, per_channel
 * and op (row_compress below), so each combination is one branch-free vectorized loop. */
INLINE void compress_row(const void *x, long o, long n, int dt, float mean, float rstd, const float *scale,
                         const float *inv, int per_channel, int op, float *d, double *sums) {
    double tc = 0.0, tcc = 0.0, tz = 0.0;
    for (long j0 = 0; j0 < n; j0 += CHUNK) {
        long j1 = j0 + CHUNK < n ? j0 + CHUNK : n;
        float s = 0.0f, ss = 0.0f, s_z = 0.0f;
#pragma omp simd reduction(+ : s, ss, s_z)
        for (long j = j0; j < j1; j++) {
            long k = per_channel ? j : 0;
            float z = (load(x, o + j, dt) - mean) * rstd;
            float c = compress(z, scale[k], inv[k], scale[k] == 0.0f, op);
            d[j] = c; s += c; ss += c * c; s_z += z;
        }
        tc += s; tcc += ss; tz += s_z;
    }
    sums[0] = tc; sums[1] = tcc; sums[2] = tz;
}

#define COMPRESS_CASE(DT, PC, OP) \
    case (DT) * 6 + (OP) * 2 + (PC): compress_row(x, o, n, DT, mean, rstd, scale, inv, PC, OP, d, sums); break;

static void row_compress(const void *x, long o, long n, int dt, float mean, float rstd, const float *scale,
                         const float *inv, int per_channel, int op, float *d, double *sums) {
    switch (dt * 6 + op * 2 + (per_channel != 0)) {
        COMPRESS_CASE(0, 0, 0) COMPRESS_CASE(0, 1, 0) COMPRESS_CASE(0, 0, 1)
        COMPRESS_CASE(0, 1, 1) COMPRESS_CASE(0, 0, 2) COMPRESS_CASE(0, 1, 2)
        COMPRESS_CASE(1, 0, 0) COMPRESS_CASE(1, 1, 0) COMPRESS_CASE(1, 0, 1)
        COMPRESS_CASE(1, 1, 1) COMPRESS_CASE(1, 0, 2) COMPRESS_CASE(1, 1, 2)
    }
}

/* y = (c − mu)·k·w + b over n elements; w, b per element (NULL: none) or, with wb_scalar, one value. */
INLINE void store_span(void *y, int dt, long o, const float *c, long n, float mu, float k, const float *w,
                       const float *b, int wb_scalar) {
    float w0 = (w && wb_scalar) ? w[0] : 1.0f, b0 = (b && wb_scalar) ? b[0] : 0.0f;
    if (dt == 0) {
        float *out = (float *)y + o;
#pragma omp simd
        for (long j = 0; j < n; j++)
            out[j] = ((c[j] - mu) * k) * ((w && !wb_scalar) ? w[j] : w0) + ((b && !wb_scalar) ? b[j] : b0);
    } else {
        uint16_t *out = (uint16_t *)y + o;
#pragma omp simd
        for (long j = 0; j < n; j++)
            out[j] = float_to_bf16(((c[j] - mu) * k) * ((w && !wb_scalar) ? w[j] : w0) + ((b && !wb_scalar) ? b[j] : b0));
    }
}

static void store(void *y, int dt, long o, const float *c, long n, float mu, float k, const float *w, const float *b,
                  int wb_scalar) {
    if (dt == 0) store_span(y, 0, o, c, n, mu, k, w, b, wb_scalar);
    else store_span(y, 1, o, c, n, mu, k, w, b, wb_scalar);
}

/* What s_λ needs per channel (or once for a scalar λ): tanh and log take λ and 1/λ, power
 * p = 1/(1 + λ) and 1/p; λ = 0 is marked by a zero scale. */
static void channel_constants(const float *lam, long m, int op, float *scale, float *inv) {
    for (long j = 0; j < m; j++) {
        float l = lam[j] > 0.0f ? lam[j] : 0.0f;
        float sc = op == 2 ? 1.0f / (1.0f + l) : l;
        scale[j] = l == 0.0f ? 0.0f : sc;
        inv[j] = l == 0.0f ? 0.0f : 1.0f / sc;
    }
}

/* Step 4's factor and shift from the row's sums: k = √max(v_z, δ)/√max(v_c, δ), μ = mean(c − z). */
static float spread_ratio(double var, float rstd, const double *sums, long n, int centered, float floor_, float *mu) {
    double vz = var * rstd * rstd, vc = sums[1] / n; /* var(z) = v/(v + ε) analytically */
    *mu = 0.0f;
    if (centered) { vc -= (sums[0] / n) * (sums[0] / n); *mu = (float)((sums[0] - sums[2]) / n); }
    return (float)(sqrt(vz > floor_ ? vz : floor_) / sqrt(vc > floor_ ? vc : floor_));
}

/* Row statistics: mean (0 unless centred) and the variance about it. */
static double row_variance(const void *x, int dt, long o, long n, int centered, float *mean) {
    *mean = centered ? (float)(row_moment(x, o, n, dt, 0.0f, 1) / n) : 0.0f;
    return (dt == 0 ? row_moment(x, o, n, 0, *mean, 2) : row_moment(x, o, n, 1, *mean, 2)) / n;
}

static int threads_for(int threads, long rows) {
    if (threads < 1) threads = 1;
    return threads > rows ? (rows > 0 ? (int)rows : 1) : threads;
}

/* One thread's scratch: a row buffer of n floats and s_λ's constants for m channels; NULL if out of memory. */
static float *scratch(long n, const float *lam, long m, int op, float **scale, float **inv) {
    float *buf = (float *)malloc(sizeof(float) * ((size_t)n + 2 * (size_t)m));
    if (buf) {
        *scale = buf + n;
        *inv = *scale + m;
        channel_constants(lam, m, op, *scale, *inv);
    }
    return buf;
}

/* Each entry point runs its rows in one OpenMP loop.  Built with -fopenmp that is the process's
 * OpenMP pool: torch's own libgomp.so.1, already loaded, whose workers are awake after torch's last
 * op (separate threads would compete with them for the cores).  Without OpenMP the pragmas are
 * ignored and the rows run one after another.  Every thread reaches the `omp for` (its barrier),
 * also one whose scratch could not be allocated: it skips its rows and the call reports failure. */

/* rms / layer: rows of n contiguous elements; γ, β, λ per element of the row (λ may be one value). */
int ibnorm_rows(const void *x, int xdt, void *y, const float *w, const float *b, const float *lam,
                int lam_per_channel, long rows, long n, float eps, float floor_, int centered, int op, int threads) {
    int failed = 0;
    long m = lam_per_channel ? n : 1;
#pragma omp parallel num_threads(threads_for(threads, rows))
    {
        float *scale, *inv, *buf = scratch(n, lam, m, op, &scale, &inv);
        if (!buf) failed = 1;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            if (!buf) continue;
            long o = r * n;
            float mean, mu;
            double var = row_variance(x, xdt, o, n, centered, &mean), sums[3];
            float rstd = 1.0f / sqrtf((float)var + eps);
            row_compress(x, o, n, xdt, mean, rstd, scale, inv, lam_per_channel, op, buf, sums);
            float k = spread_ratio(var, rstd, sums, n, centered, floor_, &mu);
            store(y, xdt, o, buf, n, mu, k, w, b, 0);
        }
        free(buf);
    }
    return failed;
}

/* group: x is (samples, channels, inner); a row is one sample's group of channels (channels/groups ×
 * inner elements), statistics over the row, λ, γ, β per channel (λ may be one value). */
int ibnorm_groups(const void *x, int xdt, void *y, const float *w, const float *b, const float *lam,
                  int lam_per_channel, long samples, long channels, long groups, long inner, float eps, float floor_,
                  int op, int threads) {
    int failed = 0;
    long per_group = channels / groups, n = per_group * inner, rows = samples * groups;
    long m = lam_per_channel ? channels : 1;
#pragma omp parallel num_threads(threads_for(threads, rows))
    {
        float *scale, *inv, *buf = scratch(n, lam, m, op, &scale, &inv);
        if (!buf) failed = 1;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            if (!buf) continue;
            long o = r * n, ch0 = (r % groups) * per_group;
            float mean, mu;
            double var = row_variance(x, xdt, o, n, 1, &mean), sums[3] = {0, 0, 0}, part[3];
            float rstd = 1.0f / sqrtf((float)var + eps);
            for (long s = 0; s < per_group; s++) { /* one channel: one λ */
                long j = lam_per_channel ? ch0 + s : 0;
                row_compress(x, o + s * inner, inner, xdt, mean, rstd, scale + j, inv + j, 0, op, buf + s * inner, part);
                sums[0] += part[0]; sums[1] += part[1]; sums[2] += part[2];
            }
            float k = spread_ratio(var, rstd, sums, n, 1, floor_, &mu);
            for (long s = 0; s < per_group; s++)
                store(y, xdt, o + s * inner, buf + s * inner, inner, mu, k, w ? w + ch0 + s : NULL,
                      b ? b + ch0 + s : NULL, 1);
        }
        free(buf);
    }
    return failed;
}

/* batch in eval: a per-channel map with running statistics.  x is (samples, channels, inner);
 * z = (x − mean_c)·rstd_c, y = (s_λ(z) − mu_c)·k_c·γ_c + β_c with every constant per channel. */
int ibnorm_channels(const void *x, int xdt, void *y, const float *mean, const float *rstd, const float *mu,
                    const float *k, const float *w, const float *b, const float *lam, int lam_per_channel,
                    long samples, long channels, long inner, int op, int threads) {
    int failed = 0;
    long rows = samples * channels, m = lam_per_channel ? channels : 1;
#pragma omp parallel num_threads(threads_for(threads, rows))
    {
        float *scale, *inv, *buf = scratch(inner, lam, m, op, &scale, &inv);
        if (!buf) failed = 1;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            if (!buf) continue;
            long ch = r % channels, o = r * inner, j = lam_per_channel ? ch : 0;
            double sums[3];
            row_compress(x, o, inner, xdt, mean[ch], rstd[ch], scale + j, inv + j, 0, op, buf, sums);
            store(y, xdt, o, buf, inner, mu[ch], k[ch], w ? w + ch : NULL, b ? b + ch : NULL, 1);
        }
        free(buf);
    }
    return failed;
}
