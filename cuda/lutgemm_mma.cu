/* LUT-GEMM, the prefill path: tensor cores (mma.sync m16n8k16, ldmatrix, a cp.async ring).
 * x is first copied to the workspace with each 32-k word's columns permuted (permute_x_kernel)
 * so that the 8 weights a thread needs for its mma B fragments come from bits (p, p + 16) of a
 * plane word: one shift brings a pair to the sign bits of a half2 and one lop3 turns it into
 * (±α, ±α). The weight tile is dequantized in registers and never written anywhere. */
#include <type_traits>

#include "lutgemm_cuda.cuh"

namespace {


/* Column permutation inside each 32-k word. Logical column L = 16s + 8r + 2t + e (k16 step s,
 * B register r, thread-in-group t, half e of the mma fragment) holds physical column
 * 4t + 2s + r + 16e, so thread t finds its pairs at bits (p, p + 16), p = 4t + 2s + r. */
__global__ void permute_x_kernel(const uint16_t *__restrict__ x, int64_t ldx,
                                 uint16_t *__restrict__ xp, int64_t m, int64_t m_pad, int64_t k,
                                 int64_t k_pad) {
    const int64_t runs_per_row = k_pad / 8;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < m_pad * runs_per_row;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / runs_per_row, run = i % runs_per_row;
        const int64_t base = (run >> 2) * 32 + (run & 3);  // + 2s + r, as run & 3 = 2s + r
        uint16_t v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int64_t col = base + 4 * (u >> 1) + 16 * (u & 1);
            v[u] = r < m && col < k ? x[r * ldx + col] : 0;
        }
        uint4 packed;
        packed.x = v[0] | (uint32_t)v[1] << 16, packed.y = v[2] | (uint32_t)v[3] << 16;
        packed.z = v[4] | (uint32_t)v[5] << 16, packed.w = v[6] | (uint32_t)v[7] << 16;
        *(uint4 *)(xp + r * k_pad + run * 8) = packed;
    }
}


__device__ __forceinline__ void cp_async16(void *smem, const void *global, bool valid) {
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing is read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global),
                 "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *smem) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* (~bits & 0x80008000) ^ alpha: the two sign bits of `bits` pick +α or -α per half. */
__device__ __forceinline__ uint32_t signed_alpha(uint32_t bits, uint32_t alpha) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xA6;\n" : "=r"(r) : "r"(bits), "r"(0x80008000u), "r"(alpha));
    return r;
}

template <typename T> struct Pair;
template <> struct Pair<__half> {
    using T2 = __half2;
    static __device__ __forceinline__ uint32_t from_float(float v) {
        const __half h = __float2half_rn(v);
        return (uint32_t)__half_as_ushort(h) * 0x10001u;
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __half2 h = __floats2half2_rn(lo, hi);
        return *(const uint32_t *)&h;
    }
};
template <> struct Pair<__nv_bfloat16> {
    using T2 = __nv_bfloat162;
    static __device__ __forceinline__ uint32_t from_float(float v) {
        const __nv_bfloat16 h = __float2bfloat16_rn(v);
        return (uint32_t)__bfloat16_as_ushort(h) * 0x10001u;
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *(const uint32_t *)&h;
    }
};

/* ±α in fp32: bit 31 of `bits` set gives +α, clear gives -α (α as float bits). */
__device__ __forceinline__ float signed_alpha_f32(uint32_t bits, uint32_t alpha) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xA6;\n" : "=r"(r) : "r"(bits), "r"(0x80000000u), "r"(alpha));
    return __uint_as_float(r);
}

template <typename T>
__device__ __forceinline__ uint32_t add2(uint32_t a, uint32_t b) {
    using T2 = typename Pair<T>::T2;
    T2 r = __hadd2(*(T2 *)&a, *(T2 *)&b);
    return *(uint32_t *)&r;
}
template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    using T2 = typename Pair<T>::T2;
    T2 r = __hfma2(*(T2 *)&a, *(T2 *)&b, *(T2 *)&c);
    return *(uint32_t *)&r;
}

template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
    if constexpr (std::is_same<T, __half>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}



template <typename T, int BM>
struct MmaConfig {
    static constexpr int WARPS_M = BM > 64 ? BM / 64 : 1;
    static constexpr int THREADS = 128 * WARPS_M;
    static constexpr int M_TILES = (BM > 64 ? 64 : BM) / 16;  // per warp
    static constexpr int MIN_BLOCKS = BM <= 32 ? 3 : 1;        // small tiles: several per SM
};

