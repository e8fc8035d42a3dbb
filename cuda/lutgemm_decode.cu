/* LUT-GEMM for few activation rows (m ≤ 8, bits ≤ 4): the bandwidth-bound decode GEMV.
 * Rows of x in tiles of M = 1, 2 or 4 (lutgemm_decode_rows; gridDim.z tiles); what follows
 * describes M = 1, where a slab is 512 k, twice the 256 k of M > 1 (table slots below).
 *
 * Tables. A block owns a slab of 512 k (16 plane words, 64 bytes of a word each covering 8 k)
 * and builds its 64 tables of 256 fp32 signed sums Σ ±x once. Table t's entry e lives at
 * word e·64 + t, so the 64 tables are interleaved and table t sits in bank t mod 32.
 *
 * Lookups without bank conflicts. Lane L = 4w + q of a warp holds, per plane, the 16-byte load
 * of word w (and word 8 + w in the second half of the slab) for rows r0 + 4q .. r0 + 4q + 3.
 * In lookup slot s it reads byte b = s ^ q of a row's word: its table is t = 4w + b, so the 32
 * lanes of a warp read 32 different tables in 32 different banks, whatever the bytes are. One
 * PRMT builds the byte address ((byte << 8) | 4t) from the word and a per-slot register that
 * holds 4t; the table base and the second half's +128 are the LDS immediate. So a lookup is
 * PRMT + LDS + FADD, and a warp-uniform table's ~3-way conflicts are gone.
 *
 * Each lane's sums are for its word only; a row's total over the warp's 8 words is a
 * reduce-scatter over lanes 4, 8, 16 apart (4 shuffles for 16 rows). Slabs are reduced with
 * fp32 atomics into a workspace that starts zero; the last block of a row tile writes the
 * output and puts the workspace back to zero (sums and counter), so that a workspace kept per
 * stream (lutflash.ops) needs no memset launch before the next call. Grid: (row tiles G,
 * slabs), with G·slabs ≈ the resident blocks of one wave; runs of 8 consecutive row sets of 16
 * rows go round-robin to the G tiles, one row set to each of the block's 8 warps. */
#include <type_traits>

#include "device.cuh"
#include "lutgemm_cuda.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int SLAB_WORDS = 16;
constexpr int TABLES = SLAB_WORDS * 4;           // 64
constexpr int TABLE_BYTES = 256 * TABLES * 4;    // 64 KB

__host__ __device__ constexpr int ctz(int v) { return v & 1 ? 0 : 1 + ctz(v >> 1); }

/* One pipeline stage of a lane: BITS plane words and the raw metadata of 4 rows. */
template <int BITS, bool META32, int NM = BITS + 1> struct Stage {
    using Raw = typename std::conditional<META32, uint4, uint2>::type;
    uint4 planes[BITS];
    Raw meta[NM];  // general: α_0 .. α_{q-1}, z; uniform: s, z
};

template <bool META32>
__device__ __forceinline__ void raw_to_float(const typename Stage<1, META32>::Raw &raw,
                                             int type, float v[4]) {
    if constexpr (META32) {
        v[0] = __uint_as_float(raw.x), v[1] = __uint_as_float(raw.y);
        v[2] = __uint_as_float(raw.z), v[3] = __uint_as_float(raw.w);
    } else {
        const uint32_t w[2] = {raw.x, raw.y};
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const uint16_t h = (uint16_t)(w[c >> 1] >> (16 * (c & 1)));
            v[c] = type == LF_SCALAR_F16 ? __half2float(__ushort_as_half(h))
                                         : __uint_as_float((uint32_t)h << 16);
        }
    }
}

constexpr int DEPTH3_REGS = 20;  // M = 2: 3 stages in flight up to this stage size

/* Registers of one stage (planes + the largest metadata set) decide the pipeline depth. */
template <int BITS, bool META32, bool GENERAL> __host__ __device__ constexpr int stage_regs() {
    return 4 * BITS + (GENERAL ? BITS + 1 : 2) * (META32 ? 4 : 2);
}
/* Stages in flight per warp: a multiple of the items per row set (HALVES). At M = 1, 4 stages
 * measured slower than 2 on the H100 even where a stage fits 20 registers (47.0 vs 44.1 µs,
 * 12288², 3-bit). */
