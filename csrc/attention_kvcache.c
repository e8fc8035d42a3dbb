/* lutflash._C.attention_kvcache_forward: flash_attention_with_kvcache's argument validation
 * and dispatch. The new keys and values (rotated when rotary tables are given) are appended
 * to the caches in place, q is rotated into q_rotated, then the forward attends to each
 * sequence's valid cache prefix: on the CPU attention_kvcache_append_cpu then
 * attention_forward_cpu, on CUDA attention_kvcache_append_cuda then attention_forward_cuda,
 * both on the caller's stream. Python allocates out, lse, q_rotated and the workspace; every
 * argument is checked here again, the values of CPU index tensors included (on a GPU reading
 * them would synchronize; the kernels clamp there). */
#include "tensor_arg.h"

#include <string.h>

#include "attention_args.h"
#include "attention_cpu.h"
#include "methods.h"
#include "runtime.h"

#ifdef LUTFLASH_WITH_CUDA
#include "lutflash_cuda.h"
#endif

enum {
    KV_Q, KV_K_CACHE, KV_V_CACHE, KV_K, KV_V, KV_CACHE_SEQLENS, KV_CACHE_BATCH_IDX,
    KV_BLOCK_TABLE, KV_ALIBI, KV_SINKS, KV_COS, KV_SIN, KV_Q_ROTATED, KV_OUT, KV_LSE,
    KV_WORKSPACE, KV_COUNT
};

static const char *const tensor_names[KV_COUNT] = {
    "q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "cache_batch_idx", "block_table",
    "alibi_slopes", "sinks", "rotary_cos", "rotary_sin", "q_rotated", "out", "lse",
    "workspace"};

/* Private copies of the CPU index tensors, read by the kernels while the GIL is released
 * (another thread may write the tensors meanwhile); freed by the caller. */
typedef struct {
    int32_t *cache_seqlens, *cache_batch_idx, *block_table;
} index_copies;

/* An int32 index tensor on q's device with `ndim` dimensions (shape entries -1: any), its
 * last dimension contiguous. */
static int check_index_tensor(const lf_tensor *t, const lf_tensor *q, int ndim,
                              const int64_t *shape) {
    if (lf_check_dtype(t, LF_DTYPE_I32) < 0 || lf_check_same_device(t, q) < 0 ||
        lf_check_shape(t, ndim, shape) < 0 || attention_check_inner_contiguous(t) < 0 ||
        lf_check_element_aligned(t) < 0)
        return -1;
    return 0;
}

/* The values of a checked CPU index tensor (1-D, or 2-D rows) copied into *copy as dense
 * rows; nothing to do on a GPU. */
static int copy_index_values(const lf_tensor *t, int32_t **copy) {
    if (t->device_type != LF_DEVICE_CPU) return 0;
    const int64_t rows = t->ndim == 2 ? t->shape[0] : 1, cols = t->shape[t->ndim - 1];
    *copy = PyMem_Malloc(sizeof(int32_t) * (size_t)(rows * cols > 0 ? rows * cols : 1));
    if (*copy == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int64_t r = 0; r < rows && cols > 0; ++r)
        memcpy(*copy + r * cols, (const int32_t *)t->data + (t->ndim == 2 ? r * t->strides[0] : 0),
               sizeof(int32_t) * (size_t)cols);
    return 0;
}

/* cache_seqlens, cache_batch_idx and block_table: types and shapes, then (CPU) values. Fills
 * the cache fields of p; p->seqlen_k is the capacity of one sequence's cache. */
