/* LUT-GEMM for one activation row (m = 1, bits ≤ 4): the bandwidth-bound decode GEMV.
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
 * fp32 atomics into the workspace (zeroed by the launcher); the last block of a row tile
 * writes the output. Grid: (row tiles G, slabs), with G·slabs ≈ the resident blocks of one
 * wave; row sets of 16 rows go round-robin to the G tiles and then to the block's 8 warps. */
#include <type_traits>

#include "lutgemm_cuda.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int SLAB_WORDS = 16;
constexpr int TABLES = SLAB_WORDS * 4;           // 64
constexpr int TABLE_BYTES = 256 * TABLES * 4;    // 64 KB
constexpr int SMEM_BYTES = TABLE_BYTES + SLAB_WORDS * 4;  // tables, then Σx per word

__host__ __device__ constexpr int ctz(int v) { return v & 1 ? 0 : 1 + ctz(v >> 1); }

/* One pipeline stage of a lane: BITS plane words and the raw metadata of 4 rows. */
template <int BITS, bool META32> struct Stage {
    using Raw = typename std::conditional<META32, uint4, uint2>::type;
    uint4 planes[BITS];
    Raw meta[BITS + 1];
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

template <int BITS, bool META32>
__global__ void __launch_bounds__(THREADS, 2) lut1_kernel(LutArgs a) {
    using St = Stage<BITS, META32>;
    using Raw = typename St::Raw;
    extern __shared__ float4 lut1_smem[];
    float *tables = (float *)lut1_smem;
    float *xsum = tables + 256 * TABLES;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int w = lane >> 2, q = lane & 3;
    const int w0 = blockIdx.y * SLAB_WORDS;
    const int64_t row_sets = (a.n_pad + 15) / 16;
    const int nm = a.nm;
    const bool general = a.mode == BCQ_MODE_GENERAL;
    const int meta_size = META32 ? 4 : 2;

    // The two words of this lane (halves h = 0, 1 of the slab) and their groups.
    int word[2], group[2];
    bool valid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        word[h] = w0 + h * 8 + w;
        valid[h] = word[h] < a.words;
        group[h] = valid[h] ? (int)(32 * (int64_t)word[h] / a.group_size) : 0;
    }

    // Row sets of this block: blockIdx.x + gridDim.x · (warp + 8 j).
    const int64_t rs_step = (int64_t)gridDim.x * 8;
    int64_t rs = blockIdx.x + (int64_t)gridDim.x * warp;

    auto load = [&](St &st, int64_t set, int h) {
        const int64_t row = set * 16 + 4 * q;
        const bool ok = set < row_sets && row < a.n_pad && valid[h];
#pragma unroll
        for (int i = 0; i < BITS; ++i)
            st.planes[i] = ok ? __ldg((const uint4 *)(a.planes +
                                                      ((int64_t)word[h] * BITS + i) * a.n_pad + row))
                              : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int j = 0; j < BITS + 1; ++j) {
            if (j >= nm) break;
            st.meta[j] = ok ? __ldg((const Raw *)((const char *)a.meta +
                                                  (((int64_t)group[h] * nm + j) * a.n_pad + row) *
                                                      meta_size))
                            : Raw{};
        }
    };

    // First stage's loads go out before the tables are built.
    St s0, s1;
    load(s0, rs, 0);

    {  // Tables: thread builds entries 64·(tid >> 6) .. +63 of table t = tid & 63, Gray order.
        const int t = tid & 63, hi = tid >> 6;
        const int64_t col0 = (int64_t)w0 * 32 + 8 * t;
        float x[8];
#pragma unroll
        for (int j = 0; j < 8; ++j)
            x[j] = col0 + j < a.k ? load_scalar(a.x, col0 + j, a.x_type) : 0.0f;
        float v = (hi & 1 ? x[6] : -x[6]) + (hi & 2 ? x[7] : -x[7]);
#pragma unroll
        for (int j = 0; j < 6; ++j) v -= x[j];
        float *tab = tables + hi * 64 * TABLES + t;
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
            if ((t & 3) == 0) xsum[t >> 2] = s;
        }
    }
    __syncthreads();
    const float xs[2] = {xsum[w], xsum[8 + w]};

    // Per lookup slot s: PRMT selector (byte s ^ q of the word into bits 8..15, 4t below it)
    // and the register holding 4t in its low byte.
    uint32_t sel[4], base[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const int b = s ^ q;
        sel[s] = 0x5504u | (uint32_t)b << 4;
        base[s] = 4u * (4 * w + b);
    }

    float acc[4];
    // Σ over the stage's 4 rows of Σ_i α_i · (table sums) + z · Σx.
    auto consume = [&](const St &st, int h) {
        const char *tab = (const char *)tables + h * 128;
        float alpha[BITS][4], z[4];
        if (general) {
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
            float sum = z[c] * xs[h];
#pragma unroll
            for (int i = 0; i < BITS; ++i) {
                const uint32_t u = (&st.planes[i].x)[c];
                float tsum = 0.0f;
#pragma unroll
                for (int s = 0; s < 4; ++s)
                    tsum += *(const float *)(tab + __byte_perm(u, base[s], sel[s]));
                sum += alpha[i][c] * tsum;
            }
            acc[c] += sum;
        }
    };

    for (; rs < row_sets; rs += rs_step) {
        acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
        load(s1, rs, 1);
        consume(s0, 0);
        load(s0, rs + rs_step, 0);
        consume(s1, 1);

        // Reduce over the 8 lanes of equal q: lane (w, q) ends with row 4q + ((w >> 1) & 3).
        const bool b16 = lane & 16, b8 = lane & 8;
        const float v0 = __shfl_xor_sync(0xffffffffu, b16 ? acc[0] : acc[2], 16);
        const float v1 = __shfl_xor_sync(0xffffffffu, b16 ? acc[1] : acc[3], 16);
        const float a0 = (b16 ? acc[2] : acc[0]) + v0, a1 = (b16 ? acc[3] : acc[1]) + v1;
        float r = (b8 ? a1 : a0) + __shfl_xor_sync(0xffffffffu, b8 ? a0 : a1, 8);
        r += __shfl_xor_sync(0xffffffffu, r, 4);
        const int64_t row = rs * 16 + 4 * q + ((w >> 1) & 3);
        if ((w & 1) == 0 && row < a.n_pad) {
            if (gridDim.y > 1) atomicAdd(a.acc + row, r);
            else if (row < a.n)
                store_scalar(a.out, row, a.x_type,
                             r + (a.bias ? load_scalar(a.bias, row, a.x_type) : 0.0f));
        }
    }

    if (gridDim.y > 1 && last_block_of_tile(a.counters + blockIdx.x, gridDim.y)) {
        // This tile's rows: row sets blockIdx.x + gridDim.x · j.
        for (int64_t e = tid; e < ((row_sets - blockIdx.x + gridDim.x - 1) / gridDim.x) * 16;
             e += THREADS) {
            const int64_t row = (blockIdx.x + gridDim.x * (e / 16)) * 16 + e % 16;
            if (row < a.n)
                store_scalar(a.out, row, a.x_type,
                             __ldcg(a.acc + row) + (a.bias ? load_scalar(a.bias, row, a.x_type) : 0.0f));
        }
    }
}

