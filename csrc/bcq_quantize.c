/* lutflash._C.bcq_quantize: dense float32 weight -> packed BCQ weight, on the CPU.
 *
 * Every (row, group) is quantized on its own, in double, by one of three methods:
 * - rtn: asymmetric round-to-nearest s·(c − zp), c ∈ [0, 2^q − 1], which is exactly a BCQ
 *   weight with b_i = 2·bit_i(c) − 1, α_i = s·2^(i−1), z = s·((2^q − 1)/2 − zp).
 * - greedy: z = mean, then for each plane b = sign(residual), α = mean|residual|.
 * - alternating: from greedy, repeat (a) least-squares α and z for the codes, (b) the optimal
 *   codes for those α and z; the best (α, z, codes) seen is kept, so it never loses to greedy.
 * Rows are spread over OpenMP threads; each thread owns a slice of one scratch block. */
#include "tensor_arg.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bcq_args.h"
#include "methods.h"

#define BCQ_MAX_LEVELS (1 << BCQ_MAX_BITS)

typedef enum {
    BCQ_METHOD_RTN = 0,
    BCQ_METHOD_GREEDY = 1,
    BCQ_METHOD_ALTERNATING = 2,
} bcq_method;

typedef struct {
    const float *weight; /* (n, k) row-major */
    uint32_t *planes;    /* [words_per_row(k)][bits][n_pad] */
    float *meta;         /* [k / group_size][meta_per_group][n_pad] */
    int64_t n, k, n_pad;
    int bits;
    int group_size;
    bcq_mode mode;
    bcq_method method;
    int rounds;
} bcq_quantize_params;

/* Per-thread scratch: the group in double, the greedy residual, the row's codes (one byte
 * per weight, bit i = plane i) and the alternating method's trial codes. */
typedef struct {
    double *group;
    double *residual;
    uint8_t *codes;
    uint8_t *trial;
} bcq_scratch;

/* Rounded up to 64 bytes so that every thread's doubles are aligned and no two threads
 * share a cache line. */
static int64_t scratch_bytes(const bcq_quantize_params *p) {
    const int64_t bytes = 2 * (int64_t)p->group_size * (int64_t)sizeof(double) + p->k +
                          p->group_size;
    return (bytes + 63) / 64 * 64;
}

static bcq_scratch scratch_at(const bcq_quantize_params *p, char *base) {
    bcq_scratch s;
    s.group = (double *)base;
    s.residual = s.group + p->group_size;
    s.codes = (uint8_t *)(s.residual + p->group_size);
    s.trial = s.codes + p->k;
    return s;
}

/* Asymmetric round-to-nearest. s is rounded to float32 before it is used, so that the stored
 * scale reproduces the codes exactly; rint rounds half to even, as torch.round does. */
static void quantize_group_rtn(const float *w, int g, int bits, uint8_t *codes, double *scale,
                               double *offset) {
    const double top = (double)((1 << bits) - 1);
    double lo = w[0], hi = w[0];
    for (int c = 1; c < g; ++c) {
        lo = w[c] < lo ? w[c] : lo;
        hi = w[c] > hi ? w[c] : hi;
    }
    const double s = (double)(float)((hi - lo) / top);
    if (s == 0.0) {
        /* Every weight of the group is (numerically) the same: all b = -1, α = 0, z = min. */
        memset(codes, 0, (size_t)g);
        *scale = 0.0;
        *offset = lo;
        return;
    }
    const double zp = fmin(fmax(rint(-lo / s), 0.0), top);
    for (int c = 0; c < g; ++c) {
        codes[c] = (uint8_t)fmin(fmax(rint(w[c] / s) + zp, 0.0), top);
    }
    *scale = s;
    *offset = s * (top / 2.0 - zp);
}

/* Greedy BCQ; returns the squared error of the result. */
static double quantize_group_greedy(const double *w, int g, int bits, uint8_t *codes,
                                    double *alpha, double *offset, double *residual) {
    double mean = 0.0;
    for (int c = 0; c < g; ++c) mean += w[c];
    mean /= g;
    for (int c = 0; c < g; ++c) {
        residual[c] = w[c] - mean;
        codes[c] = 0;
    }
    for (int i = 0; i < bits; ++i) {
        double total = 0.0;
        for (int c = 0; c < g; ++c) total += fabs(residual[c]);
        const double a = total / g;
        for (int c = 0; c < g; ++c) {
            const int plus = residual[c] >= 0.0;
            codes[c] |= (uint8_t)(plus << i);
            residual[c] -= plus ? a : -a;
        }
        alpha[i] = a;
    }
    *offset = mean;
    double err = 0.0;
    for (int c = 0; c < g; ++c) err += residual[c] * residual[c];
    return err;
}