template <typename T, int BM>
__global__ void __launch_bounds__(MmaConfig<T, BM>::THREADS, MmaConfig<T, BM>::MIN_BLOCKS)
    mma_kernel(MmaArgs a) {
    using Cfg = MmaConfig<T, BM>;
    extern __shared__ uint4 mma_smem[];
    unsigned char *smem = (unsigned char *)mma_smem;
    const int bits = a.bits, nm = a.nm;
    const int meta_size = a.meta_type == LF_SCALAR_F32 ? 4 : 2;
    const MmaStage st(BM, bits, nm, meta_size);
    uint32_t *alpha = (uint32_t *)(smem + MMA_STAGES * st.bytes());  // [slot][bits + 2][BN]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / 4, wn = warp % 4, g = lane >> 2, t = lane & 3;
    const int64_t n0 = (int64_t)blockIdx.x * MMA_BN, m0 = (int64_t)blockIdx.y * BM;
    const int w_begin = blockIdx.z * a.words_per_split;
    const int w_end = min(a.words, w_begin + a.words_per_split);
    const int stages = (w_end - w_begin + MMA_WORDS - 1) / MMA_WORDS;
    auto group_of = [&](int w) { return (int)(32 * (int64_t)w / a.group_size); };

    auto load_stage = [&](int s) {
        unsigned char *base = smem + (s % MMA_STAGES) * st.bytes();
        const int w0 = w_begin + s * MMA_WORDS;
        uint16_t *xs = (uint16_t *)base;
        for (int c = tid; c < BM * 4 * MMA_WORDS; c += Cfg::THREADS) {
            const int r = c / (4 * MMA_WORDS), ch = c % (4 * MMA_WORDS);
            const bool valid = w0 + ch / 4 < w_end;
            const uint16_t *src = a.xp + (m0 + r) * a.k_pad + (int64_t)w0 * 32 + ch * 8;
            cp_async16(xs + r * 64 + ((ch ^ (r & 7)) * 8), valid ? src : a.xp, valid);
        }
        uint32_t *ps = (uint32_t *)(base + st.x_bytes);
        for (int c = tid; c < MMA_WORDS * bits * (MMA_BN / 4); c += Cfg::THREADS) {
            const int wi = c / (MMA_BN / 4), ch = c % (MMA_BN / 4);  // wi = word * bits + plane
            const int64_t rr = n0 + ch * 4;
            const bool valid = w0 + wi / bits < w_end && rr < a.n_pad;
            const uint32_t *src = a.planes + ((int64_t)w0 * bits + wi) * a.n_pad + rr;
            cp_async16(ps + wi * MMA_BN + ch * 4, valid ? src : a.planes, valid);
        }
        unsigned char *ms = base + st.x_bytes + st.plane_bytes;
        const int chunks = MMA_BN * meta_size / 16;
        for (int c = tid; c < MMA_WORDS * nm * chunks; c += Cfg::THREADS) {
            const int slot = c / (nm * chunks), j = (c / chunks) % nm, ch = c % chunks;
            const int w = w0 + slot;
            const int64_t rr = n0 + ch * 16 / meta_size;
            const bool valid = w < w_end && rr < a.n_pad;
            const unsigned char *src =
                (const unsigned char *)a.meta +
                (((int64_t)group_of(valid ? w : 0) * nm + j) * a.n_pad + rr) * meta_size;
            cp_async16(ms + (slot * nm + j) * MMA_BN * meta_size + ch * 16,
                       valid ? src : a.meta, valid);
        }
    };

    float acc[Cfg::M_TILES][4][4];
#pragma unroll
    for (int i = 0; i < Cfg::M_TILES; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < MMA_STAGES - 1; ++s) {
        if (s < stages) load_stage(s);
        cp_async_commit();
    }
    for (int s = 0; s < stages; ++s) {
        cp_async_wait<MMA_STAGES - 2>();
        __syncthreads();  // stage s landed; everyone is done with stage s - 1 and `alpha`
        if (s + MMA_STAGES - 1 < stages) load_stage(s + MMA_STAGES - 1);
        cp_async_commit();

        const unsigned char *base = smem + (s % MMA_STAGES) * st.bytes();
        const int w0 = w_begin + s * MMA_WORDS;
        // Metadata → broadcast pairs: α_i (2^i in uniform mode), scale (1 or s/2), z, so
        // that Ŵ = scale·Σ_i ±α_i + z for both modes (uniform: an exact odd integer times s/2).
        const unsigned char *ms = base + st.x_bytes + st.plane_bytes;
        for (int e = tid; e < MMA_WORDS * MMA_BN; e += Cfg::THREADS) {
            const int slot = e / MMA_BN, col = e % MMA_BN;
            const unsigned char *raw = ms + slot * nm * MMA_BN * meta_size;
            auto entry = [&](int j) {
                const int64_t idx = (int64_t)j * MMA_BN + col;
                if (a.meta_type == LF_SCALAR_F32) return ((const float *)raw)[idx];
                const uint16_t h = ((const uint16_t *)raw)[idx];
                return a.meta_type == LF_SCALAR_F16 ? __half2float(__ushort_as_half(h))
                                                    : __uint_as_float((uint32_t)h << 16);
            };
            uint32_t *out = alpha + slot * (bits + 2) * MMA_BN + col;
            if (a.mode == BCQ_MODE_GENERAL) {  // fp32 α_i and z: summed in fp32 below
                for (int i = 0; i < bits; ++i) out[i * MMA_BN] = __float_as_uint(entry(i));
                out[(bits + 1) * MMA_BN] = __float_as_uint(entry(nm - 1));
            } else {
                for (int i = 0; i < bits; ++i) out[i * MMA_BN] = Pair<T>::from_float((float)(1 << i));
                out[bits * MMA_BN] = Pair<T>::from_float(0.5f * entry(0));
                out[(bits + 1) * MMA_BN] = Pair<T>::from_float(entry(nm - 1));
            }
        }
        __syncthreads();

        const uint16_t *xs = (const uint16_t *)base;
        const uint32_t *ps = (const uint32_t *)(base + st.x_bytes);
        for (int kw = 0; kw < MMA_WORDS; ++kw) {
            const int w = w0 + kw;
            if (w >= w_end) break;
            // The second word reads the first's metadata slot when it is in the same group.
            const int slot = kw > 0 && group_of(w) != group_of(w0) ? kw : 0;
            const uint32_t *al = alpha + slot * (bits + 2) * MMA_BN;
            uint32_t b[4][4];
            if (a.mode == BCQ_MODE_GENERAL) {
                // Σ_i ±α_i + z in fp32, rounded once to T: partial sums of arbitrary α would
                // round at every add in T (error well above dequantize-then-round).
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    const int col = wn * 32 + nt * 8 + g;
                    const float z = __uint_as_float(al[(bits + 1) * MMA_BN + col]);
                    float lo[4] = {z, z, z, z}, hi[4] = {z, z, z, z};
                    for (int i = 0; i < bits; ++i) {
                        const uint32_t word = ps[(kw * bits + i) * MMA_BN + col];
                        const uint32_t al_i = al[i * MMA_BN + col];
                        // bits 4t + 3 and 4t + 19 → bit 31; then bits 4t + r, 4t + 16 + r
                        const uint32_t ylo = word << (28 - 4 * t), yhi = word << (12 - 4 * t);
#pragma unroll
                        for (int r = 0; r < 4; ++r) {
                            lo[r] += signed_alpha_f32(ylo << (3 - r), al_i);
                            hi[r] += signed_alpha_f32(yhi << (3 - r), al_i);
                        }
                    }
#pragma unroll
                    for (int r = 0; r < 4; ++r) b[nt][r] = Pair<T>::pack(lo[r], hi[r]);
                }
            } else
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int col = wn * 32 + nt * 8 + g;
                uint32_t sum[4] = {0, 0, 0, 0};
                // smallest α first: the general mode's rounding stays at the scale of the sum
                for (int i = bits - 1; i >= 0; --i) {
                    const uint32_t word = ps[(kw * bits + i) * MMA_BN + col];
                    const uint32_t al_i = al[i * MMA_BN + col];
                    const uint32_t y = word << (12 - 4 * t);  // bits 4t+3, 4t+19 → 15, 31
                    sum[3] = add2<T>(sum[3], signed_alpha(y, al_i));
                    sum[2] = add2<T>(sum[2], signed_alpha(y << 1, al_i));
                    sum[1] = add2<T>(sum[1], signed_alpha(y << 2, al_i));
                    sum[0] = add2<T>(sum[0], signed_alpha(y << 3, al_i));
                }
                const uint32_t scale = al[bits * MMA_BN + col], z = al[(bits + 1) * MMA_BN + col];
#pragma unroll
                for (int r = 0; r < 4; ++r) b[nt][r] = fma2<T>(sum[r], scale, z);
            }
#pragma unroll
            for (int s16 = 0; s16 < 2; ++s16) {
#pragma unroll
                for (int mt = 0; mt < Cfg::M_TILES; ++mt) {
                    const int r = wm * 64 + mt * 16 + (lane & 15);
                    const int ch = kw * 4 + s16 * 2 + (lane >> 4);
                    uint32_t af[4];
                    ldmatrix_x4(af, xs + r * 64 + ((ch ^ (r & 7)) * 8));
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt)
                        mma16816<T>(acc[mt][nt], af, b[nt][2 * s16], b[nt][2 * s16 + 1]);
                }
            }
        }
    }
    cp_async_wait<0>();

    const T *bias = (const T *)a.bias;
    T *out = (T *)a.out;
    if (gridDim.z > 1) {
#pragma unroll
        for (int mt = 0; mt < Cfg::M_TILES; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int64_t r = m0 + wm * 64 + mt * 16 + g + 8 * h;
                    const int64_t c = n0 + wn * 32 + nt * 8 + 2 * t;
                    if (r < a.m && c < a.n_pad)
                        atomic_add2(a.acc + r * a.n_pad + c, acc[mt][nt][2 * h],
                                    acc[mt][nt][2 * h + 1]);
                }
        if (!last_block_of_tile(a.counters + blockIdx.y * gridDim.x + blockIdx.x, gridDim.z))
            return;
        for (int e = tid; e < BM * MMA_BN; e += Cfg::THREADS) {
            const int64_t r = m0 + e / MMA_BN, c = n0 + e % MMA_BN;
            if (r >= a.m || c >= a.n) continue;
            const float v = __ldcg(a.acc + r * a.n_pad + c) + (bias ? (float)bias[c] : 0.0f);
            out[r * a.ldo + c] = (T)v;
        }
        return;
    }
