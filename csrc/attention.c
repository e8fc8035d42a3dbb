/* lutflash._C.attention_forward / attention_backward: argument validation and dispatch to
 * the CPU kernels (csrc/attention_cpu.c) or the CUDA kernels (cuda/attention_*.cu, fp16 and
 * bf16 only, through lf_cuda_call on the tensors' device and the caller's stream).
 * Python allocates out, lse, the gradients, delta and the workspace; this file checks every
 * one of them again, since nothing a caller passes may crash the process. */
#include "tensor_arg.h"

#include <string.h>

#include <math.h>
#include <stdio.h>

#include "attention_args.h"
#include "attention_cpu.h"
#include "methods.h"
#include "philox.h"
#include "runtime.h"

#ifdef LUTFLASH_WITH_CUDA
#include "lutflash_cuda.h"
#endif

/* The scalar arguments shared by the forward and backward entry points. */
typedef struct {
    int64_t max_seqlen_q, max_seqlen_k, num_threads, variant;
    void *stream;
    int32_t *offsets[2]; /* private copies of CPU cu_seqlens (q, k), freed by the caller */
} call_options;

static int parse_scalars(PyObject *const *args, attention_fwd_params *p, call_options *o) {
    double dropout;
    if (lf_parse_int(args[0], "max_seqlen_q", 0, INT32_MAX, &o->max_seqlen_q) < 0 ||
        lf_parse_int(args[1], "max_seqlen_k", 0, INT32_MAX, &o->max_seqlen_k) < 0 ||
        attention_parse_score_options(args[2], args[3], args[4], args[5], p) < 0 ||
        attention_parse_float(args[6], "dropout_p", &dropout) < 0 ||
        lf_parse_int(args[7], "num_threads", 1, 4096, &o->num_threads) < 0 ||
        lf_parse_int(args[8], "variant", 0, ATTENTION_CPU_VARIANT_MAX, &o->variant) < 0 ||
        lf_parse_stream(args[9], &o->stream) < 0)
        return -1;
    if (!(dropout >= 0.0 && (float)dropout < 1.0f)) {
        /* PyErr_Format has no %g (Python >= 3.12 raises SystemError on it): format it first. */
        char got[32];
        snprintf(got, sizeof(got), "%g", dropout);
        PyErr_Format(PyExc_ValueError, "dropout_p: expected a float in [0, 1), got %s", got);
        return -1;
    }
    p->dropout_p = (float)dropout;
    p->dropout_threshold = lf_dropout_threshold(dropout);
    p->num_threads = (int)o->num_threads;
    p->variant = (int)o->variant;
    return 0;
}





/* On the CPU the offsets are copied before they are checked, and the kernels read the copy:
 * another thread may write the tensor while the kernels run without the GIL. */
static int check_cu_seqlens(const lf_tensor *cu, const lf_tensor *q, int64_t total,
                            int64_t max_seqlen, const char *max_name, int32_t **copy) {
    if (lf_check_same_device(cu, q) < 0 || lf_check_dtype(cu, LF_DTYPE_I32) < 0 ||
        lf_check_ndim(cu, 1) < 0 || lf_check_contiguous(cu) < 0)
        return -1;
    if (cu->shape[0] < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected batch + 1 >= 1 offsets, got none", cu->name);
        return -1;
    }
    if (cu->shape[0] - 1 > INT32_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "%s: batches above 2^31 - 1 sequences are not supported, got %lld", cu->name,
                     (long long)(cu->shape[0] - 1));
        return -1;
    }
    if (cu->device_type != LF_DEVICE_CPU) return 0; /* values live on the GPU */
    int32_t *offsets = PyMem_Malloc(sizeof(int32_t) * (size_t)cu->shape[0]);
    if (offsets == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(offsets, cu->data, sizeof(int32_t) * (size_t)cu->shape[0]);
    *copy = offsets;
    if (offsets[0] < 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected offsets >= 0, got %d first", cu->name,
                     offsets[0]);
        return -1;
    }
    for (int64_t b = 0; b + 1 < cu->shape[0]; ++b) {
        const int64_t length = (int64_t)offsets[b + 1] - offsets[b];
        if (length < 0) {
            PyErr_Format(PyExc_ValueError,
                         "%s: expected non-decreasing offsets, got %d then %d at index %lld",
                         cu->name, offsets[b], offsets[b + 1], (long long)b);
            return -1;
        }
        if (length > max_seqlen) {
            PyErr_Format(PyExc_ValueError,
                         "%s: expected every sequence length <= %s = %lld, got %lld at index "
                         "%lld", cu->name, max_name, (long long)max_seqlen, (long long)length,
                         (long long)b);
            return -1;
        }
    }
    if (offsets[cu->shape[0] - 1] > total) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the last offset %d is beyond the %lld rows of the packed tensor",
                     cu->name, offsets[cu->shape[0] - 1], (long long)total);
        return -1;
    }
    return 0;
}