static int check_cache_indices(const lf_tensor *t, attention_fwd_params *p, index_copies *c) {
    const lf_tensor *q = &t[KV_Q], *k_cache = &t[KV_K_CACHE];
    const lf_tensor *seqlens = &t[KV_CACHE_SEQLENS], *batch_idx = &t[KV_CACHE_BATCH_IDX];
    const lf_tensor *table = &t[KV_BLOCK_TABLE];
    const int64_t batch = p->batch, per_batch[1] = {batch};
    if (check_index_tensor(seqlens, q, 1, per_batch) < 0 ||
        copy_index_values(seqlens, &c->cache_seqlens) < 0)
        return -1;
    p->cache_seqlens = c->cache_seqlens ? c->cache_seqlens : (const int32_t *)seqlens->data;
    if (lf_tensor_present(table)) {
        if (lf_tensor_present(batch_idx)) {
            PyErr_SetString(PyExc_ValueError,
                            "cache_batch_idx: expected None with block_table (a paged cache's "
                            "rows are chosen by block_table)");
            return -1;
        }
        const int64_t table_shape[2] = {batch, -1};
        if (check_index_tensor(table, q, 2, table_shape) < 0) return -1;
        p->num_pages = k_cache->shape[0];
        p->page_size = k_cache->shape[1];
        if (p->page_size < 1) {
            PyErr_SetString(PyExc_ValueError,
                            "k_cache: expected pages of at least one row (num_pages, page_size, "
                            "heads, head_dim), got page_size 0");
            return -1;
        }
        if (table->shape[1] > INT32_MAX / p->page_size) {
            PyErr_Format(PyExc_ValueError,
                         "block_table: %lld pages of %lld rows per sequence exceed 2^31 - 1 keys",
                         (long long)table->shape[1], (long long)p->page_size);
            return -1;
        }
        if (copy_index_values(table, &c->block_table) < 0) return -1;
        p->block_table = c->block_table ? c->block_table : (const int32_t *)table->data;
        p->block_table_stride = c->block_table ? table->shape[1] : table->strides[0];
        p->seqlen_k = table->shape[1] * p->page_size;
        p->kv_batch = p->num_pages;
    } else {
        p->seqlen_k = k_cache->shape[1];
        p->kv_batch = k_cache->shape[0];
        if (lf_tensor_present(batch_idx)) {
            if (check_index_tensor(batch_idx, q, 1, per_batch) < 0 ||
                copy_index_values(batch_idx, &c->cache_batch_idx) < 0)
                return -1;
            p->kv_batch_idx =
                c->cache_batch_idx ? c->cache_batch_idx : (const int32_t *)batch_idx->data;
        } else if (k_cache->shape[0] != batch) {
            PyErr_Format(PyExc_ValueError,
                         "k_cache: expected batch %lld (the batch of q) without cache_batch_idx, "
                         "got %lld", (long long)batch, (long long)k_cache->shape[0]);
            return -1;
        }
        if (p->seqlen_k > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError,
                            "k_cache: sequence lengths above 2^31 - 1 are not supported");
            return -1;
        }
    }
    if (p->seqlen_new > p->seqlen_k) {
        PyErr_Format(PyExc_ValueError,
                     "k: expected at most %lld new keys per sequence (what the cache holds), "
                     "got %lld", (long long)p->seqlen_k, (long long)p->seqlen_new);
        return -1;
    }
    if (q->device_type != LF_DEVICE_CPU) return 0; /* values live on the GPU */
    for (int64_t b = 0; b < batch; ++b) {
        const int64_t start = p->cache_seqlens[b], length = start + p->seqlen_new;
        if (start < 0 || length > p->seqlen_k) {
            PyErr_Format(PyExc_ValueError,
                         "cache_seqlens: expected values in [0, %lld] (the cache holds %lld "
                         "keys per sequence, %lld new ones are appended), got %lld at index "
                         "%lld", (long long)(p->seqlen_k - p->seqlen_new),
                         (long long)p->seqlen_k, (long long)p->seqlen_new, (long long)start,
                         (long long)b);
            return -1;
        }
        if (p->kv_batch_idx && (p->kv_batch_idx[b] < 0 || p->kv_batch_idx[b] >= p->kv_batch)) {
            PyErr_Format(PyExc_ValueError,
                         "cache_batch_idx: expected values in [0, %lld) (the batch of k_cache), "
                         "got %d at index %lld", (long long)p->kv_batch, p->kv_batch_idx[b],
                         (long long)b);
            return -1;
        }
        /* Only the pages that hold a key of the sequence are read; the rest may be anything. */
        for (int64_t page = 0; p->block_table && page * p->page_size < length; ++page) {
            const int32_t number = p->block_table[b * p->block_table_stride + page];
            if (number < 0 || number >= p->num_pages) {
                PyErr_Format(PyExc_ValueError,
                             "block_table: expected page numbers in [0, %lld) (the pages of "
                             "k_cache) where a sequence has keys, got %d at (%lld, %lld)",
                             (long long)p->num_pages, number, (long long)b, (long long)page);
                return -1;
            }
        }
    }
    return 0;
}