#pragma unroll
    for (int mt = 0; mt < Cfg::M_TILES; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int64_t r = m0 + wm * 64 + mt * 16 + g + 8 * (e >> 1);
                const int64_t c = n0 + wn * 32 + nt * 8 + 2 * t + (e & 1);
                if (r < a.m && c < a.n)
                    out[r * a.ldo + c] = (T)(acc[mt][nt][e] + (bias ? (float)bias[c] : 0.0f));
            }
}

template <typename T, int BM>
cudaError_t launch(const MmaArgs &a, dim3 grid, cudaStream_t stream) {
    const int smem = mma_smem_bytes(BM, a.bits, a.nm, a.meta_type == LF_SCALAR_F32 ? 4 : 2);
    if (smem > 48 * 1024) {
        cudaError_t err = cudaFuncSetAttribute(
            mma_kernel<T, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (err != cudaSuccess) return err;
    }
    mma_kernel<T, BM><<<grid, MmaConfig<T, BM>::THREADS, smem, stream>>>(a);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bm(int bm, const MmaArgs &a, dim3 grid, cudaStream_t stream) {
    switch (bm) {
    case 16: return launch<T, 16>(a, grid, stream);
    case 64: return launch<T, 64>(a, grid, stream);
    default: return launch<T, 128>(a, grid, stream);
    }
}

}  // namespace

cudaError_t lutgemm_mma_launch(int x_type, int bm, const MmaArgs &a, dim3 grid,
                               cudaStream_t stream) {
    return x_type == LF_SCALAR_F16 ? launch_bm<__half>(bm, a, grid, stream)
                                   : launch_bm<__nv_bfloat16>(bm, a, grid, stream);
}

cudaError_t lutgemm_permute_x(const void *x, int64_t ldx, uint16_t *xp, int64_t m, int64_t m_pad,
                              int64_t k, int64_t k_pad, cudaStream_t stream) {
    const int64_t blocks = (m_pad * k_pad / 8 + 255) / 256;
    permute_x_kernel<<<(unsigned)(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(
        (const uint16_t *)x, ldx, xp, m, m_pad, k, k_pad);
    return cudaGetLastError();
}