enum { IN_Q, IN_K, IN_V, IN_CU_Q, IN_CU_K, IN_ALIBI, IN_RNG, IN_COUNT };

/* Validates q, k, v, cu_seqlens, alibi_slopes and rng_state and fills the shape, stride and
 * feature fields of p. lse_shape receives the expected shape of lse (and of delta, dlse). */
static int check_inputs(lf_tensor *t, call_options *o, attention_fwd_params *p,
                        int64_t lse_shape[3], int *lse_ndim) {
    lf_tensor *q = &t[IN_Q], *k = &t[IN_K], *v = &t[IN_V];
    lf_tensor *cu_q = &t[IN_CU_Q], *cu_k = &t[IN_CU_K];
    if (lf_check_supported_device(q) < 0 || lf_check_dtype(q, LF_DTYPES_FLOAT) < 0) return -1;
    const int varlen = lf_tensor_present(cu_q);
    if (varlen != lf_tensor_present(cu_k)) {
        PyErr_SetString(PyExc_ValueError,
                        "cu_seqlens_k: expected cu_seqlens_q and cu_seqlens_k both given or both "
                        "None");
        return -1;
    }
    const int ndim = varlen ? 3 : 4;
    if (lf_check_ndim(q, ndim) < 0 || attention_check_inner_contiguous(q) < 0) return -1;
    const int64_t d = q->shape[ndim - 1], heads_q = q->shape[ndim - 2];
    if (d < 1 || d > ATTENTION_MAX_HEAD_DIM) {
        PyErr_Format(PyExc_ValueError, "q: expected a head dim in [1, %d], got %lld",
                     ATTENTION_MAX_HEAD_DIM, (long long)d);
        return -1;
    }
    if (lf_check_ndim(k, ndim) < 0) return -1;
    const int64_t heads_kv = k->shape[ndim - 2];
    if (heads_q < 1 || heads_kv < 1 || heads_q % heads_kv != 0) {
        PyErr_Format(PyExc_ValueError,
                     "k: expected a number of kv heads that divides the %lld query heads, got "
                     "%lld", (long long)heads_q, (long long)heads_kv);
        return -1;
    }
    const int64_t batch = varlen ? cu_q->shape[0] - 1 : q->shape[0];
    int64_t k_shape[4] = {-1, -1, heads_kv, d};
    if (!varlen) k_shape[0] = batch;
    else k_shape[1] = heads_kv, k_shape[2] = d;
    if (attention_check_like(k, q, ndim, k_shape) < 0) return -1;
    const int64_t v_shape[4] = {k->shape[0], k->shape[1], k->shape[2], varlen ? 0 : k->shape[3]};
    if (attention_check_like(v, q, ndim, v_shape) < 0) return -1;

    p->q = q->data, p->k = k->data, p->v = v->data;
    p->dtype = lf_scalar_of(q->dtype);
    p->batch = batch;
    p->heads_q = heads_q;
    p->heads_kv = heads_kv;
    p->head_dim = d;
    const int row = varlen ? 0 : 1, head = row + 1;
    p->q_batch_stride = varlen ? 0 : q->strides[0];
    p->k_batch_stride = varlen ? 0 : k->strides[0];
    p->v_batch_stride = varlen ? 0 : v->strides[0];
    p->q_row_stride = q->strides[row], p->q_head_stride = q->strides[head];
    p->k_row_stride = k->strides[row], p->k_head_stride = k->strides[head];
    p->v_row_stride = v->strides[row], p->v_head_stride = v->strides[head];
    if (varlen) {
        if (check_cu_seqlens(cu_q, q, q->shape[0], o->max_seqlen_q, "max_seqlen_q",
                             &o->offsets[0]) < 0)
            return -1;
        const int64_t cu_shape[1] = {batch + 1};
        if (lf_check_shape(cu_k, 1, cu_shape) < 0 ||
            check_cu_seqlens(cu_k, q, k->shape[0], o->max_seqlen_k, "max_seqlen_k",
                             &o->offsets[1]) < 0)
            return -1;
        p->cu_seqlens_q = o->offsets[0] ? o->offsets[0] : (const int32_t *)cu_q->data;
        p->cu_seqlens_k = o->offsets[1] ? o->offsets[1] : (const int32_t *)cu_k->data;
        p->seqlen_q = o->max_seqlen_q;
        p->seqlen_k = o->max_seqlen_k;
        p->total_q = q->shape[0];
        p->total_k = k->shape[0];
        lse_shape[0] = heads_q, lse_shape[1] = q->shape[0];
        *lse_ndim = 2;
        p->lse_batch_stride = 0;
        p->lse_head_stride = q->shape[0];
    } else {
        p->seqlen_q = q->shape[1];
        p->seqlen_k = k->shape[1];
        if (p->seqlen_q > INT32_MAX || p->seqlen_k > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: sequence lengths above 2^31 - 1 are not supported",
                         p->seqlen_q > INT32_MAX ? q->name : k->name);
            return -1;
        }
        lse_shape[0] = batch, lse_shape[1] = heads_q, lse_shape[2] = p->seqlen_q;
        *lse_ndim = 3;
        p->lse_batch_stride = heads_q * p->seqlen_q;
        p->lse_head_stride = p->seqlen_q;
    }
    if (batch * heads_q > (int64_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "q: batch * heads above 2^32 is not supported");
        return -1;
    }

    if (attention_check_alibi(&t[IN_ALIBI], q, batch, heads_q, p) < 0) return -1;
    lf_tensor *rng = &t[IN_RNG];
    if (p->dropout_p > 0.0f && !lf_tensor_present(rng)) {
        PyErr_SetString(PyExc_ValueError, "rng_state: required when dropout_p > 0");
        return -1;
    }
    if (lf_tensor_present(rng)) {
        const int64_t rng_shape[1] = {2};
        /* The seed and offset are read here, so a CPU rng_state serves CUDA tensors too. */
        if ((rng->device_type != LF_DEVICE_CPU && lf_check_same_device(rng, q) < 0) ||
            lf_check_dtype(rng, LF_DTYPE_I64) < 0 ||
            lf_check_shape(rng, 1, rng_shape) < 0 || lf_check_contiguous(rng) < 0)
            return -1;
        if (rng->device_type != LF_DEVICE_CPU) {
            PyErr_SetString(PyExc_ValueError,
                            "rng_state: expected a CPU tensor (its values are read on the host)");
            return -1;
        }
        p->dropout_seed = (uint64_t)((const int64_t *)rng->data)[0];
        p->dropout_offset = (uint64_t)((const int64_t *)rng->data)[1];
    }
    return 0;
}





