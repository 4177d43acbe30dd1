/* Row-wise IBNorm (rms, layer) for a few rows: one call instead of a dozen torch ops.
 *
 * Used by ibnorm/kernels/cpu_small.py for decode-sized inputs (the cost there is per-op overhead,
 * not arithmetic).  Plain C99 + libm, no torch headers: it builds in well under a second.
 * Follows docs/math.md step by step in float32 with float64 row sums; s_λ from libm's tanhf,
 * log1pf, expm1f; λ = 0 channels give c = z exactly; floors √max(v, δ) as the reference.
 * dtype codes: 0 float32, 1 bfloat16.  op codes: 0 tanh, 1 log, 2 power.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float load(const void *p, long i, int dt) {
    if (dt == 0) return ((const float *)p)[i];
    uint32_t u = ((uint32_t)((const uint16_t *)p)[i]) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void store(void *p, long i, int dt, float f) {
    if (dt == 0) { ((float *)p)[i] = f; return; }
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { ((uint16_t *)p)[i] = (uint16_t)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as torch's cast */
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

static inline float compress(float z, float lam, int op) {
    if (lam == 0.0f) return z;
    if (op == 0) return tanhf(lam * z) / lam;
    if (op == 1) return copysignf(log1pf(lam * fabsf(z)) / lam, z);
    float p = 1.0f / (1.0f + lam);
    return copysignf(expm1f(p * log1pf(fabsf(z))) / p, z);
}

int ibnorm_rows(const void *x, int xdt, void *y, const void *w, int wdt, const void *b, int bdt, const float *lam,
                int lam_per_channel, long rows, long n, float eps, float floor_, int centered, int op) {
    float *buf = (float *)malloc(sizeof(float) * 2 * (size_t)n);
    if (!buf) return 1;
    float *z = buf, *c = buf + n;
    for (long r = 0; r < rows; r++) {
        long o = r * n;
        double s = 0.0, ss = 0.0;
        for (long j = 0; j < n; j++) s += load(x, o + j, xdt);
        float mean = centered ? (float)(s / n) : 0.0f;
        for (long j = 0; j < n; j++) { float d = load(x, o + j, xdt) - mean; ss += (double)d * d; }
        float rstd = 1.0f / sqrtf((float)(ss / n) + eps);
        double sz = 0, szz = 0, sc = 0, scc = 0, sdiff = 0;
        for (long j = 0; j < n; j++) {
            float zj = (load(x, o + j, xdt) - mean) * rstd;
            float cj = compress(zj, lam[lam_per_channel ? j : 0], op);
            z[j] = zj; c[j] = cj;
            sz += zj; szz += (double)zj * zj; sc += cj; scc += (double)cj * cj; sdiff += (double)cj - zj;
        }
        double vz = szz / n, vc = scc / n, mu = 0.0;
        if (centered) { vz -= (sz / n) * (sz / n); vc -= (sc / n) * (sc / n); mu = sdiff / n; }
        float k = (float)(sqrt(vz > floor_ ? vz : floor_) / sqrt(vc > floor_ ? vc : floor_));
        for (long j = 0; j < n; j++) {
            float v = (c[j] - (float)mu) * k;
            if (w) v *= load(w, j, wdt);
            if (b) v += load(b, j, bdt);
            store(y, o + j, xdt, v);
        }
    }
    free(buf);
    return 0;
}