/* Weights sharing a code pattern share a row of the least-squares design matrix, so a group
 * enters the normal equations only through the count and the sum of its weights per
 * pattern. */
typedef struct {
    double count[BCQ_MAX_LEVELS];
    double sum[BCQ_MAX_LEVELS];
} code_histogram;

static void histogram_of(const double *w, const uint8_t *codes, int g, int bits,
                         code_histogram *h) {
    const size_t levels = (size_t)1 << bits;
    memset(h->count, 0, sizeof(double) * levels);
    memset(h->sum, 0, sizeof(double) * levels);
    for (int c = 0; c < g; ++c) {
        h->count[codes[c]] += 1.0;
        h->sum[codes[c]] += w[c];
    }
}

/* In place, entry p of v (indexed by code pattern) becomes Σ_t v[t]·Π_{i∈p} s_i(t), with
 * s_i(t) = ±1 the sign of plane i in pattern t: a Walsh–Hadamard transform, q·2^(q−1) adds. */
static void signed_moments(double *v, int bits) {
    const int levels = 1 << bits;
    for (int i = 0; i < bits; ++i) {
        const int bit = 1 << i;
        for (int base = 0; base < levels; base += 2 * bit) {
            for (int p = base; p < base + bit; ++p) {
                const double minus = v[p], plus = v[p + bit];
                v[p] = plus + minus;
                v[p + bit] = plus - minus;
            }
        }
    }
}

/* Least-squares α and z for fixed codes, from their histogram. With ±1 columns, every entry
 * of the normal equations is a signed moment of the histogram (Σ count·s_i·s_j, Σ count·s_i,
 * Σ sum·s_i), so a fit costs O(2^q·q) after the O(g) histogram, not O(g·q²). Returns -1
 * (leaving alpha, offset alone) when the system is singular, e.g. when a plane is constant
 * over the group. */
static int fit_scales(const code_histogram *h, int g, int bits, double *alpha, double *offset) {
    const int levels = 1 << bits, dim = bits + 1;
    double count[BCQ_MAX_LEVELS], sum[BCQ_MAX_LEVELS];
    memcpy(count, h->count, sizeof(double) * (size_t)levels);
    memcpy(sum, h->sum, sizeof(double) * (size_t)levels);
    signed_moments(count, bits);
    signed_moments(sum, bits);
    /* Unknowns α_0..α_{q−1}, then z (whose column is all ones: the empty product). */
    double a[BCQ_MAX_BITS + 1][BCQ_MAX_BITS + 1], rhs[BCQ_MAX_BITS + 1];
    for (int i = 0; i < dim; ++i) {
        const int bit_i = i < bits ? 1 << i : 0;
        rhs[i] = sum[bit_i];
        for (int j = 0; j <= i; ++j) a[i][j] = count[bit_i ^ (j < bits ? 1 << j : 0)];
    }
    /* Cholesky, lower triangle in place. Every diagonal entry is g, so a pivot tiny next to
     * g means a column is (numerically) a combination of the others. */
    for (int j = 0; j < dim; ++j) {
        double d = a[j][j];
        for (int t = 0; t < j; ++t) d -= a[j][t] * a[j][t];
        if (!(d > 1e-10 * g)) return -1;
        d = sqrt(d);
        a[j][j] = d;
        for (int i = j + 1; i < dim; ++i) {
            double v = a[i][j];
            for (int t = 0; t < j; ++t) v -= a[i][t] * a[j][t];
            a[i][j] = v / d;
        }
    }
    double x[BCQ_MAX_BITS + 1];
    for (int i = 0; i < dim; ++i) {
        double v = rhs[i];
        for (int t = 0; t < i; ++t) v -= a[i][t] * x[t];
        x[i] = v / a[i][i];
    }
    for (int i = dim - 1; i >= 0; --i) {
        double v = x[i];
        for (int t = i + 1; t < dim; ++t) v -= a[t][i] * x[t];
        x[i] = v / a[i][i];
    }
    for (int i = 0; i < bits; ++i) alpha[i] = x[i];
    *offset = x[bits];
    return 0;
}

/* The 2^q values z + Σ ±α_i in ascending order with their code patterns. Adding plane i
 * turns a sorted list L into the merge of the sorted lists L − α_i and L + α_i, so the whole
 * table costs O(2^q) with no sort. */