static int launch_attention_backward(const void *arg, void *stream) {
#ifdef LUTFLASH_WITH_CUDA
    return attention_backward_cuda((const attention_bwd_params *)arg, stream);
#else
    (void)arg, (void)stream;
    return -1;
#endif
}

static int64_t cpu_workspace_bytes(int64_t d, int backward, int64_t threads, int64_t heads_q,
                                   int64_t batch, int64_t total_q) {
    if (!backward) return attention_cpu_forward_thread_bytes(d) * threads;
    return attention_cpu_backward_shared_bytes(d, heads_q, batch, total_q) +
           attention_cpu_backward_thread_bytes(d) * threads;
}

/* attention_workspace_bytes(on_cuda, head_dim, backward, num_threads, heads_q, batch, total_q
 * [, heads_kv, seqlen_q, seqlen_k]): the CUDA forward's decode path (split-KV) needs the
 * three trailing shapes (seqlen_q and seqlen_k: dense Sq and Sk, or the varlen maxima);
 * without them the CUDA size is 0 and the forward never takes that path. The CUDA backward's
 * size is the fast path's float32 dQ accumulator (total_q = B * Sq rows for dense inputs);
 * the deterministic backward needs none. */
static PyObject *py_attention_workspace_bytes(PyObject *self, PyObject *const *args,
                                              Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7 && nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "attention_workspace_bytes(on_cuda, head_dim, backward, num_threads, "
                        "heads_q, batch, total_q[, heads_kv, seqlen_q, seqlen_k])");
        return NULL;
    }
    int64_t d, threads, heads_q, batch, total_q, heads_kv = 0, seqlen_q = 0, seqlen_k = 0;
    const int on_cuda = PyObject_IsTrue(args[0]), backward = PyObject_IsTrue(args[2]);
    if (on_cuda < 0 || backward < 0 ||
        lf_parse_int(args[1], "head_dim", 1, ATTENTION_MAX_HEAD_DIM, &d) < 0 ||
        lf_parse_int(args[3], "num_threads", 1, 4096, &threads) < 0 ||
        lf_parse_int(args[4], "heads_q", 0, INT32_MAX, &heads_q) < 0 ||
        lf_parse_int(args[5], "batch", 0, INT32_MAX, &batch) < 0 ||
        lf_parse_int(args[6], "total_q", 0, INT64_MAX / 1024, &total_q) < 0)
        return NULL;
    if (nargs == 10 &&
        (lf_parse_int(args[7], "heads_kv", 0, INT32_MAX, &heads_kv) < 0 ||
         lf_parse_int(args[8], "seqlen_q", 0, INT32_MAX, &seqlen_q) < 0 ||
         lf_parse_int(args[9], "seqlen_k", 0, INT32_MAX, &seqlen_k) < 0))
        return NULL;
    if (on_cuda) {
#ifdef LUTFLASH_WITH_CUDA
        if (backward)
            return PyLong_FromLongLong(attention_cuda_backward_workspace_bytes(heads_q, d, total_q));
        if (heads_kv > 0 && heads_q % heads_kv == 0)
            return PyLong_FromLongLong(attention_cuda_forward_workspace_bytes(
                batch, heads_q, heads_kv, seqlen_q, seqlen_k, d, total_q));
#endif
        return PyLong_FromLong(0);
    }
    return PyLong_FromLongLong(cpu_workspace_bytes(d, backward, threads, heads_q, batch, total_q));
}