template <int BITS, bool META32, bool GENERAL, int M> __host__ __device__ constexpr int depth() {
    return M == 2 && stage_regs<BITS, META32, GENERAL>() <= DEPTH3_REGS ? 3 : 2;
}
/* Table slots: 32 tables (8 words × 4 bytes) each; a pair of slots fills 64 KB. */
template <int M> __host__ __device__ constexpr int slots() { return M == 1 ? 2 : M; }
template <int M> __host__ __device__ constexpr int smem_bytes() {
    return slots<M>() / 2 * TABLE_BYTES + slots<M>() * 8 * 4;
}

/* 16-byte read-only load of plane words that does not keep its line in L1 and asks L2 to
 * fetch the 256-byte block around it from DRAM (the neighbouring rows other warps read next).
 * H100, 12288², m = 1, 3-bit (benchmarks/notes/lutgemm_cuda.md): no-allocate loads and row
 * sets in runs of 8 (tile_row_set) took the kernel from 44.5 to 38.2 µs, the 256 B L2
 * prefetch size to 37.2; with the lookups left out it runs 36.2: the loads bound it. */
__device__ __forceinline__ uint4 ldg_noalloc(const void *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

/* Row set of slot j of row tile x (G tiles): runs of 8 consecutive row sets
 * (8x + 8G·(j / 8) + j % 8), so a block's 8 warps read adjacent rows. */
__device__ __forceinline__ int64_t tile_row_set(int64_t j, int x, int G) {
    return (j >> 3) * 8 * G + 8 * x + (j & 7);
}

/* Number of row sets of tile x that exist (tile_row_set(j) < row_sets for j < this). */
__device__ __forceinline__ int64_t tile_row_sets(int64_t row_sets, int x, int G) {
    const int64_t rem = row_sets - 8 * (int64_t)x;
    if (rem <= 0) return 0;
    const int64_t periods = rem / (8 * (int64_t)G), tail = rem - periods * 8 * G;
    return periods * 8 + (tail < 8 ? tail : 8);
}

/* x[row, col0 .. col0 + 7] as floats (0 past k): one or two 16-byte loads where the row is
 * 16-byte aligned (`vec`, uniform over the grid), else eight scalar loads. The tables need x
 * before anything else, so these go out ahead of the weights (ncu, 4096², m = 1: the scalar
 * loads, issued behind the first weight items and waited for one by one, took a fifth of the
 * kernel's stall samples). */
__device__ __forceinline__ void load_x8(const LutArgs &a, int64_t row, int64_t col0, bool vec,
                                        float x[8]) {
    if (vec && col0 + 8 <= a.k) {
        const char *p = (const char *)a.x + (row * a.ldx + col0) * (a.x_type == LF_SCALAR_F32 ? 4 : 2);
        if (a.x_type == LF_SCALAR_F32) {
            const float4 u = *(const float4 *)p, v = *(const float4 *)(p + 16);
            x[0] = u.x, x[1] = u.y, x[2] = u.z, x[3] = u.w;
            x[4] = v.x, x[5] = v.y, x[6] = v.z, x[7] = v.w;
        } else {
            const uint4 u = *(const uint4 *)p;
            const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const uint16_t h = (uint16_t)(w[j >> 1] >> (16 * (j & 1)));
                x[j] = a.x_type == LF_SCALAR_F16 ? __half2float(__ushort_as_half(h))
                                                 : __uint_as_float((uint32_t)h << 16);
            }
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j)
        x[j] = col0 + j < a.k ? load_scalar(a.x, row * a.ldx + col0 + j, a.x_type) : 0.0f;
}

template <int BITS, bool META32, bool GENERAL, int M>
__global__ void __launch_bounds__(THREADS, M >= 4 ? 1 : 2) decode_kernel(LutArgs a) {
    constexpr int NM = GENERAL ? BITS + 1 : 2;  // metadata entries per (row, group)
    using St = Stage<BITS, META32, NM>;
    using Raw = typename St::Raw;
    constexpr int HALVES = M == 1 ? 2 : 1;  // items (8-word halves) per row set
    constexpr int SW = 8 * HALVES;          // words per slab
    constexpr int S = slots<M>();           // table slots
    constexpr int D = depth<BITS, META32, GENERAL, M>();  // items (stages) in flight
    static_assert(D % HALVES == 0, "whole row sets per round");
    extern __shared__ float4 decode_smem[];
    float *tables = (float *)decode_smem;
    float *xsum = tables + S / 2 * 256 * TABLES;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int w = lane >> 2, q = lane & 3;
    const int w0 = blockIdx.y * SW;
    const int64_t row_sets = (a.n_pad + 15) / 16;
    const int meta_size = META32 ? 4 : 2;
    // This block's activation rows: z·M .. z·M + mz − 1 (mz ≤ M)
    const int64_t row0 = (int64_t)blockIdx.z * M;
    const int mz = a.m - row0 < M ? (int)(a.m - row0) : M;
    float *wacc = a.acc + row0 * a.n_pad;
    unsigned *counter = a.counters + (int64_t)blockIdx.z * gridDim.x + blockIdx.x;

    // The words of this lane (halves h) and their groups.
    int word[HALVES], group[HALVES];
    bool valid[HALVES];
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
        word[h] = w0 + h * 8 + w;
        valid[h] = word[h] < a.words;
        group[h] = valid[h] ? (int)(32 * (int64_t)word[h] / a.group_size) : 0;
    }

    // Row sets of this warp: tile slots warp + 8 j (tile_row_set); item it = (j, half).
    const int64_t rs_step = (int64_t)gridDim.x * 8;
    const int64_t rs0 = tile_row_set(warp, blockIdx.x, gridDim.x);
    auto item_rs = [&](int it) { return rs0 + (int64_t)(it / HALVES) * rs_step; };

    auto load = [&](St &st, int64_t set, int h) {
        const int64_t row = set * 16 + 4 * q;
        const bool ok = set < row_sets && row < a.n_pad && valid[h];
#pragma unroll
        for (int i = 0; i < BITS; ++i) {
            const uint4 *src = (const uint4 *)(a.planes + ((int64_t)word[h] * BITS + i) * a.n_pad + row);
            st.planes[i] = ok ? ldg_noalloc(src) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < NM; ++j) {
            st.meta[j] = ok ? __ldg((const Raw *)((const char *)a.meta +
                                                  (((int64_t)group[h] * NM + j) * a.n_pad + row) *
                                                      meta_size))
                            : Raw{};
        }
    };

    // Tables: slot pair p holds tables T = 0..63 (slot 2p + T / 32, table T % 32 of it); thread
    // builds entries 64·(tid >> 6) .. +63 of table T = tid & 63, Gray order. Slot σ is half σ
    // of the slab (M = 1) or activation row σ (M > 1). Their x goes out first, then the first
    // D items' weights, then the tables are built.
    const int esize = a.x_type == LF_SCALAR_F32 ? 4 : 2;
    const bool xvec = ((uintptr_t)a.x % 16 == 0) && (a.ldx * esize % 16 == 0);
    float xv[S / 2][8];
#pragma unroll
    for (int p = 0; p < S / 2; ++p) {
        const int T = tid & 63, sigma = 2 * p + (T >> 5);
        const int r = M == 1 ? 0 : sigma;
        const int64_t col0 = (int64_t)w0 * 32 + 8 * (M == 1 ? T : T & 31);
        if (r < mz) load_x8(a, row0 + r, col0, xvec, xv[p]);
        else
#pragma unroll
            for (int j = 0; j < 8; ++j) xv[p][j] = 0.0f;
    }
    St st[D];
#pragma unroll
    for (int j = 0; j < D; ++j) load(st[j], item_rs(j), j % HALVES);

#pragma unroll
    for (int p = 0; p < S / 2; ++p) {
        const int T = tid & 63, hi = tid >> 6;
        const float *x = xv[p];
        float v = (hi & 1 ? x[6] : -x[6]) + (hi & 2 ? x[7] : -x[7]);
#pragma unroll
        for (int j = 0; j < 6; ++j) v -= x[j];
        float *tab = tables + p * 256 * TABLES + hi * 64 * TABLES + T;
        tab[0] = v;
#pragma unroll
        for (int i = 1; i < 64; ++i) {
            const int j = ctz(i), gray = i ^ (i >> 1);
            v += (gray >> j) & 1 ? 2.0f * x[j] : -2.0f * x[j];
            tab[gray * TABLES] = v;
        }
        if (hi == 0) {  // Σ x per word: 4 consecutive tables, 4 consecutive lanes
            float s = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            if ((T & 3) == 0) xsum[2 * p * 8 + (T >> 2)] = s;
        }
    }
    __syncthreads();
    float xs[S];  // Σx of this lane's word, per slot
#pragma unroll
    for (int s = 0; s < S; ++s) xs[s] = xsum[s * 8 + w];

    // Per lookup slot s: PRMT selector (byte s ^ q of the word into bits 8..15, 4t below it)
    // and the register holding 4t in its low byte.
    uint32_t sel[4], base[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const int b = s ^ q;
        sel[s] = 0x5504u | (uint32_t)b << 4;
        base[s] = 4u * (4 * w + b);
    }

    float acc[M][4];
    // Σ over the stage's 4 rows of Σ_i α_i · (table sums) + z · Σx, for every activation row.
    auto consume = [&](const St &st, int h) {
        float alpha[BITS][4], z[4];
        if constexpr (GENERAL) {
            raw_to_float<META32>(st.meta[BITS], a.meta_type, z);
#pragma unroll
            for (int i = 0; i < BITS; ++i) raw_to_float<META32>(st.meta[i], a.meta_type, alpha[i]);
        } else {
            float sc[4];
            raw_to_float<META32>(st.meta[1], a.meta_type, z);
            raw_to_float<META32>(st.meta[0], a.meta_type, sc);
#pragma unroll
            for (int i = 0; i < BITS; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c) alpha[i][c] = sc[c] * (0.5f * (1 << i));
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            float sum[M];
#pragma unroll
            for (int r = 0; r < M; ++r) sum[r] = z[c] * xs[M == 1 ? h : r];
#pragma unroll
            for (int i = 0; i < BITS; ++i) {
                const uint32_t u = (&st.planes[i].x)[c];
                uint32_t off[4];
#pragma unroll
                for (int s = 0; s < 4; ++s) off[s] = __byte_perm(u, base[s], sel[s]);
#pragma unroll
                for (int r = 0; r < M; ++r) {
                    const int sigma = M == 1 ? h : r;
                    const char *tab = (const char *)tables + (sigma >> 1) * TABLE_BYTES +
                                      (sigma & 1) * 128;
                    float tsum = 0.0f;
#pragma unroll
                    for (int s = 0; s < 4; ++s) tsum += *(const float *)(tab + off[s]);
                    sum[r] += alpha[i][c] * tsum;
                }
            }
#pragma unroll
            for (int r = 0; r < M; ++r) acc[r][c] += sum[r];
        }
    };

    // Reduce over the 8 lanes of equal q: lane (w, q) ends with row 4q + ((w >> 1) & 3).
    auto finish = [&](int64_t rs) {
        const bool b16 = lane & 16, b8 = lane & 8;
        const int64_t row = rs * 16 + 4 * q + ((w >> 1) & 3);
#pragma unroll
        for (int r = 0; r < M; ++r) {
            const float v0 = __shfl_xor_sync(0xffffffffu, b16 ? acc[r][0] : acc[r][2], 16);
            const float v1 = __shfl_xor_sync(0xffffffffu, b16 ? acc[r][1] : acc[r][3], 16);
            const float a0 = (b16 ? acc[r][2] : acc[r][0]) + v0;
            const float a1 = (b16 ? acc[r][3] : acc[r][1]) + v1;
            float v = (b8 ? a1 : a0) + __shfl_xor_sync(0xffffffffu, b8 ? a0 : a1, 8);
            v += __shfl_xor_sync(0xffffffffu, v, 4);
            if ((w & 1) == 0 && row < a.n_pad && r < mz) {
                if (gridDim.y > 1) atomicAdd(wacc + r * a.n_pad + row, v);
                else if (row < a.n)
                    store_scalar(a.out, (row0 + r) * a.ldo + row, a.x_type,
                                 v + (a.bias ? load_scalar(a.bias, row, a.x_type) : 0.0f));
            }
        }
    };

    // Rounds of D items: consume item j, refill its registers with item j + D.
    for (int it0 = 0; item_rs(it0) < row_sets; it0 += D) {
#pragma unroll
        for (int j = 0; j < D; ++j) {
            const int h = j % HALVES;
            const int64_t rs = item_rs(it0 + j);
            if (h == 0) {
                if (rs >= row_sets) break;
#pragma unroll
                for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = 0.0f;
            }
            consume(st[j], h);
            load(st[j], item_rs(it0 + j + D), h);
            if (h == HALVES - 1) finish(rs);
        }
    }

    if (gridDim.y > 1 && last_block_of_tile(counter, gridDim.y)) {
        // Every other block of the tile has counted itself: reset the counter, and below put
        // back zeros where the atomics summed, so the workspace is clean for the next call.
        if (tid == 0) *counter = 0;
        // This tile's rows: its row sets (tile_row_set), for each activation row.
        const int64_t tile_rows = tile_row_sets(row_sets, blockIdx.x, gridDim.x) * 16;
        for (int64_t e = tid; e < tile_rows * mz; e += THREADS) {
            const int r = (int)(e / tile_rows);
            const int64_t f = e - r * tile_rows;
            const int64_t row = tile_row_set(f / 16, blockIdx.x, gridDim.x) * 16 + f % 16;
            if (row < a.n_pad) {
                float *p = wacc + r * a.n_pad + row;
                const float v = __ldcg(p);
                __stcg(p, 0.0f);
                if (row < a.n)
                    store_scalar(a.out, (row0 + r) * a.ldo + row, a.x_type,
                                 v + (a.bias ? load_scalar(a.bias, row, a.x_type) : 0.0f));
            }
        }
    }
}