static void sorted_levels(const double *alpha, double offset, int bits, double *value,
                          uint8_t *pattern) {
    double prev_value[BCQ_MAX_LEVELS];
    uint8_t prev_pattern[BCQ_MAX_LEVELS];
    value[0] = offset;
    pattern[0] = 0;
    for (int i = 0, size = 1; i < bits; ++i, size *= 2) {
        memcpy(prev_value, value, sizeof(double) * (size_t)size);
        memcpy(prev_pattern, pattern, (size_t)size);
        const double a = alpha[i];
        const uint8_t bit = (uint8_t)(1u << i);
        int lo = 0, hi = 0, out = 0;
        while (lo < size && hi < size) {
            const double down = prev_value[lo] - a, up = prev_value[hi] + a;
            if (down <= up) {
                value[out] = down;
                pattern[out++] = prev_pattern[lo++];
            } else {
                value[out] = up;
                pattern[out++] = prev_pattern[hi++] | bit;
            }
        }
        for (; lo < size; ++lo, ++out) {
            value[out] = prev_value[lo] - a;
            pattern[out] = prev_pattern[lo];
        }
        for (; hi < size; ++hi, ++out) {
            value[out] = prev_value[hi] + a;
            pattern[out] = prev_pattern[hi] | bit;
        }
    }
}

/* The nearest level for every weight (binary search over the midpoints between sorted
 * levels), with the histogram of the new codes for the next fit; returns the squared error. */
static double assign_codes(const double *w, int g, int bits, const double *value,
                           const uint8_t *pattern, uint8_t *codes, code_histogram *h) {
    const int levels = 1 << bits;
    double mid[BCQ_MAX_LEVELS], count[BCQ_MAX_LEVELS], sum[BCQ_MAX_LEVELS];
    for (int t = 0; t + 1 < levels; ++t) mid[t] = 0.5 * (value[t] + value[t + 1]);
    memset(count, 0, sizeof(double) * (size_t)levels);
    memset(sum, 0, sizeof(double) * (size_t)levels);
    double err = 0.0;
    for (int c = 0; c < g; ++c) {
        const double x = w[c];
        int idx = 0;
        for (int step = levels / 2; step > 0; step /= 2) idx += x > mid[idx + step - 1] ? step : 0;
        codes[c] = pattern[idx];
        count[idx] += 1.0;
        sum[idx] += x;
        const double d = x - value[idx];
        err += d * d;
    }
    /* Counted by level above; every pattern is exactly one level. */
    for (int t = 0; t < levels; ++t) {
        h->count[pattern[t]] = count[t];
        h->sum[pattern[t]] = sum[t];
    }
    return err;
}

static void quantize_group_alternating(const double *w, int g, int bits, int rounds,
                                       uint8_t *codes, uint8_t *trial, double *alpha,
                                       double *offset, double *residual) {
    double best = quantize_group_greedy(w, g, bits, codes, alpha, offset, residual);
    code_histogram histograms[2];
    code_histogram *hist = &histograms[0], *trial_hist = &histograms[1];
    histogram_of(w, codes, g, bits, hist);
    uint8_t *current = codes;
    double value[BCQ_MAX_LEVELS];
    uint8_t pattern[BCQ_MAX_LEVELS];
    for (int round = 0; round < rounds && best > 0.0; ++round) {
        double fit_alpha[BCQ_MAX_BITS], fit_offset = *offset;
        memcpy(fit_alpha, alpha, sizeof(double) * (size_t)bits);
        fit_scales(hist, g, bits, fit_alpha, &fit_offset);
        sorted_levels(fit_alpha, fit_offset, bits, value, pattern);
        const double err = assign_codes(w, g, bits, value, pattern, trial, trial_hist);
        /* A round that does not improve leaves the state as it was, so later rounds would
         * repeat it: stop. */
        if (!(err < best)) break;
        best = err;
        memcpy(alpha, fit_alpha, sizeof(double) * (size_t)bits);
        *offset = fit_offset;
        uint8_t *swap_codes = current;
        current = trial;
        trial = swap_codes;
        code_histogram *swap_hist = hist;
        hist = trial_hist;
        trial_hist = swap_hist;
    }
    if (current != codes) memcpy(codes, current, (size_t)g);
}

static void write_meta(const bcq_quantize_params *p, int64_t group, int64_t row, int entry,
                       double v) {
    const int per_group = bcq_meta_per_group(p->bits, p->mode);
    p->meta[(group * per_group + entry) * p->n_pad + row] = (float)v;
}

