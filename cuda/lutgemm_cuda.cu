/* LUT-GEMM on the GPU: out = x · Ŵᵀ (+ bias) for a packed BCQ weight Ŵ (csrc/bcq_format.h).
 * The plan and the C entry points; the kernels are in lutgemm_lut.cu (decode: tables of
 * activation partial sums indexed by the weight bits) and lutgemm_mma.cu (prefill: tensor cores
 * fed by weight tiles dequantized in registers: pipe_kernel for bits ≤ 4, the older mma_kernel
 * otherwise). lutgemm_cuda picks the path from m.
 *
 * Both paths split k over blocks when there are too few tiles to fill the GPU; then partial
 * sums go to an fp32 workspace with atomics and the last block of a tile (a counter per tile)
 * writes the output. The workspace is zeroed on the stream (cudaMemsetAsync; for pipe_kernel
 * by the launch that permutes x), so a call is graph capturable: no allocation, no host
 * synchronization. The m <= 8 kernel (lut1) can skip that memset: given a clean workspace
 * (zero, kept per stream by lutflash.ops) it leaves it zero again. */
#include <stdlib.h>
#include <string.h>

#include "lutgemm_cuda.cuh"

/* In lutgemm_mma.cu (declared here to leave the shared header, and so every CUDA object,
 * untouched): the pipelined kernel, or with blocks_per_sm non-null its occupancy. */
cudaError_t lutgemm_mma_pipe_launch(int x_type, int bm, const MmaArgs &a, dim3 grid,
                                    cudaStream_t stream, int *blocks_per_sm);
/* lutgemm_permute_x that also zeroes zero_bytes at zero (the split-k workspace): one launch. */
cudaError_t lutgemm_permute_x_zero(const void *x, int64_t ldx, uint16_t *xp, int64_t m,
                                   int64_t m_pad, int64_t k, int64_t k_pad, void *zero,
                                   int64_t zero_bytes, cudaStream_t stream);