enum { FWD_OUT = IN_COUNT, FWD_LSE, FWD_WORKSPACE, FWD_COUNT };

static PyObject *py_attention_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 20) {
        PyErr_Format(PyExc_TypeError,
                     "attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, "
                     "rng_state, out, lse, workspace, max_seqlen_q, max_seqlen_k, softmax_scale, "
                     "softcap, window_left, window_right, dropout_p, num_threads, variant, "
                     "stream) takes 20 arguments, got %zd", nargs);
        return NULL;
    }
    static const char *const names[FWD_COUNT] = {
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "rng_state",
        "out", "lse", "workspace"};
    lf_tensor t[FWD_COUNT];
    for (int i = 0; i < FWD_COUNT; ++i) lf_tensor_borrow_optional(NULL, names[i], &t[i]);
    PyObject *result = NULL;
    attention_fwd_params p = {0};
    call_options o = {0};
    int64_t lse_shape[3];
    int lse_ndim = 0;
    if (parse_scalars(args + FWD_COUNT, &p, &o) < 0) goto done;
    for (int i = 0; i < FWD_COUNT; ++i) {
        const int optional = i == IN_CU_Q || i == IN_CU_K || i == IN_ALIBI || i == IN_RNG;
        if ((optional ? lf_tensor_borrow_optional(args[i], names[i], &t[i])
                      : lf_tensor_borrow(args[i], names[i], &t[i])) < 0)
            goto done;
    }
    lf_tensor *q = &t[IN_Q], *out = &t[FWD_OUT], *lse = &t[FWD_LSE];
    if (check_inputs(t, &o, &p, lse_shape, &lse_ndim) < 0) goto done;
    if (attention_check_output(out, q, q->dtype, q->ndim, q->shape) < 0 ||
        attention_check_lse(lse, q, lse_ndim, lse_shape, 1) < 0)
        goto done;
    int64_t need = 0;
    if (q->device_type == LF_DEVICE_CPU)
        need = attention_cpu_forward_thread_bytes(p.head_dim);
#ifdef LUTFLASH_WITH_CUDA
    else /* the decode path's split records: the kernels trust this size */
        need = attention_cuda_forward_workspace_bytes(
            p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim,
            p.cu_seqlens_q ? p.total_q : p.batch * p.seqlen_q);