/* Packs one row's codes: bit j of word [w][i] is bit i of the code of column 32w + j. */
static void pack_row(const bcq_quantize_params *p, int64_t row, const uint8_t *codes) {
    const int64_t words = bcq_words_per_row(p->k);
    for (int64_t w = 0; w < words; ++w) {
        const int64_t first = w * BCQ_WORD_K;
        const int count = p->k - first < BCQ_WORD_K ? (int)(p->k - first) : BCQ_WORD_K;
        uint32_t word[BCQ_MAX_BITS] = {0};
        for (int j = 0; j < count; ++j) {
            const unsigned code = codes[first + j];
            for (int i = 0; i < p->bits; ++i) word[i] |= ((code >> i) & 1u) << j;
        }
        for (int i = 0; i < p->bits; ++i) p->planes[(w * p->bits + i) * p->n_pad + row] = word[i];
    }
}

static void quantize_row(const bcq_quantize_params *p, int64_t row, bcq_scratch *s) {
    const int g = p->group_size;
    const int64_t groups = p->k / g;
    for (int64_t group = 0; group < groups; ++group) {
        const float *w = p->weight + row * p->k + group * g;
        uint8_t *codes = s->codes + group * g;
        double alpha[BCQ_MAX_BITS], offset;
        if (p->method == BCQ_METHOD_RTN) {
            double scale;
            quantize_group_rtn(w, g, p->bits, codes, &scale, &offset);
            for (int i = 0; i < p->bits; ++i) alpha[i] = scale * ldexp(1.0, i - 1);
        } else {
            for (int c = 0; c < g; ++c) s->group[c] = w[c];
            if (p->method == BCQ_METHOD_GREEDY) {
                quantize_group_greedy(s->group, g, p->bits, codes, alpha, &offset, s->residual);
            } else {
                quantize_group_alternating(s->group, g, p->bits, p->rounds, codes, s->trial,
                                           alpha, &offset, s->residual);
            }
        }
        if (p->mode == BCQ_MODE_UNIFORM) {
            write_meta(p, group, row, 0, 2.0 * alpha[0]);
            write_meta(p, group, row, 1, offset);
        } else {
            for (int i = 0; i < p->bits; ++i) write_meta(p, group, row, i, alpha[i]);
            write_meta(p, group, row, p->bits, offset);
        }
    }
    pack_row(p, row, s->codes);
}

/* Rows past n in the packed tensors are zero bits and zero metadata. */
static void zero_padded_rows(const bcq_quantize_params *p) {
    const int64_t plane_rows = bcq_words_per_row(p->k) * p->bits;
    const int64_t meta_rows = p->k / p->group_size * bcq_meta_per_group(p->bits, p->mode);
    const size_t pad = (size_t)(p->n_pad - p->n);
    for (int64_t t = 0; t < plane_rows; ++t)
        memset(p->planes + t * p->n_pad + p->n, 0, pad * sizeof(uint32_t));
    for (int64_t t = 0; t < meta_rows; ++t)
        memset(p->meta + t * p->n_pad + p->n, 0, pad * sizeof(float));
}

/* Index (row * k + col) of the first NaN or Inf in row-major order, or -1. */
static int64_t first_non_finite(const bcq_quantize_params *p) {
    int64_t first = INT64_MAX;
#pragma omp parallel for schedule(static) reduction(min : first)
    for (int64_t row = 0; row < p->n; ++row) {
        const float *w = p->weight + row * p->k;
        for (int64_t c = 0; c < p->k; ++c) {
            if (!isfinite(w[c])) {
                first = row * p->k + c < first ? row * p->k + c : first;
                break;
            }
        }
    }
    return first == INT64_MAX ? -1 : first;
}

/* Index into meta of the first metadata value that overflowed float32 (a weight range near
 * FLT_MAX can give such alphas or offsets), or -1. */
static int64_t first_non_finite_meta(const bcq_quantize_params *p) {
    const int64_t total = p->k / p->group_size * bcq_meta_per_group(p->bits, p->mode) * p->n_pad;
    for (int64_t i = 0; i < total; ++i) {
        if (!isfinite(p->meta[i])) return i;
    }
    return -1;
}

static void bcq_quantize_cpu(const bcq_quantize_params *p, char *scratch, int threads) {
    const int64_t stride = scratch_bytes(p);
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int thread = omp_get_thread_num();
#else
        const int thread = 0;
#endif
        bcq_scratch s = scratch_at(p, scratch + thread * stride);
        /* Alternating rows stop early at different rounds, hence the dynamic schedule. */
#pragma omp for schedule(dynamic, 4)
        for (int64_t row = 0; row < p->n; ++row) quantize_row(p, row, &s);
    }
    zero_padded_rows(p);
}

static int check_cpu(const lf_tensor *t) {
    return lf_check_cpu(t, "the quantizers run on the CPU");
}

enum { ARG_WEIGHT, ARG_PLANES, ARG_META, ARG_COUNT };