namespace {

/* ---------------------------------------------------------------------------------------- */
/* Host side: the plan (path, tiles, workspace layout) and the launchers                    */
/* ---------------------------------------------------------------------------------------- */

enum { PATH_LUT = 0, PATH_MMA = 1 };

/* LUTFLASH_LUTGEMM_PATH=lut|mma forces a path (tests, benchmarks); fp32 x always uses lut. */
int path_override() {
    const char *s = getenv("LUTFLASH_LUTGEMM_PATH");
    if (s && !strcmp(s, "lut")) return PATH_LUT;
    if (s && !strcmp(s, "mma")) return PATH_MMA;
    return -1;
}

/* The pipelined tensor-core kernel (lutgemm_mma.cu, pipe_kernel): bits ≤ 4. These must match
 * PIPE_BN / PIPE_WORDS / PIPE_STAGES there. */
constexpr int PIPE_BN = 256, PIPE_WORDS = 2, PIPE_STAGES = 4;
constexpr int64_t PIPE_SPLIT_MAX_M = 1024;  // above SPLIT_MAX_M, k is split only when the
constexpr int64_t PIPE_SPLIT_MAX_TILES = 264;  // (m, n) tiles are fewer than this (2 × 132 SMs)

/* LUTFLASH_LUTGEMM_MMA=old keeps the previous mma kernel (before/after benchmarks). */
bool pipe_applies(const lutgemm_params *p) {
    const char *s = getenv("LUTFLASH_LUTGEMM_MMA");
    return p->bits <= 4 && !(s && !strcmp(s, "old"));
}

int64_t pipe_tiles(const lutgemm_params *p, int bm) {
    return (bcq_padded_rows(p->n) + PIPE_BN - 1) / PIPE_BN * ((p->m + bm - 1) / bm);
}

constexpr int64_t LUT_MAX_M = 2;    // fp16/bf16: lut (lutgemm_lut1.cu) up to this m, then mma: on
                                    // the H100 (commit 987890e) mma at m = 8 beat lut1 at m = 4
                                    // on 8 of 9 LLM shapes (e.g. 77 vs 128 us on 12288^2, 3-bit)
constexpr int64_t SPLIT_MAX_M = 64; // k is split (fp32 workspace) only up to this many rows

struct Plan {
    int path, m_tile;  // m_tile: M_TILE (lut) or BM (mma)
    int64_t tiles;     // output tiles = counters
    int64_t counters_bytes, acc_bytes, xp_bytes;
    int64_t m_pad, k_pad;
};

int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

int choose_path(const lutgemm_params *p) {
    const int forced = path_override();
    return p->x_type == LF_SCALAR_F32 ? PATH_LUT
           : forced >= 0              ? forced
           : p->m <= LUT_MAX_M        ? PATH_LUT
                                      : PATH_MMA;
}

/* m ≤ 8 with ≤ 4 bit-planes: the conflict-free table kernel (lutgemm_lut1.cu). */
bool lut1_applies(const lutgemm_params *p) { return p->m <= LUT1_MAX_M && p->bits <= 4; }

Plan make_plan(const lutgemm_params *p, int path) {
    Plan plan = {};
    const int64_t n_pad = bcq_padded_rows(p->n), words = bcq_words_per_row(p->k);
    plan.path = path;
    if (plan.path == PATH_LUT && lut1_applies(p)) {
        plan.m_tile = lutgemm_lut1_rows(p->m);
        // ≥ the (row tile, m tile) pairs of lutgemm_lut1.cu
        plan.tiles = (n_pad + 15) / 16 * ((p->m + plan.m_tile - 1) / plan.m_tile);
    } else if (plan.path == PATH_LUT) {
        plan.m_tile = 4;
        plan.tiles = (n_pad + LUT_ROWS - 1) / LUT_ROWS * ((p->m + plan.m_tile - 1) / plan.m_tile);
    } else {
        // (a 32-row tile failed to launch on the H100 at m = 32, 12288 x 12288: until that is
        // understood, m in (16, 64] takes the 64-row tile, which the tests cover)
        plan.m_tile = p->m <= 16 ? 16 : p->m <= 64 ? 64 : 128;
        plan.m_pad = (p->m + plan.m_tile - 1) / plan.m_tile * plan.m_tile;
        plan.k_pad = words * 32;
        plan.tiles = (n_pad + MMA_BN - 1) / MMA_BN * (plan.m_pad / plan.m_tile);
        plan.xp_bytes = plan.m_pad * plan.k_pad * 2;
    }
    const bool pipe_split = path == PATH_MMA && p->m <= PIPE_SPLIT_MAX_M &&
                            pipe_tiles(p, plan.m_tile) < PIPE_SPLIT_MAX_TILES;
    if (p->m <= SPLIT_MAX_M || pipe_split) {
        plan.counters_bytes = align256(plan.tiles * 4);
        plan.acc_bytes = align256(p->m * n_pad * 4);
    }
    return plan;
}

int sm_count() {
    static int counts[64];
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 132;
    if (counts[device] == 0) {
        int v = 0;
        cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device);
        counts[device] = v > 0 ? v : 132;
    }
    return counts[device];
}

