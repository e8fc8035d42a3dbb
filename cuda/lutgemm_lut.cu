/* LUT-GEMM, the general table kernel: float32 x at any m, bits 5..8 at m ≤ 2 (and what the
 * table path is forced on; m ≤ 8 with bits ≤ 4 and 16-bit x takes lutgemm_decode.cu). Rows of
 * x in tiles of 4 (gridDim.z). A block owns 1024 weight rows (a
 * lane's 16-byte load is 4 rows of one plane word) and a chunk of k. It builds in shared memory,
 * per 8 activations, the 256 signed sums Σ ±x (bit b of the index set means +x_b); a byte of a
 * plane word is then directly the index of its partial sum, so each weight byte costs one table
 * lookup and is read once from device memory. α scales the looked-up sums per (row, plane), z
 * multiplies Σ x of the word. Tables and sums are float32. */
#include "lutgemm_cuda.cuh"
#include "ptx.cuh"

namespace {

/* 4 consecutive rows of one metadata entry, kept raw (uint2 for fp16/bf16, uint4 for fp32)
 * so that the load is in flight while earlier words are consumed. */
template <typename Meta> struct MetaRaw { using type = uint2; };
template <> struct MetaRaw<float> { using type = uint4; };

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename Meta, typename Raw>
__device__ __forceinline__ void meta4_to_float(Raw raw, float v[4]) {
    const Meta *m = (const Meta *)&raw;
#pragma unroll
    for (int c = 0; c < 4; ++c) v[c] = to_float(m[c]);
}

/* Σ over the 4 bytes of `word` of table[j][byte j]: one row's contribution for one plane word. */
__device__ __forceinline__ float lookup_word(const float *table, uint32_t word) {
    return table[word & 0xff] + table[256 + ((word >> 8) & 0xff)] +
           table[512 + ((word >> 16) & 0xff)] + table[768 + (word >> 24)];
}

template <int BITS, int M_TILE, typename Meta>
__global__ void __launch_bounds__(LUT_THREADS) lut_kernel(LutArgs a) {
    using Raw = typename MetaRaw<Meta>::type;
    // words of plane loads kept in flight per thread: ≥ 8 uint4 (128 B) where BITS allows
    constexpr int DEPTH = BITS <= 2 ? 8 / BITS : 2;
    extern __shared__ float4 lut_smem[];
    const int chunk = a.chunk;
    float *xs = (float *)lut_smem;                                // [M_TILE][chunk * 32]
    float *tables = xs + M_TILE * chunk * 32;        // [M_TILE][chunk * 4][256]
    float *xsum = tables + M_TILE * chunk * 4 * 256; // [M_TILE][chunk]

    const int tid = threadIdx.x;
    const int64_t row = (int64_t)blockIdx.x * LUT_ROWS + tid * 4;
    const bool active = row < a.n_pad;
    const int64_t m0 = (int64_t)blockIdx.z * M_TILE;
    const int w_begin = blockIdx.y * a.words_per_split;
    const int w_end = min(a.words, w_begin + a.words_per_split);
    const bool general = a.mode == BCQ_MODE_GENERAL;

    // This thread builds entries e and 255 - e = -e of every other table.
    const int entry = tid & 127;
    float sign[8];
#pragma unroll
    for (int b = 0; b < 8; ++b) sign[b] = (entry >> b) & 1 ? 1.0f : -1.0f;

    float acc[M_TILE][4];
#pragma unroll
    for (int mm = 0; mm < M_TILE; ++mm)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[mm][c] = 0.0f;
    float alpha[BITS][4], offset[4];

    for (int c0 = w_begin; c0 < w_end; c0 += chunk) {
        const int words = min(chunk, w_end - c0);
        uint4 plane_buf[DEPTH][BITS];
        Raw meta_buf[DEPTH][BITS + 1];
        auto needs_meta = [&](int w) { return w == c0 || (32 * w) % a.group_size == 0; };
        auto load_word = [&](int w, uint4 (&pb)[BITS], Raw (&mb)[BITS + 1]) {
            if (!active) return;
#pragma unroll
            for (int i = 0; i < BITS; ++i)
                pb[i] = __ldg((const uint4 *)(a.planes + ((int64_t)w * BITS + i) * a.n_pad + row));
            if (needs_meta(w)) {
                const int64_t group = 32 * (int64_t)w / a.group_size;
#pragma unroll
                for (int j = 0; j < BITS + 1; ++j)
                    if (j < a.nm)
                        mb[j] = __ldg((const Raw *)((const char *)a.meta +
                                                     ((group * a.nm + j) * a.n_pad + row) * sizeof(Meta)));
            }
        };
        // Weight loads first, so that they are in flight while the tables are built.
#pragma unroll
        for (int d = 0; d < DEPTH; ++d)
            if (d < words) load_word(c0 + d, plane_buf[d], meta_buf[d]);

        __syncthreads();  // the previous chunk's tables are no longer read
        for (int e = tid; e < M_TILE * words * 32; e += LUT_THREADS) {
            const int mm = e / (words * 32), kk = e % (words * 32);
            const int64_t col = (int64_t)c0 * 32 + kk, xr = m0 + mm;
            xs[mm * chunk * 32 + kk] =
                xr < a.m && col < a.k ? load_scalar(a.x, xr * a.ldx + col, a.x_type) : 0.0f;
        }
        __syncthreads();
        for (int t = tid >> 7; t < M_TILE * words * 4; t += 2) {
            const int mm = t / (words * 4), wj = t % (words * 4);
            const float4 *x8 = (const float4 *)(xs + mm * chunk * 32 + wj * 8);
            const float4 lo = x8[0], hi = x8[1];
            const float v = sign[0] * lo.x + sign[1] * lo.y + sign[2] * lo.z + sign[3] * lo.w +
                            sign[4] * hi.x + sign[5] * hi.y + sign[6] * hi.z + sign[7] * hi.w;
            float *table = tables + (mm * chunk * 4 + wj) * 256;
            table[entry] = v;
            table[255 - entry] = -v;
        }
        for (int e = tid; e < M_TILE * words; e += LUT_THREADS) {
            const int mm = e / words, wl = e % words;
            float s = 0.0f;
            for (int j = 0; j < 32; ++j) s += xs[mm * chunk * 32 + wl * 32 + j];
            xsum[mm * chunk + wl] = s;
        }
        __syncthreads();

        for (int w0 = 0; w0 < words; w0 += DEPTH) {
#pragma unroll
            for (int d = 0; d < DEPTH; ++d) {
                const int wl = w0 + d;
                if (wl >= words || !active) continue;
                if (needs_meta(c0 + wl)) {
                    float v[4];
                    meta4_to_float<Meta>(general ? meta_buf[d][BITS] : meta_buf[d][1], offset);
                    if (!general) meta4_to_float<Meta>(meta_buf[d][0], v);
#pragma unroll
                    for (int i = 0; i < BITS; ++i) {
                        if (general) meta4_to_float<Meta>(meta_buf[d][i], alpha[i]);
                        else
#pragma unroll
                            for (int c = 0; c < 4; ++c) alpha[i][c] = v[c] * (0.5f * (1 << i));
                    }
                }
#pragma unroll
                for (int i = 0; i < BITS; ++i) {
                    const uint4 word = plane_buf[d][i];
#pragma unroll
                    for (int mm = 0; mm < M_TILE; ++mm) {
                        const float *table = tables + (mm * chunk + wl) * 4 * 256;
                        acc[mm][0] += alpha[i][0] * lookup_word(table, word.x);
                        acc[mm][1] += alpha[i][1] * lookup_word(table, word.y);
                        acc[mm][2] += alpha[i][2] * lookup_word(table, word.z);
                        acc[mm][3] += alpha[i][3] * lookup_word(table, word.w);
                    }
                }
#pragma unroll
                for (int mm = 0; mm < M_TILE; ++mm) {
                    const float s = xsum[mm * chunk + wl];
#pragma unroll
                    for (int c = 0; c < 4; ++c) acc[mm][c] += offset[c] * s;
                }
                if (wl + DEPTH < words) load_word(c0 + wl + DEPTH, plane_buf[d], meta_buf[d]);
            }
        }
    }

    if (gridDim.y > 1) {
        if (active)
#pragma unroll
            for (int mm = 0; mm < M_TILE; ++mm)
                if (m0 + mm < a.m)
                    lf::atomic_add4(a.acc + (m0 + mm) * a.n_pad + row,
                                make_float4(acc[mm][0], acc[mm][1], acc[mm][2], acc[mm][3]));
        if (!last_block_of_tile(a.counters + blockIdx.z * gridDim.x + blockIdx.x, gridDim.y))
            return;
        if (active)
#pragma unroll
            for (int mm = 0; mm < M_TILE; ++mm)
                if (m0 + mm < a.m) {
                    const float4 v = __ldcg((const float4 *)(a.acc + (m0 + mm) * a.n_pad + row));
                    acc[mm][0] = v.x, acc[mm][1] = v.y, acc[mm][2] = v.z, acc[mm][3] = v.w;
                }
    }
    if (!active) return;
#pragma unroll
    for (int mm = 0; mm < M_TILE; ++mm) {
        if (m0 + mm >= a.m) continue;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            if (row + c >= a.n) continue;
            const float b = a.bias ? load_scalar(a.bias, row + c, a.x_type) : 0.0f;
            store_scalar(a.out, (m0 + mm) * a.ldo + row + c, a.x_type, acc[mm][c] + b);
        }
    }
}