#endif
    const int outputs[3] = {FWD_OUT, FWD_LSE, FWD_WORKSPACE};
    if (attention_check_workspace(&t[FWD_WORKSPACE], q, need) < 0 || attention_check_disjoint(t, FWD_COUNT, outputs, 3) < 0)
        goto done;
    const int on_cuda = q->device_type == LF_DEVICE_CUDA;
    if (on_cuda) {
        const lf_tensor layout[4] = {t[IN_Q], t[IN_K], t[IN_V], t[FWD_OUT]};
        if (attention_check_cuda_layout(layout, 4, "flash_attention") < 0) goto done;
    }
    const int row = q->ndim == 3 ? 0 : 1;
    p.out = out->data;
    p.lse = (float *)lse->data;
    p.out_batch_stride = q->ndim == 3 ? 0 : out->strides[0];
    p.out_row_stride = out->strides[row];
    p.out_head_stride = out->strides[row + 1];
    p.workspace = t[FWD_WORKSPACE].data;
    p.workspace_bytes = t[FWD_WORKSPACE].shape[0];
    if (on_cuda) {
        if (lf_cuda_call("flash_attention", q->device_id, attention_launch_forward, &p,
                         o.stream) < 0)
            goto done;
    } else {
        Py_BEGIN_ALLOW_THREADS
        attention_forward_cpu(&p, (int)o.variant);
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(o.offsets[0]);
    PyMem_Free(o.offsets[1]);
    for (int i = 0; i < FWD_COUNT; ++i) lf_tensor_release(&t[i]);
    return result;
}

enum {
    BWD_DOUT = IN_COUNT, BWD_OUT, BWD_LSE, BWD_DLSE, BWD_DQ, BWD_DK, BWD_DV, BWD_DELTA,
    BWD_WORKSPACE, BWD_COUNT
};

static PyObject *py_attention_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 27) {
        PyErr_Format(PyExc_TypeError,
                     "attention_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, "
                     "rng_state, dout, out, lse, dlse, dq, dk, dv, delta, workspace, "
                     "max_seqlen_q, max_seqlen_k, softmax_scale, softcap, window_left, "
                     "window_right, dropout_p, num_threads, variant, stream, deterministic) "
                     "takes 27 arguments, got %zd", nargs);
        return NULL;
    }
    static const char *const names[BWD_COUNT] = {
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "rng_state", "dout",
        "out", "lse", "dlse", "dq", "dk", "dv", "delta", "workspace"};
    lf_tensor t[BWD_COUNT];
    for (int i = 0; i < BWD_COUNT; ++i) lf_tensor_borrow_optional(NULL, names[i], &t[i]);
    PyObject *result = NULL;
    attention_bwd_params bp = {0};
    attention_fwd_params *p = &bp.fwd;
    call_options o = {0};
    int64_t lse_shape[3], deterministic = 1;
    int lse_ndim = 0;
    if (parse_scalars(args + BWD_COUNT, p, &o) < 0 ||
        lf_parse_int(args[26], "deterministic", 0, 1, &deterministic) < 0)
        goto done;
    bp.deterministic = (int)deterministic;
    for (int i = 0; i < BWD_COUNT; ++i) {
        const int optional = i == IN_CU_Q || i == IN_CU_K || i == IN_ALIBI || i == IN_RNG ||
                             i == BWD_DLSE;
        if ((optional ? lf_tensor_borrow_optional(args[i], names[i], &t[i])
                      : lf_tensor_borrow(args[i], names[i], &t[i])) < 0)
            goto done;
    }
    lf_tensor *q = &t[IN_Q], *k = &t[IN_K], *v = &t[IN_V];
    if (check_inputs(t, &o, p, lse_shape, &lse_ndim) < 0) goto done;
    if (attention_check_like(&t[BWD_DOUT], q, q->ndim, q->shape) < 0 ||
        attention_check_like(&t[BWD_OUT], q, q->ndim, q->shape) < 0 ||
        attention_check_lse(&t[BWD_LSE], q, lse_ndim, lse_shape, 0) < 0 ||
        (lf_tensor_present(&t[BWD_DLSE]) &&
         attention_check_lse(&t[BWD_DLSE], q, lse_ndim, lse_shape, 0) < 0) ||
        attention_check_output(&t[BWD_DQ], q, q->dtype, q->ndim, q->shape) < 0 ||
        attention_check_output(&t[BWD_DK], q, q->dtype, k->ndim, k->shape) < 0 ||
        attention_check_output(&t[BWD_DV], q, q->dtype, v->ndim, v->shape) < 0 ||
        attention_check_lse(&t[BWD_DELTA], q, lse_ndim, lse_shape, 1) < 0)
        goto done;
    const int64_t total_q = q->ndim == 3 ? q->shape[0] : q->shape[0] * q->shape[1];
    int64_t need = 0;
    if (q->device_type == LF_DEVICE_CPU)
        need = cpu_workspace_bytes(p->head_dim, 1, 1, p->heads_q, p->batch, total_q);
