/* LUT-GEMM on the GPU: out = x · Ŵᵀ (+ bias) for a packed BCQ weight Ŵ (csrc/bcq_format.h).
 * The plan and the C entry points; the kernels are in lutgemm_decode.cu (m ≤ 8, bits ≤ 4:
 * tables of activation partial sums indexed by the weight bits), lutgemm_lut.cu (the same
 * tables for any m and bits: fp32 x, bits 5..8 at small m) and lutgemm_mma.cu (prefill: tensor
 * cores fed by weight tiles dequantized in registers). The path is lutgemm_params::path, or
 * chosen here from x's dtype and m (choose_path).
 *
 * Both paths split k over blocks when there are too few tiles to fill the GPU; then partial
 * sums go to an fp32 workspace with atomics and the last block of a tile (a counter per tile)
 * writes the output. The workspace is zeroed on the stream (cudaMemsetAsync; for the tensor
 * cores by the launch that permutes x), so a call is graph capturable: no allocation, no host
 * synchronization. The decode kernel skips that memset when given a clean workspace (zero,
 * kept per stream by lutflash.ops): it leaves it zero again. */
#include "device.cuh"
#include "lutgemm_cuda.cuh"

namespace {

/* ---------------------------------------------------------------------------------------- */
/* Host side: the plan (path, tiles, workspace layout) and the launchers                    */
/* ---------------------------------------------------------------------------------------- */

constexpr int64_t MMA_SPLIT_MAX_M = 1024;  // above SPLIT_MAX_M, k is split only when the
constexpr int64_t MMA_SPLIT_MAX_TILES = 264;  // (m, n) tiles are fewer than this (2 × 132 SMs)

constexpr int64_t LUT_MAX_M = 2;    // fp16/bf16: tables (lutgemm_decode.cu) up to this m, then
                                    // tensor cores: on the H100 (commit 987890e) the tensor cores
                                    // at m = 8 beat the decode kernel at m = 4 on 8 of 9 LLM
                                    // shapes (e.g. 77 vs 128 us on 12288^2, 3-bit)
constexpr int64_t SPLIT_MAX_M = 64; // k is split (fp32 workspace) only up to this many rows

struct Plan {
    int path;          // LF_PATH_TABLES or LF_PATH_TENSOR_CORES
    bool decode;       // the table path on lutgemm_decode.cu
    int m_tile;        // activation rows per block
    int64_t tiles;     // output tiles = counters
    int64_t counters_bytes, acc_bytes, xp_bytes;
    int64_t m_pad, k_pad;
};

int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

/* fp32 x always takes the tables (the C entry refuses the tensor cores for it). */
int choose_path(const lutgemm_params *p) {
    if (p->path != LF_PATH_AUTO) return p->path;
    return p->x_type == LF_SCALAR_F32 || p->m <= LUT_MAX_M ? LF_PATH_TABLES
                                                           : LF_PATH_TENSOR_CORES;
}

Plan make_plan(const lutgemm_params *p, int path) {
    Plan plan = {};
    const int64_t n_pad = bcq_padded_rows(p->n), words = bcq_words_per_row(p->k);
    plan.path = path;
    plan.decode = path == LF_PATH_TABLES && p->m <= DECODE_MAX_M && p->bits <= 4;
    if (plan.decode) {
        plan.m_tile = lutgemm_decode_rows(p->m);
        // ≥ the (row tile, m tile) pairs of lutgemm_decode.cu
        plan.tiles = (n_pad + 15) / 16 * ((p->m + plan.m_tile - 1) / plan.m_tile);
    } else if (path == LF_PATH_TABLES) {
        plan.m_tile = LUT_M_TILE;
        plan.tiles = (n_pad + LUT_ROWS - 1) / LUT_ROWS * ((p->m + plan.m_tile - 1) / plan.m_tile);
    } else {
        // m in (16, 64] takes the 64-row tile. A 32-row tile once failed to launch (H100, m = 32,
        // 12288²): a ring of exactly 48 KB needs the dynamic shared-memory limit raised, which
        // lf::setup_kernel now always does; a 32-row tile could be offered, and measured.
        plan.m_tile = p->m <= 16 ? 16 : p->m <= 64 ? 64 : 128;
        plan.m_pad = (p->m + plan.m_tile - 1) / plan.m_tile * plan.m_tile;
        plan.k_pad = words * 32;
        plan.tiles = (n_pad + MMA_BN - 1) / MMA_BN * (plan.m_pad / plan.m_tile);
        plan.xp_bytes = plan.m_pad * plan.k_pad * 2;
    }
    const bool mma_split = path == LF_PATH_TENSOR_CORES && p->m <= MMA_SPLIT_MAX_M &&
                           plan.tiles < MMA_SPLIT_MAX_TILES;
    if (p->m <= SPLIT_MAX_M || mma_split) {
        plan.counters_bytes = align256(plan.tiles * 4);
        plan.acc_bytes = align256(p->m * n_pad * 4);
    }
    return plan;
}

/* Splits of k for the general table kernel: ≈8 blocks of 256 threads per SM (several waves,
 * so the last one's tail is short), while m ≤ SPLIT_MAX_M. */
int lut_splits(int64_t tiles, int64_t words, int64_t m, int *words_per_split) {
    int64_t splits = 1;
    if (m <= SPLIT_MAX_M) {
        const int64_t want = (int64_t)8 * lf::current_device_info().sm_count;
        splits = (want + tiles - 1) / tiles;
        splits = splits < 1 ? 1 : splits > words ? words : splits;
    }
    const int64_t per = (words + splits - 1) / splits;
    *words_per_split = (int)per;
    return (int)((words + per - 1) / per);
}

cudaError_t run_lut(const lutgemm_params *p, const Plan &plan, cudaStream_t stream) {
    const int64_t n_pad = bcq_padded_rows(p->n), words = bcq_words_per_row(p->k);
    LutArgs a = {};
    a.x = p->x, a.ldx = p->ldx, a.planes = p->planes, a.meta = p->meta, a.bias = p->bias;
    a.out = p->out, a.ldo = p->ldo, a.m = p->m, a.n = p->n, a.n_pad = n_pad, a.k = p->k;
    a.words = (int)words, a.group_size = p->group_size, a.nm = bcq_meta_per_group(p->bits, p->mode);
    a.mode = p->mode, a.x_type = p->x_type, a.meta_type = p->meta_type;
    if (plan.decode) {
        a.sm_count = lf::current_device_info().sm_count;
        if (lutgemm_decode_slabs(p->m, words) > 1) {
            // The decode kernel leaves its counters and sums zero when it ends, so a clean
            // workspace (zero, kept per stream by lutflash.ops; the C entry checked its size)
            // needs no memset: one launch instead of two.
            const bool clean = p->clean_workspace != nullptr;
            char *ws = (char *)(clean ? p->clean_workspace : p->workspace);
            a.counters = (unsigned *)ws;
            a.acc = (float *)(ws + plan.counters_bytes);
            if (!clean) {
                cudaError_t err =
                    cudaMemsetAsync(ws, 0, plan.counters_bytes + p->m * n_pad * 4, stream);
                if (err != cudaSuccess) return err;
            }
        }
        return lutgemm_decode_launch(p->bits, a, stream);
    }
    int chunk = LUT_SMEM_LIMIT / (plan.m_tile * lut_smem_per_row(1));
    chunk = chunk > LUT_MAX_CHUNK ? LUT_MAX_CHUNK : chunk;
    const int splits = lut_splits(plan.tiles, words, p->m, &a.words_per_split);
    a.chunk = a.words_per_split < chunk ? a.words_per_split : chunk;
    const int64_t row_blocks = (n_pad + LUT_ROWS - 1) / LUT_ROWS;
    const int64_t m_tiles = (p->m + plan.m_tile - 1) / plan.m_tile;
    if (splits > 1) {
        a.counters = (unsigned *)p->workspace;
        a.acc = (float *)((char *)p->workspace + plan.counters_bytes);
        cudaError_t err = cudaMemsetAsync(p->workspace, 0, plan.counters_bytes + plan.acc_bytes,
                                          stream);
        if (err != cudaSuccess) return err;
    }
    const int x_size = p->x_type == LF_SCALAR_F32 ? 4 : 2;
    for (int64_t z0 = 0; z0 < m_tiles; z0 += 65535) {  // grid.z limit
        const int64_t zs = m_tiles - z0 < 65535 ? m_tiles - z0 : 65535;
        LutArgs c = a;
        c.x = (const char *)p->x + z0 * plan.m_tile * p->ldx * x_size;
        c.out = (char *)p->out + z0 * plan.m_tile * p->ldo * x_size;
        c.m = p->m - z0 * plan.m_tile;
        const dim3 grid((unsigned)row_blocks, (unsigned)splits, (unsigned)zs);
        cudaError_t err = lutgemm_lut_launch(p->bits, c, grid, stream);
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

/* The tensor cores: workspace = counters, fp32 partial sums, permuted x. */
cudaError_t run_mma(const lutgemm_params *p, const Plan &plan, cudaStream_t stream) {
    const int64_t n_pad = bcq_padded_rows(p->n), words = bcq_words_per_row(p->k);
    MmaArgs a = {};
    a.xp = (uint16_t *)((char *)p->workspace + plan.counters_bytes + plan.acc_bytes);
    a.planes = p->planes, a.meta = p->meta, a.bias = p->bias, a.out = p->out;
    a.ldo = p->ldo, a.m = p->m, a.n = p->n, a.n_pad = n_pad, a.k_pad = plan.k_pad;
    a.words = (int)words, a.bits = p->bits, a.group_size = p->group_size;
    a.mode = p->mode, a.meta_type = p->meta_type;
    const int bm = plan.m_tile;
    int blocks_per_sm = 1;
    cudaError_t err = lutgemm_mma_launch(p->x_type, bm, a, dim3(), stream, &blocks_per_sm);
    if (err != cudaSuccess) return err;
    // Split k when the (m, n) tiles are less than one wave: the fewest splits that fill the
    // waves best (blocks / (waves × slots)), each split ≥ 2 pipeline rings of words.
    const int64_t n_tiles = (n_pad + MMA_BN - 1) / MMA_BN, m_tiles = plan.m_pad / bm;
    const int64_t tiles = plan.tiles;
    const int64_t slots = (int64_t)lf::current_device_info().sm_count * blocks_per_sm;
    int64_t splits = 1;
    if (plan.acc_bytes > 0 && tiles < slots) {
        const int64_t most = words / (2 * MMA_STAGES * MMA_WORDS);
        double best = 0.0;
        for (int64_t s = 1; s <= most && s * tiles <= 4 * slots; ++s) {
            const int64_t blocks = s * tiles, waves = (blocks + slots - 1) / slots;
            const double fill = (double)blocks / (double)(waves * slots);
            if (fill > best + 0.02) best = fill, splits = s;
        }
    }
    int64_t per = (words + splits - 1) / splits;
    per = (per + MMA_WORDS - 1) / MMA_WORDS * MMA_WORDS;
    a.words_per_split = (int)per;
    splits = (words + per - 1) / per;
    if (splits > 1) {
        a.counters = (unsigned *)p->workspace;
        a.acc = (float *)((char *)p->workspace + plan.counters_bytes);
    }
    // x permuted and, when k is split, the workspace zeroed, in one launch
    err = lutgemm_permute_x(p->x, p->ldx, (uint16_t *)a.xp, p->m, plan.m_pad, p->k, plan.k_pad,
                            p->workspace, splits > 1 ? plan.counters_bytes + plan.acc_bytes : 0,
                            stream);
    if (err != cudaSuccess) return err;
    for (int64_t y0 = 0; y0 < m_tiles; y0 += 65535) {  // grid.y limit
        const int64_t ys = m_tiles - y0 < 65535 ? m_tiles - y0 : 65535;
        MmaArgs c = a;
        c.xp = a.xp + y0 * bm * plan.k_pad;
        c.out = (char *)p->out + y0 * bm * p->ldo * 2;
        c.m = p->m - y0 * bm;
        if (splits > 1) c.acc = a.acc + y0 * bm * n_pad, c.counters = a.counters + y0 * n_tiles;
        const dim3 grid((unsigned)n_tiles, (unsigned)ys, (unsigned)splits);
        err = lutgemm_mma_launch(p->x_type, bm, c, grid, stream, nullptr);
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

}  // namespace

/* The larger of the two paths' needs: the size must not depend on x's dtype or on the path,
 * so that one size serves every call of a layer's shape (lutflash.ops asks it here). */
extern "C" int64_t lutgemm_cuda_workspace_bytes(const lutgemm_params *p) {
    int64_t bytes = 256;
    for (int path = LF_PATH_TABLES; path <= LF_PATH_TENSOR_CORES; ++path) {
        const Plan plan = make_plan(p, path);
        const int64_t need = plan.counters_bytes + plan.acc_bytes + plan.xp_bytes;
        bytes = need > bytes ? need : bytes;
    }
    return bytes;
}

extern "C" int lutgemm_cuda(const lutgemm_params *p, void *stream) {
    if (p->m <= 0) return 0;
    const Plan plan = make_plan(p, choose_path(p));
    const cudaError_t err = plan.path == LF_PATH_TABLES ? run_lut(p, plan, (cudaStream_t)stream)
                                                        : run_mma(p, plan, (cudaStream_t)stream);
    return (int)err;
}