static PyObject *py_bcq_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError,
                     "bcq_quantize(weight, planes, meta, n, k, bits, group_size, mode, method, "
                     "rounds) takes 10 arguments, got %zd", nargs);
        return NULL;
    }
    static const char *const names[ARG_COUNT] = {"weight", "planes", "meta"};
    lf_tensor t[ARG_COUNT];
    for (int i = 0; i < ARG_COUNT; ++i) lf_tensor_borrow_optional(NULL, names[i], &t[i]);
    PyObject *result = NULL;
    char *scratch = NULL;
    bcq_quantize_params p = {0};
    int64_t method, rounds;

    if (bcq_parse_shape(args[3], args[4], args[5], args[6], args[7], &p.n, &p.k, &p.bits,
                        &p.group_size, &p.mode) < 0 ||
        lf_parse_int(args[8], "method", BCQ_METHOD_RTN, BCQ_METHOD_ALTERNATING, &method) < 0 ||
        lf_parse_int(args[9], "rounds", 0, INT32_MAX, &rounds) < 0)
        goto done;
    if (p.mode == BCQ_MODE_UNIFORM && method != BCQ_METHOD_RTN) {
        PyErr_Format(PyExc_ValueError,
                     "mode: uniform metadata (mode %d) needs method %d (rtn); greedy and "
                     "alternating give non-uniform alphas, got method %lld", BCQ_MODE_UNIFORM,
                     BCQ_METHOD_RTN, (long long)method);
        goto done;
    }
    p.method = (bcq_method)method;
    p.rounds = (int)rounds;
    p.n_pad = bcq_padded_rows(p.n);
    for (int i = 0; i < ARG_COUNT; ++i) {
        if (lf_tensor_borrow(args[i], names[i], &t[i]) < 0) goto done;
    }
    lf_tensor *weight = &t[ARG_WEIGHT], *planes = &t[ARG_PLANES], *meta = &t[ARG_META];
    const int64_t weight_shape[2] = {p.n, p.k};
    if (lf_check_supported_device(weight) < 0 || check_cpu(weight) < 0 ||
        lf_check_dtype(weight, LF_DTYPE_F32) < 0 || lf_check_ndim(weight, 2) < 0 ||
        lf_check_shape(weight, 2, weight_shape) < 0 || lf_check_contiguous(weight) < 0 ||
        lf_check_aligned(weight, sizeof(float)) < 0)
        goto done;
    if (bcq_check_packed(planes, meta, p.n, p.k, p.bits, p.group_size, p.mode) < 0 ||
        check_cpu(planes) < 0 || lf_check_dtype(meta, LF_DTYPE_F32) < 0 ||
        lf_check_writable(planes) < 0 || lf_check_writable(meta) < 0 ||
        lf_check_no_overlap(planes, weight) < 0 || lf_check_no_overlap(meta, weight) < 0 ||
        lf_check_no_overlap(meta, planes) < 0)
        goto done;
    p.weight = (const float *)weight->data;
    p.planes = (uint32_t *)planes->data;
    p.meta = (float *)meta->data;

#ifdef _OPENMP
    const int threads = omp_get_max_threads();
#else
    const int threads = 1;
#endif
    scratch = malloc((size_t)(threads * scratch_bytes(&p)));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t bad, overflow = -1;
    Py_BEGIN_ALLOW_THREADS
    bad = first_non_finite(&p);
    if (bad < 0) {
        bcq_quantize_cpu(&p, scratch, threads);
        overflow = first_non_finite_meta(&p);
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "weight: contains NaN or Inf at (%lld, %lld)",
                     (long long)(bad / p.k), (long long)(bad % p.k));
        goto done;
    }
    if (overflow >= 0) {
        const int64_t per_group = bcq_meta_per_group(p.bits, p.mode) * p.n_pad;
        PyErr_Format(PyExc_ValueError,
                     "weight: row %lld, group %lld spans a range too large for float32 "
                     "metadata", (long long)(overflow % p.n_pad),
                     (long long)(overflow / per_group));
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    free(scratch);
    for (int i = 0; i < ARG_COUNT; ++i) lf_tensor_release(&t[i]);
    return result;
}

PyMethodDef bcq_quantize_methods[] = {
    {"bcq_quantize", (PyCFunction)(void (*)(void))py_bcq_quantize, METH_FASTCALL,
     "bcq_quantize(weight, planes, meta, n, k, bits, group_size, mode, method, rounds): "
     "quantizes a float32 CPU weight (n, k) into packed planes and float32 meta. mode: 0 "
     "general, 1 uniform; method: 0 rtn, 1 greedy, 2 alternating."},
    {NULL, NULL, 0, NULL},
};
