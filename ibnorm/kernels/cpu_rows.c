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
 * Rows are split across `threads` OpenMP threads (the GIL is released by ctypes during the call).
 * dtype codes: 0 float32, 1 bfloat16.  op codes: 0 tanh, 1 log, 2 power.
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

typedef struct {
    const void *x; void *y; const void *w; const void *b; const float *lam;
    int xdt, wdt, bdt, lam_per_channel, centered, op;
    long rows, n;
    float eps, floor_;
    long r0, r1;
    int status;
} Job;

INLINE float load(const void *p, long i, int dt) {
    return dt == 0 ? ((const float *)p)[i] : bf16_to_float(((const uint16_t *)p)[i]);
}

static void load_row(const void *src, int dt, long n, float *d) {
    if (dt == 0) { memcpy(d, src, sizeof(float) * (size_t)n); return; }
    const uint16_t *h = (const uint16_t *)src;
#pragma omp simd
    for (long j = 0; j < n; j++) d[j] = bf16_to_float(h[j]);
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

static void store_row(const Job *jb, const float *c, long o, float mu, float k, const float *w, const float *b) {
    long n = jb->n;
    if (jb->xdt == 0) {
        float *y = (float *)jb->y + o;
#pragma omp simd
        for (long j = 0; j < n; j++) y[j] = ((c[j] - mu) * k) * (w ? w[j] : 1.0f) + (b ? b[j] : 0.0f);
    } else {
        uint16_t *y = (uint16_t *)jb->y + o;
#pragma omp simd
        for (long j = 0; j < n; j++) y[j] = float_to_bf16(((c[j] - mu) * k) * (w ? w[j] : 1.0f) + (b ? b[j] : 0.0f));
    }
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

static void *run_rows(void *arg) {
    Job *jb = (Job *)arg;
    long n = jb->n, m = jb->lam_per_channel ? n : 1;
    float *buf = (float *)malloc(sizeof(float) * (3 * (size_t)n + 2 * (size_t)m));
    if (!buf) { jb->status = 1; return NULL; }
    float *d = buf, *w = NULL, *b = NULL, *scale = buf + 3 * n, *inv = scale + m;
    if (jb->w) { w = buf + n; load_row(jb->w, jb->wdt, n, w); }
    if (jb->b) { b = buf + 2 * n; load_row(jb->b, jb->bdt, n, b); }
    channel_constants(jb->lam, m, jb->op, scale, inv);
    for (long r = jb->r0; r < jb->r1; r++) {
        long o = r * n;
        float mean = jb->centered ? (float)(row_moment(jb->x, o, n, jb->xdt, 0.0f, 1) / n) : 0.0f;
        double var = (jb->xdt == 0 ? row_moment(jb->x, o, n, 0, mean, 2) : row_moment(jb->x, o, n, 1, mean, 2)) / n;
        float rstd = 1.0f / sqrtf((float)var + jb->eps);
        double sums[3];
        row_compress(jb->x, o, n, jb->xdt, mean, rstd, scale, inv, jb->lam_per_channel, jb->op, d, sums);
        /* var(z) = v/(v + ε) analytically (z is never reduced again, as in the torch form) */
        double vz = var * rstd * rstd, vc = sums[1] / n, mu = 0.0;
        if (jb->centered) { vc -= (sums[0] / n) * (sums[0] / n); mu = (sums[0] - sums[2]) / n; }
        float k = (float)(sqrt(vz > jb->floor_ ? vz : jb->floor_) / sqrt(vc > jb->floor_ ? vc : jb->floor_));
        store_row(jb, d, o, (float)mu, k, w, b);
    }
    free(buf);
    return NULL;
}

int ibnorm_rows(const void *x, int xdt, void *y, const void *w, int wdt, const void *b, int bdt, const float *lam,
                int lam_per_channel, long rows, long n, float eps, float floor_, int centered, int op, int threads) {
    enum { MAX_THREADS = 256 };
    Job jobs[MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    Job base = {x, y, w, b, lam, xdt, wdt, bdt, lam_per_channel, centered, op, rows, n, eps, floor_, 0, 0, 0};
    for (int t = 0; t < threads; t++) {
        jobs[t] = base;
        jobs[t].r0 = rows * t / threads;
        jobs[t].r1 = rows * (t + 1) / threads;
    }
    /* Built with -fopenmp this runs on the process's OpenMP pool: torch's own libgomp.so.1, already
     * loaded, whose workers are awake after torch's last op (separate threads would compete with them
     * for the cores).  Without OpenMP the pragma is ignored and the blocks run one after another. */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) run_rows(&jobs[t]);
    int status = 0;
    for (int t = 0; t < threads; t++) status |= jobs[t].status;
    return status;
}
