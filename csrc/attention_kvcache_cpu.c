/* The first half of a KV-cache call on the CPU (kvcache_append_params, attention_params.h):
 * the new keys and values written into the cache at rows cache_seqlens[b] + i, the keys
 * rotated first when rotary tables are given, and q rotated into q_out.
 *
 * A rotated row is read as float32, its first rotary_dim features turned by the angle of its
 * position (cos and sin read as float32 too), and each result rounded once to the dtype; the
 * rest of the row is copied bit for bit. */
#include <string.h>

#include "attention_cpu.h"
#include "scalar_convert.h"

static inline int element_size(lf_scalar type) { return type == LF_SCALAR_F32 ? 4 : 2; }

/* The valid length of sequence b's cache before the append (0 without cache_seqlens). */
static int64_t cache_length(const attention_fwd_params *p, int64_t b) {
    return p->cache_seqlens ? p->cache_seqlens[b] : 0;
}

/* dst = src rotated by the angle of `position` (pairs (2t, 2t + 1) when interleaved, else
 * (t, t + rotary_dim / 2)); features past rotary_dim copied. dst and src may not overlap. */
static void rotate_row(const kvcache_append_params *a, lf_scalar type, int64_t d,
                       int64_t position, const char *src, char *dst) {
    memcpy(dst, src, (size_t)(d * element_size(type)));
    const int64_t half = a->rotary_dim / 2;
    const int64_t first_step = a->interleaved ? 2 : 1, second = a->interleaved ? 1 : half;
    for (int64_t t = 0; t < half; ++t) {
        const float c = lf_load(a->cos, position * half + t, type);
        const float s = lf_load(a->sin, position * half + t, type);
        const int64_t i1 = t * first_step, i2 = i1 + second;
        const float x1 = lf_load(src, i1, type), x2 = lf_load(src, i2, type);
        lf_store(dst, i1, type, x1 * c - x2 * s);
        lf_store(dst, i2, type, x2 * c + x1 * s);
    }
}

/* One row of d elements from src to dst, rotated at `position` when rotary tables are given. */
static void write_row(const kvcache_append_params *a, lf_scalar type, int64_t d, int rotate,
                      int64_t position, const char *src, char *dst) {
    if (rotate) rotate_row(a, type, d, position, src, dst);
    else memcpy(dst, src, (size_t)(d * element_size(type)));
}

void attention_kvcache_append_cpu(const kvcache_append_params *a) {
    const attention_fwd_params *p = a->cache;
    const lf_scalar type = p->dtype;
    const int64_t d = p->head_dim, esize = element_size(type);
    const int64_t seqlen_new = p->seqlen_new, seqlen_q = p->seqlen_q;
    const int rotary = a->cos != NULL;
    /* Parallel over kv heads only: rows of two sequences may land on the same cache row (a
     * repeated cache_batch_idx, a page in two block-table rows), and then the sequences are
     * written in order, the last one's row staying. */
    if (a->k_new != NULL) {
#pragma omp parallel for num_threads(p->num_threads) schedule(static) \
    if (p->batch * seqlen_new * d > (1 << 16))
        for (int64_t h = 0; h < p->heads_kv; ++h) {
            for (int64_t b = 0; b < p->batch; ++b) {
                const int64_t start = cache_length(p, b);
                for (int64_t i = 0; i < seqlen_new && start + i < p->seqlen_k; ++i) {
                    const int64_t j = start + i;
                    const char *k_src = (const char *)a->k_new +
                                        (b * a->kn_batch_stride + i * a->kn_row_stride +
                                         h * a->kn_head_stride) * esize;
                    const char *v_src = (const char *)a->v_new +
                                        (b * a->vn_batch_stride + i * a->vn_row_stride +
                                         h * a->vn_head_stride) * esize;
                    char *k_dst = (char *)p->k + attention_key_offset(p, p->k_batch_stride,
                                                                      p->k_row_stride,
                                                                      p->k_head_stride, b, j,
                                                                      h) * esize;
                    char *v_dst = (char *)p->v + attention_key_offset(p, p->v_batch_stride,
                                                                      p->v_row_stride,
                                                                      p->v_head_stride, b, j,
                                                                      h) * esize;
                    write_row(a, type, d, rotary, j, k_src, k_dst);
                    memcpy(v_dst, v_src, (size_t)(d * esize));
                }
            }
        }
    }
    if (a->q_out != NULL) {
        const int64_t rows = p->batch * seqlen_q * p->heads_q;
#pragma omp parallel for num_threads(p->num_threads) schedule(static) if (rows * d > (1 << 16))
        for (int64_t row = 0; row < rows; ++row) {
            const int64_t h = row % p->heads_q, i = row / p->heads_q % seqlen_q;
            const int64_t b = row / p->heads_q / seqlen_q;
            const int64_t position = cache_length(p, b) + (a->q_positions_follow ? i : 0);
            const char *src = (const char *)a->q + (b * p->q_batch_stride +
                                                    i * p->q_row_stride +
                                                    h * p->q_head_stride) * esize;
            write_row(a, type, d, rotary, position, src, (char *)a->q_out + row * d * esize);
        }
    }
}