template <int BITS, int M_TILE>
cudaError_t launch(const LutArgs &a, dim3 grid, cudaStream_t stream) {
    const int smem = M_TILE * lut_smem_per_row(a.chunk);
    if (a.meta_type == LF_SCALAR_F32)
        lut_kernel<BITS, M_TILE, float><<<grid, LUT_THREADS, smem, stream>>>(a);
    else if (a.meta_type == LF_SCALAR_F16)
        lut_kernel<BITS, M_TILE, __half><<<grid, LUT_THREADS, smem, stream>>>(a);
    else
        lut_kernel<BITS, M_TILE, __nv_bfloat16><<<grid, LUT_THREADS, smem, stream>>>(a);
    return cudaGetLastError();
}

template <int M_TILE>
cudaError_t launch_bits(int bits, const LutArgs &a, dim3 grid, cudaStream_t stream) {
    switch (bits) {
    case 1: return launch<1, M_TILE>(a, grid, stream);
    case 2: return launch<2, M_TILE>(a, grid, stream);
    case 3: return launch<3, M_TILE>(a, grid, stream);
    case 4: return launch<4, M_TILE>(a, grid, stream);
    case 5: return launch<5, M_TILE>(a, grid, stream);
    case 6: return launch<6, M_TILE>(a, grid, stream);
    case 7: return launch<7, M_TILE>(a, grid, stream);
    case 8: return launch<8, M_TILE>(a, grid, stream);
    default: return cudaErrorInvalidValue;
    }
}

}  // namespace

cudaError_t lutgemm_lut_launch(int bits, const LutArgs &a, dim3 grid, cudaStream_t stream) {
    return launch_bits<LUT_M_TILE>(bits, a, grid, stream);
}