template <int BITS, bool META32, bool GENERAL, int M>
cudaError_t launch(const LutArgs &a, cudaStream_t stream) {
    constexpr int SMEM = smem_bytes<M>();
    constexpr auto kernel = decode_kernel<BITS, META32, GENERAL, M>;
    int resident = 1;  // blocks per SM: the grid fills one wave
    cudaError_t err = lf::setup_kernel<kernel>(THREADS, SMEM, &resident);
    if (err != cudaSuccess) return err;
    const int64_t slabs = lutgemm_decode_slabs(a.m, a.words);
    const int64_t z = (a.m + M - 1) / M;
    const int64_t row_sets = (a.n_pad + 15) / 16;
    int64_t tiles = (int64_t)resident * a.sm_count / (slabs * z);
    tiles = tiles < 1 ? 1 : tiles > row_sets ? row_sets : tiles;
    const dim3 grid((unsigned)tiles, (unsigned)slabs, (unsigned)z);
    kernel<<<grid, THREADS, SMEM, stream>>>(a);
    return cudaGetLastError();
}

template <bool META32, bool GENERAL, int M>
cudaError_t launch_bits(int bits, const LutArgs &a, cudaStream_t stream) {
    switch (bits) {
    case 1: return launch<1, META32, GENERAL, M>(a, stream);
    case 2: return launch<2, META32, GENERAL, M>(a, stream);
    case 3: return launch<3, META32, GENERAL, M>(a, stream);
    case 4: return launch<4, META32, GENERAL, M>(a, stream);
    default: return cudaErrorInvalidValue;
    }
}

