/* Arithmetic helpers: exp for x <= 0, scalar and on 8-float vectors (GCC/Clang extensions). */
/* exp(x) for the softmax's x <= 0 (after subtracting the row maximum), vectorisable:
 * x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7,
 * about float32's own rounding), 2^n assembled in the exponent bits; x < -87 gives 0. */
static inline float exp_nonpositive(float x) {
    const float log2e = 1.44269504f, ln2_hi = 0.693145752f, ln2_lo = 1.42860677e-06f;
    float xc = x < -87.0f ? -87.0f : x;
    float n = nearbyintf(xc * log2e);
    float r = (xc - n * ln2_hi) - n * ln2_lo;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union {
        int32_t i;
        float f;
    } scale;
    scale.i = ((int32_t)n + 127) << 23;
    float y = p * scale.f;
    return x < -87.0f ? 0.0f : y;
}


/* Rows of CS floats as CS/8 vectors of 8 (GCC/Clang vector extensions: explicit SIMD that
 * still compiles, as pairs of SSE registers, without AVX).  Vertex rows are 32-byte aligned. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f v8_splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* mask ? a : b lane by lane (C has no vector ?:; a comparison gives 0 / -1 per lane) */
static inline v8f v8_select(v8i mask, v8f a, v8f b) {
    return (v8f)((mask & (v8i)a) | (~mask & (v8i)b));
}

/* exp_nonpositive on 8 lanes (the same arithmetic: rounding by the 1.5 * 2^23 trick is
 * round-half-even, as nearbyintf in the default rounding mode). */
static inline v8f v8_exp_nonpositive(v8f x) {
    const v8f lo = v8_splat(-87.0f), magic = v8_splat(12582912.0f);
    v8f xc = v8_select(x < lo, lo, x);
    v8f n = (xc * v8_splat(1.44269504f) + magic) - magic;
    v8f r = (xc - n * v8_splat(0.693145752f)) - n * v8_splat(1.42860677e-06f);
    v8f p = v8_splat(1.0f / 720.0f);
    p = p * r + v8_splat(1.0f / 120.0f);
    p = p * r + v8_splat(1.0f / 24.0f);
    p = p * r + v8_splat(1.0f / 6.0f);
    p = p * r + v8_splat(0.5f);
    p = p * r + v8_splat(1.0f);
    p = p * r + v8_splat(1.0f);
    v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    v8f y = p * (v8f)bits;
    return v8_select(x < lo, v8_splat(0.0f), y);
}

static inline float v8_hmax(v8f x) {
    float m = x[0];
    for (int k = 1; k < 8; k++) m = x[k] > m ? x[k] : m;
    return m;
}

static inline float v8_hsum(v8f x) {
    return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

/* Unaligned 8-float vectors (rows of (n, c) arrays start at any float). */
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));
