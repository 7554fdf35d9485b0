/* CPU kernels of the no-grad analog path, compiled on first use by hf_cim/native.py (see its docstring).
 *
 * Each function computes, element by element, exactly the float32 formula of its torch reference (the stages of
 * hf_cim/kernels.py: hf_cim/converters.py, hf_cim/rng.py, the noise model served): the same operations in the same
 * order, every intermediate rounded to float32 (built with -ffp-contract=off and without -ffast-math, so no FMA
 * contraction or reassociation). The inner loops run over contiguous rows with no branches so that the compiler
 * vectorizes them; rows are split over OpenMP threads (torch's own libgomp, already loaded in the process).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;

/* A float constant rounded as torch rounds a Python float scalar: decimal -> double -> float. */
#define F(x) ((float)(x))

/* -- the counter-based sampler (hf_cim/rng.py) ---------------------------------------------------------------- */

static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352DU;
    x ^= x >> 15;
    x *= 0x846CA68BU;
    x ^= x >> 16;
    return x;
}

static inline float unit24(uint32_t h) { return (float)(int32_t)(h >> 8) * F(5.9604644775390625e-08); }

static inline float as_float(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline uint32_t as_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

static inline uint64_t as_bits64(double d) {
    uint64_t b;
    memcpy(&b, &d, sizeof b);
    return b;
}

static inline double as_double(uint64_t b) {
    double d;
    memcpy(&d, &b, sizeof d);
    return d;
}

static inline float log_poly(float u) {
    uint32_t bits = as_bits(u);
    float exponent = (float)((int32_t)((bits >> 23) & 0xFFu) - 127);
    float m = as_float((bits & 0x7FFFFFu) | 0x3F800000u);
    float t = (m - 1.0f) / (m + 1.0f);
    float t2 = t * t;
    float t4 = t2 * t2;
    float t8 = t4 * t4;
    float p = ((2.0f + F(0.6666666666666666) * t2) + t4 * (F(0.4) + F(0.2857142857142857) * t2)) +
              t8 * (F(0.2222222222222222) + F(0.18181818181818182) * t2);
    return exponent * F(0.6931471805599453) + t * p;
}

static inline float cos_2pi(float u) {
    float x = (fabsf(u - F(0.5)) - F(0.25)) * F(6.283185307179586);
    float x2 = x * x;
    float x4 = x2 * x2;
    float x8 = x4 * x4;
    float p = ((1.0f - F(0.16666666666666666) * x2) + x4 * (F(0.008333333333333333) - F(0.0001984126984126984) * x2)) +
              x8 * (F(2.7557319223985893e-06) - F(2.505210838544172e-08) * x2);
    return x * p;
}

/* One standard normal for the 32-bit counter c and key (k0, k1): rng.gaussian. */
static inline float gaussian(uint32_t c, uint32_t k0, uint32_t k1) {
    uint32_t x = lowbias32(c ^ k0) + k1;
    float u1 = unit24(lowbias32(x)) + F(2.9802322387695312e-08);
    float u2 = unit24(lowbias32(x + 0x9E3779B9U));
    return sqrtf(-2.0f * log_poly(u1)) * cos_2pi(u2);
}

/* Rows per OpenMP chunk such that a chunk holds at least ~16k elements (thread start-up is amortised). */
static inline i64 rows_per_chunk(i64 cols) {
    i64 r = 16384 / (cols > 0 ? cols : 1);
    return r > 0 ? r : 1;
}

/* Run the statement that follows once per chunk [lo, hi) of [0, n), chunks of 16384 elements split over `threads`
 * OpenMP threads (a variable of that name must be in scope). The inner one-pass `for` only declares lo and hi. */
#define FLAT_CHUNK 16384
#define PARALLEL_FOR_CHUNKS(n, lo, hi)                                                                    \
    const i64 n_chunks_ = ((n) + FLAT_CHUNK - 1) / FLAT_CHUNK;                                            \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (n_chunks_ > 1)")                 \
    for (i64 b_ = 0; b_ < n_chunks_; ++b_)                                                                \
        for (i64 lo = b_ * FLAT_CHUNK, hi = lo + FLAT_CHUNK < (n) ? lo + FLAT_CHUNK : (n); lo < hi; lo = hi)

static inline float round_half_even(float v) { return nearbyintf(v); }

/* max(a, b) that returns a NaN operand, as torch's amax and clamp_min do. */
static inline float maxf(float m, float v) { return v > m || v != v ? v : m; }

/* max_i |x_i| (NaN if any x_i is NaN) as an integer reduction: the bits of a float without its sign bit order
 * like its magnitude, NaN above infinity, and an integer max vectorizes where a float one does not. */
static inline int32_t abs_max_bits(const float *x, i64 n) {
    int32_t m = 0;
    for (i64 i = 0; i < n; ++i) {
        int32_t b = (int32_t)(as_bits(x[i]) & 0x7FFFFFFFu);
        m = b > m ? b : m;
    }
    return m;
}

static inline float abs_max(const float *x, i64 n) { return as_float((uint32_t)abs_max_bits(x, n)); }

static inline float clampf(float v, float lo, float hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* -- noise draws (rng.randn / rng.add_randn_) ----------------------------------------------------------------- */

/* out[i] = z(i) (add == 0) or out[i] += std * z(i) (add == 1), i in [0, n). */
void hfc_randn(float *out, i64 n, float std, int add, uint32_t k0, uint32_t k1, int threads) {
    PARALLEL_FOR_CHUNKS(n, lo, hi) {
        if (add) {
            for (i64 i = lo; i < hi; ++i) out[i] = out[i] + std * gaussian((uint32_t)i, k0, k1);
        } else {
            for (i64 i = lo; i < hi; ++i) out[i] = gaussian((uint32_t)i, k0, k1);
        }
    }
}

/* -- weight programming (converters.weight_program) ----------------------------------------------------------- */

/* w (rows, cols) contiguous -> out (rows, cols), scale (rows). qmax <= 0: no quantization. */
void hfc_weight_program(const float *w, float *out, float *scale, i64 rows, i64 cols, float qmax, float std,
                        int noise, uint32_t k0, uint32_t k1, int threads) {
    const i64 rpc = rows_per_chunk(cols);
    const i64 n_chunks = (rows + rpc - 1) / rpc;
#pragma omp parallel for schedule(static) num_threads(threads) if (n_chunks > 1)
    for (i64 b = 0; b < n_chunks; ++b) {
        const i64 r_hi = (b + 1) * rpc < rows ? (b + 1) * rpc : rows;
        for (i64 r = b * rpc; r < r_hi; ++r) {
            const float *wr = w + r * cols;
            float *o = out + r * cols;
            const float s = maxf(F(1e-12), abs_max(wr, cols));
            scale[r] = s;
            const uint32_t base = (uint32_t)(r * cols);
            if (qmax > 0.0f) {
                for (i64 j = 0; j < cols; ++j) o[j] = round_half_even((wr[j] / s) * qmax) / qmax;
            } else {
                for (i64 j = 0; j < cols; ++j) o[j] = wr[j] / s;
            }
            if (noise) {
                for (i64 j = 0; j < cols; ++j) o[j] = o[j] + std * gaussian(base + (uint32_t)j, k0, k1);
            }
        }
    }
}

/* -- LogNormalNoise.program --------------------------------------------------------------------------------------- */

/* exp(x) for |x| <= 87: x = k·ln2 + r (Cody–Waite, ln2 in two parts, k·ln2_hi exact for |k| < 2^8), exp(r) by its
 * Taylor polynomial of degree 7 (|r| <= ln2/2: truncation below 0.1 ulp), times 2^k built from the bits. Branch-free
 * so that the loop vectorizes; within 2 ulp of torch's exp (tests/test_noise_gaussian.py). */
static inline float exp_poly(float x) {
    const float k = nearbyintf(x * F(1.4426950408889634));
    const float r = (x - k * F(0.693145751953125)) - k * F(1.4286068203094173e-06);
    float p = F(1.0 / 5040.0);
    p = p * r + F(1.0 / 720.0);
    p = p * r + F(1.0 / 120.0);
    p = p * r + F(1.0 / 24.0);
    p = p * r + F(1.0 / 6.0);
    p = p * r + F(0.5);
    p = p * r + F(1.0);
    p = p * r + F(1.0);
    return p * as_float((uint32_t)((int32_t)k + 127) << 23);
}

/* LogNormalNoise.program in one pass: f = exp(clamp(sigma·z − shift, −max_log, max_log)), out = w·f, z the Gaussian
 * at w's flat index; with a `factor` buffer also factor = f, the derivative ∂out/∂w (program_gradient's chain).
 * max_log <= 87 (the caller checks it). */
void hfc_lognormal_program(const float *w, float *out, float *factor, i64 n, float sigma, float shift, float max_log,
                           uint32_t k0, uint32_t k1, int threads) {
    PARALLEL_FOR_CHUNKS(n, lo, hi) {
        if (factor) {
            for (i64 i = lo; i < hi; ++i) {
                const float f = exp_poly(clampf(gaussian((uint32_t)i, k0, k1) * sigma - shift, -max_log, max_log));
                factor[i] = f;
                out[i] = w[i] * f;
            }
        } else {
            for (i64 i = lo; i < hi; ++i)
                out[i] = w[i] * exp_poly(clampf(gaussian((uint32_t)i, k0, k1) * sigma - shift, -max_log, max_log));
        }
    }
}

/* -- the ADC's pass mask (tile.analog_matmul's saturation) --------------------------------------------------- */

/* out[i] = |y[i]| <= bound, one byte per element (torch.bool), without the float |y| the torch formula makes first;
 * NaN fails the comparison in both. */
void hfc_within(const float *y, uint8_t *out, i64 n, float bound, int threads) {
    PARALLEL_FOR_CHUNKS(n, lo, hi) {
        for (i64 i = lo; i < hi; ++i) out[i] = fabsf(y[i]) <= bound;
    }
}

/* -- the DAC (converters.dac) --------------------------------------------------------------------------------- */

/* x (T, K) contiguous -> out (T, K) integer levels (or scaled values when !quantize), x_absmax (T) or (1). */
void hfc_dac(const float *x, float *out, float *x_absmax, i64 T, i64 K, float qmax, int per_token, int quantize,
             int threads) {
    const i64 rpc = rows_per_chunk(K);
    const i64 n_chunks = (T + rpc - 1) / rpc;
    if (!per_token) {
        int32_t m = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(max : m) if (n_chunks > 1)
        for (i64 b = 0; b < n_chunks; ++b) {
            const i64 lo = b * rpc * K, hi = (b + 1) * rpc < T ? (b + 1) * rpc * K : T * K;
            const int32_t mb = abs_max_bits(x + lo, hi - lo);
            m = mb > m ? mb : m;
        }
        x_absmax[0] = maxf(F(1e-12), as_float((uint32_t)m));
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (n_chunks > 1)
    for (i64 b = 0; b < n_chunks; ++b) {
        const i64 r_hi = (b + 1) * rpc < T ? (b + 1) * rpc : T;
        for (i64 r = b * rpc; r < r_hi; ++r) {
            const float *xr = x + r * K;
            float *o = out + r * K;
            float a;
            if (per_token) {
                a = maxf(F(1e-12), abs_max(xr, K));
                x_absmax[r] = a;
            } else {
                a = x_absmax[0];
            }
            /* torch evaluates the Python expression qmax / absmax as reciprocal(absmax) * qmax. */
            const float f = (1.0f / a) * qmax;
            if (quantize) {
                for (i64 j = 0; j < K; ++j) o[j] = clampf(round_half_even(xr[j] * f), -qmax, qmax);
            } else {
                for (i64 j = 0; j < K; ++j) o[j] = xr[j] * f;
            }
        }
    }
}

/* -- the ADC epilogue (converters.epilogue) ------------------------------------------------------------------- */

/* o[j] (=|+=) c * ADC(y[j] * in_scale + std * z(base + j)), the ADC and the noise optional. Called with
 * constant flags only (see hfc_epilogue), so that each inlined copy is a branch-free loop. */
static inline __attribute__((always_inline)) void adc_row(const float *yr, float *o, i64 O, float c,
                                                          float inv_step, float levels, float in_scale, float std,
                                                          int noise, uint32_t base, uint32_t k0, uint32_t k1, int adc,
                                                          int accumulate) {
    for (i64 j = 0; j < O; ++j) {
        float v = yr[j] * in_scale;
        if (noise) v = v + std * gaussian(base + (uint32_t)j, k0, k1);
        if (adc) v = clampf(round_half_even(v * inv_step), -levels, levels);
        v = v * c;
        o[j] = accumulate ? o[j] + v : v;
    }
}

/* y (tiles, T, O) contiguous analog partial sums -> out (T, O); out may alias y when tiles == 1.
 * recombine (tiles), x_absmax (T) when xa_stride == 1 (per token) or (1) when xa_stride == 0 (per tensor),
 * row_scale (O), bias (O) or NULL. */
void hfc_epilogue(const float *y, float *out, const float *recombine, const float *x_absmax, i64 xa_stride,
                  const float *row_scale, const float *bias, i64 tiles, i64 T, i64 O, float inv_step, float levels,
                  float in_scale, float std, int noise, uint32_t k0, uint32_t k1, int adc, int threads) {
    const i64 rpc = rows_per_chunk(O * tiles);
    const i64 n_chunks = (T + rpc - 1) / rpc;
#pragma omp parallel for schedule(static) num_threads(threads) if (n_chunks > 1)
    for (i64 b = 0; b < n_chunks; ++b) {
        const i64 r_hi = (b + 1) * rpc < T ? (b + 1) * rpc : T;
        for (i64 r = b * rpc; r < r_hi; ++r) {
            float *o = out + r * O;
            const float xa = x_absmax[r * xa_stride];
            for (i64 t = 0; t < tiles; ++t) {
                const float *yr = y + (t * T + r) * O;
                const uint32_t base = (uint32_t)((t * T + r) * O);
                /* o accumulates sum_t c_t * adc(y_t); the first tile initialises it (0 + v == v exactly). Each flag
                 * combination is its own branch-free, vectorized loop. */
                const float c = recombine[t];
                const int variant = (noise ? 4 : 0) | (adc ? 2 : 0) | (t > 0 ? 1 : 0);
#define ADC_ROW(N, A, ACC) adc_row(yr, o, O, c, inv_step, levels, in_scale, std, N, base, k0, k1, A, ACC)
                switch (variant) {
                    case 0: ADC_ROW(0, 0, 0); break;
                    case 1: ADC_ROW(0, 0, 1); break;
                    case 2: ADC_ROW(0, 1, 0); break;
                    case 3: ADC_ROW(0, 1, 1); break;
                    case 4: ADC_ROW(1, 0, 0); break;
                    case 5: ADC_ROW(1, 0, 1); break;
                    case 6: ADC_ROW(1, 1, 0); break;
                    default: ADC_ROW(1, 1, 1); break;
                }
#undef ADC_ROW
            }
            /* Rescale; with the ADC the bias is added on its output grid (QuantBias). */
            if (bias == NULL) {
                for (i64 j = 0; j < O; ++j) o[j] = o[j] * (xa * row_scale[j]);
            } else if (!adc) {
                for (i64 j = 0; j < O; ++j) o[j] = o[j] * (xa * row_scale[j]) + bias[j];
            } else {
                for (i64 j = 0; j < O; ++j) {
                    const float unit = xa * row_scale[j];
                    o[j] = (o[j] + round_half_even(bias[j] / unit)) * unit;
                }
            }
        }
    }
}

/* -- fused helpers of noise models (rng.add_scaled_randn_, IRDrop's correction) ------------------------------- */

/* A second-order term (a noise spread, an IR-drop correction) may come as the bfloat16 result of a bfloat16 product
 * (hf_cim.noise.base.spread_bmm): its value read exactly in float32 (a bfloat16 is a float32's upper half). */
static inline float bf16_at(const uint16_t *p, i64 i) {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = (uint32_t)p[i] << 16;
    return v.f;
}

/* y[i] += std * (z(i) * s_i), s_i = scale[i] or sqrt(max(scale[i], 1e-12)) (sqrt_scale): ReadNoise's output noise
 * with a per-element spread, in one pass instead of clamp, sqrt, draw, multiply and add. ``scale`` is float32, or
 * bfloat16 where scale_bf16. */
void hfc_add_scaled_randn(float *y, const void *scale, i64 n, float std, int sqrt_scale, uint32_t k0, uint32_t k1,
                          int scale_bf16, int threads) {
    const float *sf = (const float *)scale;
    const uint16_t *sb = (const uint16_t *)scale;
    PARALLEL_FOR_CHUNKS(n, lo, hi) {
        if (sqrt_scale && scale_bf16) {
            for (i64 i = lo; i < hi; ++i) {
                const float s = sqrtf(maxf(bf16_at(sb, i), F(1e-12)));
                y[i] = y[i] + std * (gaussian((uint32_t)i, k0, k1) * s);
            }
        } else if (sqrt_scale) {
            for (i64 i = lo; i < hi; ++i) {
                const float s = sqrtf(maxf(sf[i], F(1e-12)));
                y[i] = y[i] + std * (gaussian((uint32_t)i, k0, k1) * s);
            }
        } else if (scale_bf16) {
            for (i64 i = lo; i < hi; ++i) y[i] = y[i] + std * (gaussian((uint32_t)i, k0, k1) * bf16_at(sb, i));
        } else {
            for (i64 i = lo; i < hi; ++i) y[i] = y[i] + std * (gaussian((uint32_t)i, k0, k1) * sf[i]);
        }
    }
}

/* IRDrop's correction: y[i] -= a_i·(0.05·a_i² − 0.2·a_i + 0.5)·y_pos[i], evaluated as ((0.05a − 0.2)a + 0.5)a.
 * ``a`` and ``y_pos`` are float32, or bfloat16 where their flag says so. */
static inline float ir_drop_term(float ai, float pi) { return (((ai * F(0.05) - F(0.2)) * ai + F(0.5)) * ai) * pi; }

void hfc_ir_drop(float *y, const void *a, const void *y_pos, i64 n, int a_bf16, int pos_bf16, int threads) {
    const float *af = (const float *)a, *pf = (const float *)y_pos;
    const uint16_t *ab = (const uint16_t *)a, *pb = (const uint16_t *)y_pos;
    PARALLEL_FOR_CHUNKS(n, lo, hi) {
        if (a_bf16 && pos_bf16) {
            for (i64 i = lo; i < hi; ++i) y[i] = y[i] - ir_drop_term(bf16_at(ab, i), bf16_at(pb, i));
        } else if (a_bf16) {
            for (i64 i = lo; i < hi; ++i) y[i] = y[i] - ir_drop_term(bf16_at(ab, i), pf[i]);
        } else if (pos_bf16) {
            for (i64 i = lo; i < hi; ++i) y[i] = y[i] - ir_drop_term(af[i], bf16_at(pb, i));
        } else {
            for (i64 i = lo; i < hi; ++i) y[i] = y[i] - ir_drop_term(af[i], pf[i]);
        }
    }
}

/* StuckAtFaults.program on a weight tensor in one pass: each weight's device pair g+ = max(w, 0), g- = max(-w, 0),
 * with its uniforms (torch.rand's over the pair tensor: g+ at i, g- at n + i), is stuck off (0) where u < p_off and
 * stuck on (1) where p_off <= u < p_hi (p_hi = p_off + p_on rounded to float32, as torch compares a float32 tensor
 * with a Python number), and out = g+' − g-'. The comparisons are the torch formula's, so the numbers are its
 * numbers. With a `deriv` buffer also deriv = ∂out/∂w as autograd takes it through the torch formula: a device passes
 * its gradient where it is not stuck (u >= p_hi), g+ where w >= 0 and g- where w <= 0 (torch's clamp passes the
 * gradient at its bound, so at w = 0 both do). */
static inline float stuck_device(float g, float u, float p_off, float p_hi) {
    return u < p_off ? F(0.0) : (u < p_hi ? F(1.0) : g);
}

void hfc_stuck_at(const float *w, const float *u, float *out, float *deriv, i64 n, float p_off, float p_hi,
                  int threads) {
    PARALLEL_FOR_CHUNKS(n, lo, hi) {
        for (i64 i = lo; i < hi; ++i) {
            const float wi = w[i];
            out[i] = stuck_device(maxf(F(0.0), wi), u[i], p_off, p_hi) -
                     stuck_device(maxf(F(0.0), -wi), u[n + i], p_off, p_hi);
        }
        if (deriv) {
            /* Both uniforms loaded and each term a float select, not &&: a branch-free loop that vectorizes. */
            for (i64 i = lo; i < hi; ++i) {
                const float wi = w[i], up = u[i], um = u[n + i];
                const float dp = up >= p_hi ? F(1.0) : F(0.0), dm = um >= p_hi ? F(1.0) : F(0.0);
                deriv[i] = (wi >= F(0.0) ? dp : F(0.0)) + (wi <= F(0.0) ? dm : F(0.0));
            }
        }
    }
}

/* x^y for float x >= 0 (or NaN) and a float exponent y, as libm's powf: computed in double (log by the atanh
 * series of the mantissa in [√½, √2), exp by Cody–Waite and its Taylor polynomial; both truncated below 1e-13), then
 * rounded to float once, so within an ulp of the exact power. Branch-free so that the loop vectorizes (libm's powf
 * is a call per element). inf gives inf, NaN NaN; tests/test_noise_pcm.py holds the read pass to the torch formula. */
static inline float pow_poly(float x_f, float y_f) {
    const double x = (double)x_f; /* a float subnormal is a normal double: one exponent path */
    const uint64_t b = as_bits64(x);
    double e = (double)((int64_t)((b >> 52) & 0x7FF) - 1023);
    double m = as_double((b & 0xFFFFFFFFFFFFFULL) | 0x3FF0000000000000ULL); /* x = m·2^e, m in [1, 2) */
    /* Computed unconditionally, then selected: a float operation under a branch is not if-converted. */
    const double m_half = m * 0.5, e_next = e + 1.0;
    const int big = m > 1.4142135623730951;
    m = big ? m_half : m;
    e = big ? e_next : e;
    const double s = (m - 1.0) / (m + 1.0), s2 = s * s; /* ln m = 2·atanh(s), |s| <= 0.172 */
    double p = 1.0 / 19.0;
    p = p * s2 + 1.0 / 17.0;
    p = p * s2 + 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    p = p * s2 + 1.0;
    const double t = (double)y_f * (e * 0.6931471805599453 + 2.0 * s * p); /* y·ln x */
    const double k = nearbyint(t * 1.4426950408889634);
    const double r = (t - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10; /* |r| <= ln2/2 */
    double q = 1.0 / 479001600.0;
    q = q * r + 1.0 / 39916800.0;
    q = q * r + 1.0 / 3628800.0;
    q = q * r + 1.0 / 362880.0;
    q = q * r + 1.0 / 40320.0;
    q = q * r + 1.0 / 5040.0;
    q = q * r + 1.0 / 720.0;
    q = q * r + 1.0 / 120.0;
    q = q * r + 1.0 / 24.0;
    q = q * r + 1.0 / 6.0;
    q = q * r + 0.5;
    q = q * r + 1.0;
    q = q * r + 1.0;
    /* 2^k from its bits (|k| < 1022 for every float x and |y| <= 1); a NaN x makes the scale NaN (an integer select,
     * so the NaN needs no branch). */
    const uint64_t scale = x != x ? 0x7FF8000000000000ULL : (uint64_t)((int64_t)k + 1023) << 52;
    return (float)(q * as_double(scale));
}

/* PCMNoise.read in one pass: out = w·max(0, 1 + scale·σ_r(|w|)·z), σ_r(g) = min(0.0088 / max(max(g, g_min)^0.65,
 * 1e-3), 0.2)·sqrt_log (hf_cim.noise.pcm.pcm_read_std with its time factor), z the Gaussian at w's flat index. The
 * torch formula's operations in its order; the power is pow_poly's, torch's pow its own vectorized one: the two may
 * differ in the last bit (tests/test_noise_pcm.py bounds it). */
void hfc_pcm_read(const float *w, float *out, i64 n, float g_min, float sqrt_log, float scale, uint32_t k0,
                  uint32_t k1, int threads) {
    PARALLEL_FOR_CHUNKS(n, lo, hi) {
        for (i64 i = lo; i < hi; ++i) {
            const float g = maxf(g_min, fabsf(w[i]));
            /* torch evaluates the Python expression 0.0088 / tensor as reciprocal(tensor) * 0.0088. */
            float q = (F(1.0) / maxf(F(1e-3), pow_poly(g, F(0.65)))) * F(0.0088);
            q = q > F(0.2) ? F(0.2) : q;
            const float sigma = q * sqrt_log * scale;
            out[i] = w[i] * maxf(F(0.0), F(1.0) + sigma * gaussian((uint32_t)i, k0, k1));
        }
    }
}

/* The programming noise of a device pair whose σ is a polynomial of the target conductance, in one pass over a weight
 * tensor: each weight's pair g+ = max(w, 0), g- = max(-w, 0) gets g' = clamp(g + s·σ(g)·z, 0, clip_max), z the
 * Gaussian at the pair tensor's flat index (g+ at i, g- at n + i), and out = g+' − g-'. With `bounded` (ReRAMNoise)
 * σ(g) = max(poly(min(g, 1)) / divisor, 0); without (PCMNoise's programming step) σ(g) = poly(g) / divisor. poly:
 * Horner, highest order first, as hf_cim.noise.conductance.polyval. The operations and their order are the torch
 * formulas', so the numbers are their numbers.
 * pair_device also writes *d = ∂g'/∂g as autograd takes it through the torch formula: 0 where a clamp of g' bites,
 * else 1 + z·s·poly'(g)/divisor, the last term (when bounded) only where neither the clamp of g to 1 nor the floor
 * of σ at 0 bites (torch's clamps pass the gradient at their bounds). */
static inline __attribute__((always_inline)) float pair_device(float g, float z, const float *coeffs,
                                                                const int n_coeffs, float divisor, float s,
                                                                const int bounded, const int has_clip,
                                                                float clip_max, float *d) {
    /* Each condition one float comparison feeding a float select, and the flags constants where this is inlined (see
     * pair_program_chunk): then the element loop has no branch and vectorizes. min(g, 1) keeps a NaN g. */
    const float x = bounded && g >= F(1.0) ? F(1.0) : g;
    float p = coeffs[n_coeffs - 1], dp = F(0.0);
    for (int k = n_coeffs - 2; k >= 0; --k) {
        dp = dp * x + p;
        p = p * x + coeffs[k];
    }
    const float sigma_raw = p / divisor;
    const float sigma = (bounded ? maxf(F(0.0), sigma_raw) : sigma_raw) * s;
    const float v = g + sigma * z;
    /* dσ/dg where σ follows g: everywhere unbounded; bounded only where neither the clamp of g to 1 nor σ's floor
     * at 0 bites. Computed unconditionally, then selected (a float operation under a branch is not if-converted). */
    const float dsigma_all = dp / divisor * s;
    const float dsigma = bounded ? (g <= F(1.0) ? (sigma_raw >= F(0.0) ? dsigma_all : F(0.0)) : F(0.0)) : dsigma_all;
    const float d_all = F(1.0) + z * dsigma;
    const float d_floor = v >= F(0.0) ? d_all : F(0.0);
    *d = has_clip ? (v > clip_max ? F(0.0) : d_floor) : d_floor;
    const float v0 = maxf(F(0.0), v);
    return has_clip && v0 > clip_max ? clip_max : v0;
}

/* One chunk of hfc_pair_program, always inlined with constant n_coeffs, bounded, has_clip and has_deriv (the switch
 * below): the Horner loop unrolls and the element loop vectorizes, which it did not with those known only at run
 * time (about 38 ns a weight on one AVX-512 core). */
static inline __attribute__((always_inline)) void pair_program_chunk(const float *w, float *out, float *deriv, i64 n,
                                                                    i64 lo, i64 hi, const float *coeffs,
                                                                    const int n_coeffs, float divisor, float s,
                                                                    const int bounded, const int has_clip,
                                                                    float clip_max, uint32_t k0, uint32_t k1,
                                                                    const int has_deriv) {
    for (i64 i = lo; i < hi; ++i) {
        const float wi = w[i];
        const float gp = maxf(F(0.0), wi), gm = maxf(F(0.0), -wi);
        const float zp = gaussian((uint32_t)i, k0, k1), zm = gaussian((uint32_t)(n + i), k0, k1);
        float dp, dm;
        out[i] = pair_device(gp, zp, coeffs, n_coeffs, divisor, s, bounded, has_clip, clip_max, &dp) -
                 pair_device(gm, zm, coeffs, n_coeffs, divisor, s, bounded, has_clip, clip_max, &dm);
        if (has_deriv) deriv[i] = (wi >= F(0.0) ? dp : F(0.0)) + (wi <= F(0.0) ? dm : F(0.0));
    }
}

/* With a `deriv` buffer also deriv = ∂out/∂w: g+'s derivative where w >= 0 plus g-'s where w <= 0 (see
 * hfc_stuck_at: at w = 0 both, as autograd takes it). */
void hfc_pair_program(const float *w, float *out, float *deriv, i64 n, const float *coeffs, int n_coeffs,
                      float divisor, float s, int bounded, int has_clip, float clip_max, uint32_t k0, uint32_t k1,
                      int threads) {
    /* The presets' curves: ReRAM (Wan 2022) a bounded quartic, PCM (Nandakumar 2019) an unbounded quadratic; any other
     * combination runs the same formula in a generic, scalar loop. */
    const int variant = (n_coeffs == 5 && bounded) ? 1 : (n_coeffs == 3 && !bounded) ? 2 : 0;
    PARALLEL_FOR_CHUNKS(n, lo, hi) {
#define PAIR_CHUNK(N, B, C, D) \
    pair_program_chunk(w, out, deriv, n, lo, hi, coeffs, N, divisor, s, B, C, clip_max, k0, k1, D)
#define PAIR_FLAGS(N, B)                                       \
    if (has_clip) {                                             \
        if (deriv) PAIR_CHUNK(N, B, 1, 1); else PAIR_CHUNK(N, B, 1, 0); \
    } else {                                                    \
        if (deriv) PAIR_CHUNK(N, B, 0, 1); else PAIR_CHUNK(N, B, 0, 0); \
    }
        if (variant == 1) {
            PAIR_FLAGS(5, 1)
        } else if (variant == 2) {
            PAIR_FLAGS(3, 0)
        } else {
            PAIR_CHUNK(n_coeffs, bounded, has_clip, deriv != NULL);
        }
#undef PAIR_FLAGS
#undef PAIR_CHUNK
    }
}