template <int BITS, bool META32>
cudaError_t launch(const LutArgs &a, int64_t slabs, cudaStream_t stream) {
    static int resident = 0;  // blocks per SM, once per instance
    if (resident == 0) {
        cudaError_t err = cudaFuncSetAttribute(lut1_kernel<BITS, META32>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               SMEM_BYTES);
        if (err != cudaSuccess) return err;
        int v = 0;
        err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, lut1_kernel<BITS, META32>,
                                                            THREADS, SMEM_BYTES);
        if (err != cudaSuccess) return err;
        resident = v > 0 ? v : 1;
    }
    const int64_t row_sets = (a.n_pad + 15) / 16;
    int64_t tiles = (int64_t)resident * a.sm_count / slabs;
    tiles = tiles < 1 ? 1 : tiles > row_sets ? row_sets : tiles;
    const dim3 grid((unsigned)tiles, (unsigned)slabs);
    lut1_kernel<BITS, META32><<<grid, THREADS, SMEM_BYTES, stream>>>(a);
    return cudaGetLastError();
}

template <bool META32>
cudaError_t launch_bits(int bits, const LutArgs &a, int64_t slabs, cudaStream_t stream) {
    switch (bits) {
    case 1: return launch<1, META32>(a, slabs, stream);
    case 2: return launch<2, META32>(a, slabs, stream);
    case 3: return launch<3, META32>(a, slabs, stream);
    case 4: return launch<4, META32>(a, slabs, stream);
    default: return cudaErrorInvalidValue;
    }
}

}  // namespace

int64_t lutgemm_lut1_slabs(int64_t words) { return (words + SLAB_WORDS - 1) / SLAB_WORDS; }

cudaError_t lutgemm_lut1_launch(int bits, const LutArgs &a, cudaStream_t stream) {
    const int64_t slabs = lutgemm_lut1_slabs(a.words);
    return a.meta_type == LF_SCALAR_F32 ? launch_bits<true>(bits, a, slabs, stream)
                                        : launch_bits<false>(bits, a, slabs, stream);
}