/* rotary_cos and rotary_sin (seqlen_ro, rotary_dim / 2) of q's dtype, given with k and v,
 * long enough for every position they are read at (CPU values); q_rotated exactly then. */
static int check_rotary(const lf_tensor *t, const attention_fwd_params *p,
                        kvcache_append_params *a) {
    const lf_tensor *q = &t[KV_Q], *cos = &t[KV_COS], *sin = &t[KV_SIN];
    const lf_tensor *q_rotated = &t[KV_Q_ROTATED];
    if (lf_tensor_present(cos) != lf_tensor_present(sin)) {
        PyErr_SetString(PyExc_ValueError,
                        "rotary_sin: expected rotary_cos and rotary_sin both given or both None");
        return -1;
    }
    if (lf_tensor_present(q_rotated) != lf_tensor_present(cos)) {
        PyErr_SetString(PyExc_ValueError,
                        "q_rotated: expected a tensor exactly when rotary_cos is given");
        return -1;
    }
    if (!lf_tensor_present(cos)) return 0;
    if (!lf_tensor_present(&t[KV_K])) {
        PyErr_SetString(PyExc_ValueError,
                        "rotary_cos: rotary embeddings apply to new keys: expected k and v");
        return -1;
    }
    if (lf_check_same_device(cos, q) < 0 || lf_check_same_dtype(cos, q) < 0 ||
        lf_check_ndim(cos, 2) < 0 || lf_check_contiguous(cos) < 0 ||
        lf_check_element_aligned(cos) < 0)
        return -1;
    const int64_t d = p->head_dim, half = cos->shape[1];
    if (half < 1 || 2 * half > d) {
        PyErr_Format(PyExc_ValueError,
                     "rotary_cos: expected rotary_dim / 2 columns with 2 <= rotary_dim <= %lld "
                     "(the head dim), got %lld columns", (long long)d, (long long)half);
        return -1;
    }
    if (lf_check_same_device(sin, q) < 0 || lf_check_same_dtype(sin, q) < 0 ||
        lf_check_shape(sin, 2, cos->shape) < 0 || lf_check_contiguous(sin) < 0 ||
        lf_check_element_aligned(sin) < 0)
        return -1;
    const int64_t q_shape[4] = {p->batch, p->seqlen_q, p->heads_q, d};
    if (attention_check_output(q_rotated, q, q->dtype, 4, q_shape) < 0 ||
        (lf_tensor_numel(q_rotated) > 0 && lf_check_contiguous(q_rotated) < 0))
        return -1;
    a->cos = cos->data, a->sin = sin->data;
    a->seqlen_ro = cos->shape[0];
    a->rotary_dim = 2 * half;
    a->q_positions_follow = p->window_left >= 0 || p->window_right >= 0;
    if (q->device_type != LF_DEVICE_CPU) return 0;
    for (int64_t b = 0; b < p->batch; ++b) {
        /* one past the last position read: of the new keys, of the queries */
        const int64_t start = p->cache_seqlens[b], k_end = start + p->seqlen_new;
        const int64_t q_end =
            p->seqlen_q == 0 ? 0 : start + (a->q_positions_follow ? p->seqlen_q : 1);
        const int64_t end = k_end > q_end ? k_end : q_end;
        if (end > a->seqlen_ro) {
            PyErr_Format(PyExc_ValueError,
                         "rotary_cos: expected at least %lld rows (positions up to %lld for "
                         "sequence %lld), got %lld", (long long)end, (long long)(end - 1),
                         (long long)b, (long long)a->seqlen_ro);
            return -1;
        }
    }
    return 0;
}