/* Splits of k: enough blocks for `waves` blocks per SM, each split ≥ min_words words. */
int choose_splits(int64_t tiles, int64_t words, int64_t m, int waves, int64_t min_words,
                  int granule, int *words_per_split) {
    int64_t splits = 1;
    if (m <= SPLIT_MAX_M) {
        const int64_t want = (int64_t)waves * sm_count();
        splits = (want + tiles - 1) / tiles;
        const int64_t most = words / min_words > 1 ? words / min_words : 1;
        splits = splits < 1 ? 1 : splits > most ? most : splits;
    }
    int64_t per = (words + splits - 1) / splits;
    per = (per + granule - 1) / granule * granule;
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
    if (lut1_applies(p)) {
        a.sm_count = sm_count();
        if (lutgemm_lut1_slabs(p->m, words) > 1) {
            // lut1 leaves its counters and sums zero when it ends, so a workspace that is
            // zero (p->clean_workspace, kept per stream by lutflash.ops) needs no memset:
            // one launch instead of two. LUTFLASH_LUT1_MEMSET=1 forces the memset (A/B runs).
            const int64_t need = plan.counters_bytes + p->m * n_pad * 4;
            const char *force = getenv("LUTFLASH_LUT1_MEMSET");
            const bool clean = p->clean_workspace && p->clean_workspace_bytes >= need &&
                               !(force && *force == '1');
            char *ws = (char *)(clean ? p->clean_workspace : p->workspace);
            a.counters = (unsigned *)ws;
            a.acc = (float *)(ws + plan.counters_bytes);
            if (!clean) {
                cudaError_t err = cudaMemsetAsync(ws, 0, need, stream);
                if (err != cudaSuccess) return err;
            }
        }
        return lutgemm_lut1_launch(p->bits, a, stream);
    }
    int chunk = LUT_SMEM_LIMIT / (plan.m_tile * lut_smem_per_row(1));
    chunk = chunk > LUT_MAX_CHUNK ? LUT_MAX_CHUNK : chunk;
    // ≈8 blocks of 256 threads per SM: several waves, so the last one's tail is short
    const int splits = choose_splits(plan.tiles, words, p->m, 8, 1, 1, &a.words_per_split);
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
        cudaError_t err = lutgemm_lut_launch(p->bits, plan.m_tile, c, grid, stream);
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

/* The pipelined kernel: same workspace (counters, fp32 partial sums, permuted x) and args. */
cudaError_t run_mma_pipe(const lutgemm_params *p, const Plan &plan, MmaArgs a,
                         cudaStream_t stream) {
    const int64_t n_pad = bcq_padded_rows(p->n), words = bcq_words_per_row(p->k);
    // Experiment knobs: LUTFLASH_PIPE_BM (16 or 64, at most the plan's tile: the permuted x
    // is padded to plan.m_tile rows) and LUTFLASH_PIPE_SPLITS (a fixed number of k splits).
    int bm = plan.m_tile;
    const char *knob = getenv("LUTFLASH_PIPE_BM");
    if (knob && (atoi(knob) == 16 || atoi(knob) == 64) && atoi(knob) <= bm) bm = atoi(knob);
    int blocks_per_sm = 0;
    cudaError_t err = lutgemm_mma_pipe_launch(p->x_type, bm, a, dim3(), stream, &blocks_per_sm);
    if (err != cudaSuccess) return err;
    // Split k when the (m, n) tiles are less than one wave: the fewest splits that fill the
    // waves best (blocks / (waves × slots)), each split ≥ 2 pipeline rings of words.
    const int64_t n_tiles = (n_pad + PIPE_BN - 1) / PIPE_BN, m_tiles = plan.m_pad / bm;
    const int64_t tiles = n_tiles * m_tiles;
    const int64_t slots = (int64_t)sm_count() * (blocks_per_sm > 0 ? blocks_per_sm : 1);
    int64_t splits = 1;
    if (plan.acc_bytes > 0 && tiles < slots) {
        const int64_t most = words / (2 * PIPE_STAGES * PIPE_WORDS);
        double best = 0.0;
        for (int64_t s = 1; s <= most && s * tiles <= 4 * slots; ++s) {
            const int64_t blocks = s * tiles, waves = (blocks + slots - 1) / slots;
            const double fill = (double)blocks / (double)(waves * slots);
            if (fill > best + 0.02) best = fill, splits = s;
        }
    }
    knob = getenv("LUTFLASH_PIPE_SPLITS");
    if (knob && atoi(knob) >= 1 && (plan.acc_bytes > 0 || atoi(knob) == 1)) splits = atoi(knob);
    if (tiles > plan.tiles) splits = 1;  // counters are sized for plan.tiles (a BM knob)
    int64_t per = (words + splits - 1) / splits;
    per = (per + PIPE_WORDS - 1) / PIPE_WORDS * PIPE_WORDS;
    a.words_per_split = (int)per;
    splits = (words + per - 1) / per;
    if (splits > 1) {
        a.counters = (unsigned *)p->workspace;
        a.acc = (float *)((char *)p->workspace + plan.counters_bytes);
    }
    // x permuted and, when k is split, the workspace zeroed, in one launch
    err = lutgemm_permute_x_zero(p->x, p->ldx, (uint16_t *)a.xp, p->m, plan.m_pad, p->k, plan.k_pad,
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
        err = lutgemm_mma_pipe_launch(p->x_type, bm, c, grid, stream, nullptr);
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

cudaError_t run_mma(const lutgemm_params *p, const Plan &plan, cudaStream_t stream) {
    const int64_t n_pad = bcq_padded_rows(p->n), words = bcq_words_per_row(p->k);
    uint16_t *xp = (uint16_t *)((char *)p->workspace + plan.counters_bytes + plan.acc_bytes);
    MmaArgs a = {};
    a.xp = xp, a.planes = p->planes, a.meta = p->meta, a.bias = p->bias, a.out = p->out;
    a.ldo = p->ldo, a.m = p->m, a.n = p->n, a.n_pad = n_pad, a.k_pad = plan.k_pad;
    a.words = (int)words, a.bits = p->bits, a.group_size = p->group_size;
    a.nm = bcq_meta_per_group(p->bits, p->mode), a.mode = p->mode, a.meta_type = p->meta_type;
    if (pipe_applies(p)) return run_mma_pipe(p, plan, a, stream);  // permutes x itself
    cudaError_t err = lutgemm_permute_x(p->x, p->ldx, xp, p->m, plan.m_pad, p->k, plan.k_pad, stream);
    if (err != cudaSuccess) return err;
    const int bm = plan.m_tile;
    // small tiles (128 threads, little smem) fit ~4 per SM; ≥ 4 stages of k per split
    const int splits = choose_splits(plan.tiles, words, p->m, bm <= 32 ? 4 : 2,
                                     MMA_STAGES * MMA_WORDS, MMA_WORDS, &a.words_per_split);
    if (splits > 1) {
        a.counters = (unsigned *)p->workspace;
        a.acc = (float *)((char *)p->workspace + plan.counters_bytes);
        err = cudaMemsetAsync(p->workspace, 0, plan.counters_bytes + plan.acc_bytes, stream);
        if (err != cudaSuccess) return err;
    }
    const int64_t n_tiles = (n_pad + MMA_BN - 1) / MMA_BN, m_tiles = plan.m_pad / bm;
    for (int64_t y0 = 0; y0 < m_tiles; y0 += 65535) {  // grid.y limit
        const int64_t ys = m_tiles - y0 < 65535 ? m_tiles - y0 : 65535;
        MmaArgs c = a;
        c.xp = xp + y0 * bm * plan.k_pad;
        c.out = (char *)p->out + y0 * bm * p->ldo * 2;
        c.m = p->m - y0 * bm;
        const dim3 grid((unsigned)n_tiles, (unsigned)ys, (unsigned)splits);
        cudaError_t err = lutgemm_mma_launch(p->x_type, bm, c, grid, stream);
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

}  // namespace

/* The larger of the two paths' needs: the size must not depend on x's dtype or on the path
 * knob, since lutflash.ops sizes the workspace from (m, n, k, bits, group_size, mode) alone. */
extern "C" int64_t lutgemm_cuda_workspace_bytes(const lutgemm_params *p) {
    int64_t bytes = 256;
    for (int path = PATH_LUT; path <= PATH_MMA; ++path) {
        const Plan plan = make_plan(p, path);
        const int64_t need = plan.counters_bytes + plan.acc_bytes + plan.xp_bytes;
        bytes = need > bytes ? need : bytes;
    }
    return bytes;
}

extern "C" int lutgemm_cuda(const lutgemm_params *p, void *stream) {
    if (p->m <= 0) return 0;
    const Plan plan = make_plan(p, choose_path(p));
    const cudaError_t err = plan.path == PATH_LUT ? run_lut(p, plan, (cudaStream_t)stream)
                                                  : run_mma(p, plan, (cudaStream_t)stream);
    return (int)err;
}