#ifdef LUTFLASH_WITH_CUDA
    else if (!deterministic)
        need = attention_cuda_backward_workspace_bytes(p->heads_q, p->head_dim, total_q);
#endif
    const int outputs[5] = {BWD_DQ, BWD_DK, BWD_DV, BWD_DELTA, BWD_WORKSPACE};
    if (attention_check_workspace(&t[BWD_WORKSPACE], q, need) < 0 ||
        attention_check_disjoint(t, BWD_COUNT, outputs, 5) < 0)
        goto done;
    const int on_cuda = q->device_type == LF_DEVICE_CUDA;
    if (on_cuda) {
        const lf_tensor layout[8] = {t[IN_Q], t[IN_K], t[IN_V], t[BWD_DOUT],
                                     t[BWD_OUT], t[BWD_DQ], t[BWD_DK], t[BWD_DV]};
        if (attention_check_cuda_layout(layout, 8, "flash_attention_backward") < 0) goto done;
    }
    const int varlen = q->ndim == 3, row = varlen ? 0 : 1, head = row + 1;
    const lf_tensor *dout = &t[BWD_DOUT], *out = &t[BWD_OUT];
    const lf_tensor *dq = &t[BWD_DQ], *dk = &t[BWD_DK], *dv = &t[BWD_DV];
    p->out = out->data;
    p->out_batch_stride = varlen ? 0 : out->strides[0];
    p->out_row_stride = out->strides[row], p->out_head_stride = out->strides[head];
    p->lse = (float *)t[BWD_LSE].data;
    p->workspace = t[BWD_WORKSPACE].data;
    p->workspace_bytes = t[BWD_WORKSPACE].shape[0];
    bp.dout = dout->data;
    bp.dout_batch_stride = varlen ? 0 : dout->strides[0];
    bp.dout_row_stride = dout->strides[row], bp.dout_head_stride = dout->strides[head];
    bp.dlse = (const float *)t[BWD_DLSE].data;
    bp.dq = dq->data, bp.dk = dk->data, bp.dv = dv->data;
    bp.dq_batch_stride = varlen ? 0 : dq->strides[0];
    bp.dq_row_stride = dq->strides[row], bp.dq_head_stride = dq->strides[head];
    bp.dk_batch_stride = varlen ? 0 : dk->strides[0];
    bp.dk_row_stride = dk->strides[row], bp.dk_head_stride = dk->strides[head];
    bp.dv_batch_stride = varlen ? 0 : dv->strides[0];
    bp.dv_row_stride = dv->strides[row], bp.dv_head_stride = dv->strides[head];
    bp.delta = (float *)t[BWD_DELTA].data;
    if (on_cuda) {
        if (lf_cuda_call("flash_attention_backward", q->device_id, launch_attention_backward,
                         &bp, o.stream) < 0)
            goto done;
    } else {
        Py_BEGIN_ALLOW_THREADS
        attention_backward_cpu(&bp, (int)o.variant);
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(o.offsets[0]);
    PyMem_Free(o.offsets[1]);
    for (int i = 0; i < BWD_COUNT; ++i) lf_tensor_release(&t[i]);
    return result;
}

PyMethodDef attention_methods[] = {
    {"attention_forward", (PyCFunction)(void (*)(void))py_attention_forward, METH_FASTCALL,
     "attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state, out, lse, "
     "workspace, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, window_left, window_right, "
     "dropout_p, num_threads, variant, stream): exact attention; writes out and lse."},
    {"attention_backward", (PyCFunction)(void (*)(void))py_attention_backward, METH_FASTCALL,
     "attention_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state, dout, "
     "out, lse, dlse, dq, dk, dv, delta, workspace, max_seqlen_q, max_seqlen_k, softmax_scale, "
     "softcap, window_left, window_right, dropout_p, num_threads, variant, stream, "
     "deterministic): writes dq, dk, dv (and delta = rowsum(dout * out) - dlse); CUDA with "
     "deterministic=0 sums dQ with float32 atomics in the workspace."},
    {"attention_workspace_bytes", (PyCFunction)(void (*)(void))py_attention_workspace_bytes,
     METH_FASTCALL,
     "attention_workspace_bytes(on_cuda, head_dim, backward, num_threads, heads_q, batch, "
     "total_q[, heads_kv, seqlen_q, seqlen_k]): bytes of the workspace tensor to pass."},
    {NULL, NULL, 0, NULL},
};