static int launch_kvcache_append(const void *arg, void *stream) {
#ifdef LUTFLASH_WITH_CUDA
    return attention_kvcache_append_cuda((const kvcache_append_params *)arg, stream);
#else
    (void)arg, (void)stream;
    return -1;
#endif
}

static const char KVCACHE_SIGNATURE[] =
    "attention_kvcache_forward(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, "
    "block_table, alibi_slopes, sinks, rotary_cos, rotary_sin, q_rotated, out, lse, workspace, "
    "softmax_scale, softcap, window_left, window_right, rotary_interleaved, num_threads, "
    "variant, stream)";

static PyObject *py_attention_kvcache_forward(PyObject *self, PyObject *const *args,
                                              Py_ssize_t nargs) {
    (void)self;
    if (nargs != KV_COUNT + 8) {
        PyErr_Format(PyExc_TypeError, "%s takes %d arguments, got %zd", KVCACHE_SIGNATURE,
                     KV_COUNT + 8, nargs);
        return NULL;
    }
    lf_tensor t[KV_COUNT];
    for (int i = 0; i < KV_COUNT; ++i) lf_tensor_borrow_optional(NULL, tensor_names[i], &t[i]);
    PyObject *result = NULL;
    attention_fwd_params p = {0};
    kvcache_append_params a = {0};
    index_copies copies = {0};
    int64_t interleaved, threads, variant;
    void *stream = NULL;
    PyObject *const *scalars = args + KV_COUNT;
    if (attention_parse_score_options(scalars[0], scalars[1], scalars[2], scalars[3], &p) < 0 ||
        lf_parse_int(scalars[4], "rotary_interleaved", 0, 1, &interleaved) < 0 ||
        lf_parse_int(scalars[5], "num_threads", 1, 4096, &threads) < 0 ||
        lf_parse_int(scalars[6], "variant", 0, ATTENTION_CPU_VARIANT_MAX, &variant) < 0 ||
        lf_parse_stream(scalars[7], &stream) < 0)
        goto done;
    for (int i = 0; i < KV_COUNT; ++i) {
        const int required = i == KV_Q || i == KV_K_CACHE || i == KV_V_CACHE ||
                             i == KV_CACHE_SEQLENS || i >= KV_OUT;
        if ((required ? lf_tensor_borrow(args[i], tensor_names[i], &t[i])
                      : lf_tensor_borrow_optional(args[i], tensor_names[i], &t[i])) < 0)
            goto done;
    }
    lf_tensor *q = &t[KV_Q], *k_cache = &t[KV_K_CACHE], *v_cache = &t[KV_V_CACHE];
    lf_tensor *k = &t[KV_K], *v = &t[KV_V], *out = &t[KV_OUT], *lse = &t[KV_LSE];

    /* q (B, Sq, Hq, D) and the caches (B_cache, S_cache, Hkv, D) or, paged, (num_pages,
     * page_size, Hkv, D): written in place, so rows may not overlap. */
    if (lf_check_supported_device(q) < 0 || lf_check_dtype(q, LF_DTYPES_FLOAT) < 0 ||
        lf_check_ndim(q, 4) < 0 || attention_check_inner_contiguous(q) < 0)
        goto done;
    p.batch = q->shape[0], p.seqlen_q = q->shape[1], p.heads_q = q->shape[2];
    p.head_dim = q->shape[3];
    if (p.head_dim < 1 || p.head_dim > ATTENTION_MAX_HEAD_DIM) {
        PyErr_Format(PyExc_ValueError, "q: expected a head dim in [1, %d], got %lld",
                     ATTENTION_MAX_HEAD_DIM, (long long)p.head_dim);
        goto done;
    }
    if (p.seqlen_q > INT32_MAX || p.batch * p.heads_q > (int64_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError,
                        "q: sequence lengths above 2^31 - 1 or batch * heads above 2^32 are not "
                        "supported");
        goto done;
    }
    if (lf_check_ndim(k_cache, 4) < 0) goto done;
    p.heads_kv = k_cache->shape[2];
    if (p.heads_q < 1 || p.heads_kv < 1 || p.heads_q % p.heads_kv != 0) {
        PyErr_Format(PyExc_ValueError,
                     "k_cache: expected a number of kv heads that divides the %lld query heads, "
                     "got %lld", (long long)p.heads_q, (long long)p.heads_kv);
        goto done;
    }
    const int64_t cache_shape[4] = {-1, -1, p.heads_kv, p.head_dim};
    if (attention_check_output(k_cache, q, q->dtype, 4, cache_shape) < 0 ||
        attention_check_output(v_cache, q, q->dtype, 4, k_cache->shape) < 0)
        goto done;

    /* k and v (B, Sn, Hkv, D): both or neither. */
    if (lf_tensor_present(k) != lf_tensor_present(v)) {
        PyErr_SetString(PyExc_ValueError, "v: expected k and v both given or both None");
        goto done;
    }
    if (lf_tensor_present(k)) {
        const int64_t new_shape[4] = {p.batch, -1, p.heads_kv, p.head_dim};
        if (attention_check_like(k, q, 4, new_shape) < 0 ||
            attention_check_like(v, q, 4, k->shape) < 0)
            goto done;
        p.seqlen_new = k->shape[1];
        if (p.seqlen_new > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError,
                            "k: sequence lengths above 2^31 - 1 are not supported");
            goto done;
        }
        a.k_new = k->data, a.v_new = v->data;
        a.kn_batch_stride = k->strides[0], a.kn_row_stride = k->strides[1];
        a.kn_head_stride = k->strides[2];
        a.vn_batch_stride = v->strides[0], a.vn_row_stride = v->strides[1];
        a.vn_head_stride = v->strides[2];
    }
    if (check_cache_indices(t, &p, &copies) < 0 ||
        attention_check_alibi(&t[KV_ALIBI], q, p.batch, p.heads_q, &p) < 0 ||
        attention_check_sinks(&t[KV_SINKS], q, p.heads_q, &p) < 0 || check_rotary(t, &p, &a) < 0)
        goto done;

    const int64_t lse_shape[3] = {p.batch, p.heads_q, p.seqlen_q};
    if (attention_check_output(out, q, q->dtype, 4, q->shape) < 0 ||
        attention_check_lse(lse, q, 3, lse_shape, 1) < 0)
        goto done;
    const int on_cuda = q->device_type == LF_DEVICE_CUDA;
    int64_t need = attention_cpu_forward_thread_bytes(p.head_dim);