template <bool META32, int M>
cudaError_t launch_mode(int bits, const LutArgs &a, cudaStream_t stream) {
    return a.mode == BCQ_MODE_GENERAL ? launch_bits<META32, true, M>(bits, a, stream)
                                      : launch_bits<META32, false, M>(bits, a, stream);
}

template <bool META32>
cudaError_t launch_m(int bits, const LutArgs &a, cudaStream_t stream) {
    switch (lutgemm_decode_rows(a.m)) {
    case 1: return launch_mode<META32, 1>(bits, a, stream);
    case 2: return launch_mode<META32, 2>(bits, a, stream);
    default: return launch_mode<META32, 4>(bits, a, stream);
    }
}

}  // namespace

int lutgemm_decode_rows(int64_t m) { return m <= 1 ? 1 : m == 2 ? 2 : 4; }

int64_t lutgemm_decode_slabs(int64_t m, int64_t words) {
    const int64_t sw = m <= 1 ? 16 : 8;
    return (words + sw - 1) / sw;
}

cudaError_t lutgemm_decode_launch(int bits, const LutArgs &a, cudaStream_t stream) {
    return a.meta_type == LF_SCALAR_F32 ? launch_m<true>(bits, a, stream)
                                        : launch_m<false>(bits, a, stream);
}