#ifdef LUTFLASH_WITH_CUDA
    if (on_cuda) /* the decode path's split records: the kernels trust this size */
        need = attention_cuda_forward_workspace_bytes(p.batch, p.heads_q, p.heads_kv, p.seqlen_q,
                                                      p.seqlen_k, p.head_dim,
                                                      p.batch * p.seqlen_q);
#endif
    /* Paged caches may be two views of one buffer: transformers' paged cache alternates a
     * layer's K and V pages in one tensor and passes v_cache[p] = k_cache[p + 1]. The kernels
     * read and write only the pages the block table names, so that pair may overlap (the
     * caller keeps the named K and V pages apart); everything else is disjoint. */
    const int outputs[6] = {KV_K_CACHE, KV_V_CACHE, KV_Q_ROTATED, KV_OUT, KV_LSE, KV_WORKSPACE};
    const int paged = lf_tensor_present(&t[KV_BLOCK_TABLE]);
    if (attention_check_workspace(&t[KV_WORKSPACE], q, need) < 0 ||
        attention_check_disjoint_except(t, KV_COUNT, outputs, 6, paged ? KV_K_CACHE : -1,
                                        paged ? KV_V_CACHE : -1) < 0)
        goto done;
    if (on_cuda) {
        const lf_tensor layout[7] = {*q, *k_cache, *v_cache, *k, *v, t[KV_Q_ROTATED], *out};
        if (attention_check_cuda_layout(layout, 7, "flash_attention_with_kvcache") < 0)
            goto done;
    }

    p.dtype = lf_scalar_of(q->dtype);
    p.q = q->data, p.k = k_cache->data, p.v = v_cache->data;
    p.q_batch_stride = q->strides[0], p.q_row_stride = q->strides[1];
    p.q_head_stride = q->strides[2];
    p.k_batch_stride = k_cache->strides[0], p.k_row_stride = k_cache->strides[1];
    p.k_head_stride = k_cache->strides[2];
    p.v_batch_stride = v_cache->strides[0], p.v_row_stride = v_cache->strides[1];
    p.v_head_stride = v_cache->strides[2];
    p.out = out->data;
    p.out_batch_stride = out->strides[0], p.out_row_stride = out->strides[1];
    p.out_head_stride = out->strides[2];
    p.lse = (float *)lse->data;
    p.lse_batch_stride = p.heads_q * p.seqlen_q, p.lse_head_stride = p.seqlen_q;
    p.workspace = t[KV_WORKSPACE].data;
    p.workspace_bytes = t[KV_WORKSPACE].shape[0];
    p.num_threads = (int)threads, p.variant = (int)variant;

    /* The append reads q at p's q strides and writes q_rotated densely; the forward then
     * reads q_rotated. */
    a.cache = &p;
    a.q = q->data;
    a.q_out = t[KV_Q_ROTATED].data;
    a.interleaved = (int)interleaved;
    const int append = a.k_new != NULL || a.q_out != NULL;
    if (on_cuda) {
        if (append && lf_cuda_call("flash_attention_with_kvcache", q->device_id,
                                   launch_kvcache_append, &a, stream) < 0)
            goto done;
    } else if (append) {
        Py_BEGIN_ALLOW_THREADS
        attention_kvcache_append_cpu(&a);
        Py_END_ALLOW_THREADS
    }
    if (a.q_out != NULL) {
        p.q = a.q_out;
        p.q_batch_stride = p.seqlen_q * p.heads_q * p.head_dim;
        p.q_row_stride = p.heads_q * p.head_dim;
        p.q_head_stride = p.head_dim;
    }
    if (on_cuda) {
        if (lf_cuda_call("flash_attention_with_kvcache", q->device_id, attention_launch_forward,
                         &p, stream) < 0)
            goto done;
    } else {
        Py_BEGIN_ALLOW_THREADS
        attention_forward_cpu(&p, (int)variant);
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(copies.cache_seqlens);
    PyMem_Free(copies.cache_batch_idx);
    PyMem_Free(copies.block_table);
    for (int i = 0; i < KV_COUNT; ++i) lf_tensor_release(&t[i]);
    return result;
}

PyMethodDef attention_kvcache_methods[] = {
    {"attention_kvcache_forward", (PyCFunction)(void (*)(void))py_attention_kvcache_forward,
     METH_FASTCALL,
     "attention_kvcache_forward(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, "
     "block_table, alibi_slopes, sinks, rotary_cos, rotary_sin, q_rotated, out, lse, workspace, "
     "softmax_scale, softcap, window_left, window_right, rotary_interleaved, num_threads, "
     "variant, stream): appends k and v (rotated) to the caches in place, rotates q into "
     "q_rotated, and writes out and lse of attention over each sequence's valid cache."},
    {NULL, NULL, 0, NULL},
};
