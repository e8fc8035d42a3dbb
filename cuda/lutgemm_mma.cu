/* LUT-GEMM, the prefill path: tensor cores (mma.sync m16n8k16, ldmatrix, a cp.async ring).
 * x is first copied to the workspace with each 32-k word's columns permuted (permute_x_kernel)
 * so that the 8 weights a thread needs for its mma B fragments come from bits (p, p + 16) of a
 * plane word: one shift brings a pair to the sign bits of a half2 and one lop3 turns it into
 * (±α, ±α). The weight tile is dequantized in registers and never written anywhere. */
#include "device.cuh"
#include "lutgemm_cuda.cuh"
#include "ptx.cuh"

namespace {

/* Column permutation inside each 32-k word. Logical column L = 16s + 8r + 2t + e (k16 step s,
 * B register r, thread-in-group t, half e of the mma fragment) holds physical column
 * 4t + 2s + r + 16e, so thread t finds its pairs at bits (p, p + 16), p = 4t + 2s + r. */
__global__ void permute_x_kernel(const uint16_t *__restrict__ x, int64_t ldx,
                                 uint16_t *__restrict__ xp, int64_t m, int64_t m_pad, int64_t k,
                                 int64_t k_pad, uint4 *__restrict__ zero, int64_t zero_n) {
    // The split-k workspace (counters, fp32 sums), zeroed here rather than by a memset launch
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < zero_n;
         i += (int64_t)gridDim.x * blockDim.x)
        zero[i] = make_uint4(0, 0, 0, 0);
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


/* (~bits & 0x80008000) ^ alpha: the two sign bits of `bits` pick +α or -α per half. */
__device__ __forceinline__ uint32_t signed_alpha(uint32_t bits, uint32_t alpha) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xA6;\n" : "=r"(r) : "r"(bits), "r"(0x80008000u), "r"(alpha));
    return r;
}

/* ±α in fp32: bit 31 of `bits` set gives +α, clear gives -α (α as float bits). */
__device__ __forceinline__ float signed_alpha_f32(uint32_t bits, uint32_t alpha) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xA6;\n" : "=r"(r) : "r"(bits), "r"(0x80000000u), "r"(alpha));
    return __uint_as_float(r);
}

/* Pair arithmetic on the 32-bit registers that hold pairs of T. */
template <typename T> using T2 = typename lf::Pair<T>::T2;
template <typename T> __device__ __forceinline__ T2<T> as_pair(uint32_t v) { return *(T2<T> *)&v; }
template <typename T> __device__ __forceinline__ uint32_t as_bits(T2<T> v) { return *(uint32_t *)&v; }
template <typename T> __device__ __forceinline__ uint32_t add2(uint32_t a, uint32_t b) {
    return as_bits<T>(__hadd2(as_pair<T>(a), as_pair<T>(b)));
}
template <typename T> __device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    return as_bits<T>(__hsub2(as_pair<T>(a), as_pair<T>(b)));
}
template <typename T> __device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    return as_bits<T>(__hfma2(as_pair<T>(a), as_pair<T>(b), as_pair<T>(c)));
}

/* ---------------------------------------------------------------------------------------- */
/* The kernel: one __syncthreads per k-stage, metadata converted once per group, compile-time */
/* bits and mode, no divisions in the main loop.                                              */
/* ---------------------------------------------------------------------------------------- */
/* The CTA is 8 warps side by side along n; each warp owns 32 weight rows (output columns) and
 * all BM activation rows, so a weight is dequantized once per CTA and feeds BM / 16 mmas. Per
 * stage (2 words = 64 k) a cp.async ring brings the x tile, the plane words and, for the
 * words that open a group, the raw metadata. Within a warp, B-fragment column g of n-tile nt
 * is weight row 4g + nt: a thread's 4 n-tiles are 4 consecutive rows, one LDS.128 per plane
 * word, and its outputs are runs of 4 consecutive columns (float4 atomics when k is split).
 * MMA_BN, MMA_WORDS and MMA_STAGES are in lutgemm_cuda.cuh (the plan uses them too). */
constexpr int MMA_WARPS = 8, MMA_THREADS = 32 * MMA_WARPS;
static_assert(MMA_BN == 32 * MMA_WARPS, "a warp owns 32 weight rows");
constexpr unsigned MMA_GROUP_M = 8;      // m-tiles per block-order group (L2 reuse)
constexpr int SM80_MAX_SMEM = 163 * 1024;  // dynamic shared memory of a block on an A100

template <int BITS, bool GENERAL>
struct MmaShape {
    static constexpr int NM = GENERAL ? BITS + 1 : 2;  // metadata rows per group
    static __host__ __device__ constexpr int x_bytes(int bm) { return bm * 32 * MMA_WORDS * 2; }
    static constexpr int PLANE_BYTES = MMA_WORDS * BITS * MMA_BN * 4;
    static __host__ __device__ constexpr int stage_bytes(int bm, int meta_size) {
        return x_bytes(bm) + PLANE_BYTES + MMA_WORDS * NM * MMA_BN * meta_size;
    }
    /* MMA_STAGES, or 3 where that many stages of the largest tile (BM = 128, fp32 metadata)
     * would not fit an A100: general mode with 6..8 bits. */
    static constexpr int STAGES = MMA_STAGES * stage_bytes(128, 4) <= SM80_MAX_SMEM ? MMA_STAGES : 3;
    static __host__ __device__ constexpr int smem_bytes(int bm, int meta_size) {
        return STAGES * stage_bytes(bm, meta_size);
    }
};

template <int BM>
struct MmaCfg {
    static constexpr int M_TILES = BM / 16;
    static constexpr int MIN_BLOCKS = BM >= 64 ? 1 : 2;  // ≤ 128 registers spills at BM = 64
};

/* Uniform mode's integer codes as floating point numbers (see mma_kernel): for r = 1..3,
 * magic(r) is the broadcast pair 2^E_r with E_r = (mantissa bits) − r, so that mantissa bit
 * r + i is worth 2^i and magic(r) | (c << r) is exactly 2^E_r + c for a code c < 2^4;
 * offset(r, q) = 2^E_r + (2^q − 1)/2, exact since the unit of 2^E_r is 2^−r ≤ 1/2.
 * pow2(e): the broadcast pair 2^e. */
template <typename T> struct CodeMagic;
template <> struct CodeMagic<__half> {  // 10 mantissa bits, exponent bias 15
    static __host__ __device__ constexpr uint32_t pow2(int e) { return (uint32_t)((15 + e) << 10) * 0x10001u; }
    static __host__ __device__ constexpr uint32_t magic(int r) { return (uint32_t)((25 - r) << 10) * 0x10001u; }
    static __host__ __device__ constexpr uint32_t offset(int r, int q) {
        return magic(r) + (uint32_t)(((1 << q) - 1) << (r - 1)) * 0x10001u;
    }
};
template <> struct CodeMagic<__nv_bfloat16> {  // 7 mantissa bits, exponent bias 127
    static __host__ __device__ constexpr uint32_t pow2(int e) { return (uint32_t)((127 + e) << 7) * 0x10001u; }
    static __host__ __device__ constexpr uint32_t magic(int r) { return (uint32_t)((134 - r) << 7) * 0x10001u; }
    static __host__ __device__ constexpr uint32_t offset(int r, int q) {
        return magic(r) + (uint32_t)(((1 << q) - 1) << (r - 1)) * 0x10001u;
    }
};

/* Plane i of weight row nt (a thread's rows: pw[i], one word per row) rotated right by 4t − i:
 * the pair bits 4t + r, 4t + 16 + r land at r + i, r + i + 16. */
template <int BITS>
__device__ __forceinline__ void rotate_planes(const uint4 (&pw)[BITS], int nt, int t,
                                              uint32_t (&z)[BITS]) {
#pragma unroll
    for (int i = 0; i < BITS; ++i) z[i] = __funnelshift_r((&pw[i].x)[nt], (&pw[i].x)[nt], 4 * t - i);
}
/* The codes of pair r from rotate_planes' words: bits r .. r + q − 1 of each half. */
template <int BITS> __device__ __forceinline__ uint32_t pair_code(const uint32_t (&z)[BITS], int r) {
    uint32_t c = 0;
#pragma unroll
    for (int i = 0; i < BITS; ++i) c |= z[i] & (0x00010001u << (r + i));
    return c;
}

template <typename T, int BITS, bool GENERAL, int BM>
__global__ void __launch_bounds__(MMA_THREADS, MmaCfg<BM>::MIN_BLOCKS) mma_kernel(MmaArgs a) {
    using Shape = MmaShape<BITS, GENERAL>;
    constexpr int NM = Shape::NM, M_TILES = MmaCfg<BM>::M_TILES, STAGES = Shape::STAGES;
    // General mode with ≤ 3 planes: a weight is a function of its code c (≤ 8 values per row
    // and group), looked up with byte permutes in a table of the 8 rounded values (see below).
    constexpr bool CODE_TABLE = GENERAL && BITS <= 3;
    extern __shared__ uint4 mma_smem[];
    unsigned char *smem = (unsigned char *)mma_smem;
    const int meta_size = a.meta_type == LF_SCALAR_F32 ? 4 : 2;
    const int stage_bytes = Shape::stage_bytes(BM, meta_size);
    const int x_bytes = Shape::x_bytes(BM);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    // Tiles in groups of MMA_GROUP_M m-tiles: consecutive blocks sweep n inside a group, so a
    // wave reuses a few x tiles and a few weight tiles from L2 (large m).
    const unsigned tile = blockIdx.y * gridDim.x + blockIdx.x;
    const unsigned per_group = MMA_GROUP_M * gridDim.x, first_m = tile / per_group * MMA_GROUP_M;
    const unsigned group_m = min(MMA_GROUP_M, gridDim.y - first_m), in_group = tile % per_group;
    const int64_t n0 = (int64_t)(in_group / group_m) * MMA_BN;
    const int64_t m0 = (int64_t)(first_m + in_group % group_m) * BM;
    const int w_begin = blockIdx.z * a.words_per_split;
    const int w_end = min(a.words, w_begin + a.words_per_split);
    const int stages = (w_end - w_begin + MMA_WORDS - 1) / MMA_WORDS;
    // words per group: g is a multiple of 32, or g = k (one group)
    const int wpg = a.group_size % 32 == 0 ? a.group_size / 32 : a.words;

    auto load_stage = [&](int s) {
        unsigned char *base = smem + (s % STAGES) * stage_bytes;
        const int w0 = w_begin + s * MMA_WORDS;
        // x: BM rows × 8 chunks of 16 bytes, chunk index swizzled by the row (ldmatrix)
        uint16_t *xs = (uint16_t *)base;
#pragma unroll
        for (int c0 = 0; c0 < BM * 8; c0 += MMA_THREADS) {
            const int c = c0 + tid;
            if (BM * 8 % MMA_THREADS == 0 || c < BM * 8) {
                const int r = c >> 3, ch = c & 7;
                const bool valid = w0 + (ch >> 2) < w_end;
                const uint16_t *src = a.xp + (m0 + r) * a.k_pad + (int64_t)w0 * 32 + ch * 8;
                lf::cp_async16(xs + r * 64 + ((ch ^ (r & 7)) * 8), valid ? src : a.xp, valid);
            }
        }
        // plane words: MMA_WORDS × BITS rows (word-major, as in memory) × MMA_BN words
        uint32_t *ps = (uint32_t *)(base + x_bytes);
        constexpr int P_CHUNKS = MMA_WORDS * BITS * (MMA_BN / 4);
#pragma unroll
        for (int c0 = 0; c0 < P_CHUNKS; c0 += MMA_THREADS) {
            const int c = c0 + tid;
            if (P_CHUNKS % MMA_THREADS == 0 || c < P_CHUNKS) {
                const int wi = c / (MMA_BN / 4), ch = c % (MMA_BN / 4);
                const int64_t rr = n0 + ch * 4;
                const bool valid = w0 + wi / BITS < w_end && rr < a.n_pad;
                const uint32_t *src = a.planes + ((int64_t)w0 * BITS + wi) * a.n_pad + rr;
                lf::cp_async16(ps + wi * MMA_BN + ch * 4, valid ? src : a.planes, valid);
            }
        }
        // raw metadata, only for the words whose group differs from the previous word's
        unsigned char *ms = base + x_bytes + Shape::PLANE_BYTES;
        const int chunks = MMA_BN * meta_size / 16;  // per metadata row
#pragma unroll
        for (int kw = 0; kw < MMA_WORDS; ++kw) {
            const int w = w0 + kw;
            if (w >= w_end || (w != w_begin && w % wpg != 0)) continue;
            const int64_t grp = w / wpg;
            for (int c = tid; c < NM * chunks; c += MMA_THREADS) {
                const int j = c / chunks, ch = c - j * chunks;
                const int64_t rr = n0 + ch * 16 / meta_size;
                const bool valid = rr < a.n_pad;
                const unsigned char *src =
                    (const unsigned char *)a.meta + ((grp * NM + j) * a.n_pad + rr) * meta_size;
                lf::cp_async16(ms + (kw * NM + j) * MMA_BN * meta_size + ch * 16,
                           valid ? src : a.meta, valid);
            }
        }
    };

    float acc[M_TILES][4][4];
#pragma unroll
    for (int i = 0; i < M_TILES; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // The current group's metadata for this thread's 4 weight rows (converted once per group):
    // uniform: s / 2 and z as broadcast pairs of T; general: α_i and z in fp32.
    uint32_t scale2[4], zpair[4];  // uniform: s (not s / 2) and z pairs
    float alf[GENERAL && !CODE_TABLE ? BITS : 1][4], zf[4];
    // CODE_TABLE: per row, the low bytes of the table's values 0..3 and 4..7, then the high bytes
    uint32_t tab[CODE_TABLE ? 4 : 1][4];
    const int row0 = warp * 32 + 4 * g;  // this thread's first weight row in the CTA tile

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < stages) load_stage(s);
        lf::cp_async_commit();
    }
    int wig = w_begin % wpg;  // word index inside its group
    for (int s = 0; s < stages; ++s) {
        lf::cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage s landed; everyone is done with stage s - 1's buffer
        if (s + STAGES - 1 < stages) load_stage(s + STAGES - 1);
        lf::cp_async_commit();

        const unsigned char *base = smem + (s % STAGES) * stage_bytes;
        const uint16_t *xs = (const uint16_t *)base;
        const uint32_t *ps = (const uint32_t *)(base + x_bytes);
        const unsigned char *ms = base + x_bytes + Shape::PLANE_BYTES;
        const int w0 = w_begin + s * MMA_WORDS;
#pragma unroll
        for (int kw = 0; kw < MMA_WORDS; ++kw) {
            if (w0 + kw >= w_end) break;
            if (w0 + kw == w_begin || wig == 0) {  // a new group: its metadata is in slot kw
                const unsigned char *raw = ms + kw * NM * MMA_BN * meta_size;
                auto entry = [&](int j, int nt) {
                    const int idx = j * MMA_BN + row0 + nt;
                    if (a.meta_type == LF_SCALAR_F32) return ((const float *)raw)[idx];
                    const uint16_t h = ((const uint16_t *)raw)[idx];
                    return a.meta_type == LF_SCALAR_F16 ? __half2float(__ushort_as_half(h))
                                                        : __uint_as_float((uint32_t)h << 16);
                };
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    if constexpr (CODE_TABLE) {
                        // value of code c: z, then ±α_0, ±α_1, ... added in fp32 in plane
                        // order (exactly the sums of the path below), rounded once to T
                        float v[8] = {entry(BITS, nt), 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
                        for (int i = 0; i < BITS; ++i) {
                            const float al = entry(i, nt);
#pragma unroll
                            for (int c = 0; c < (1 << i); ++c)
                                v[c | 1 << i] = v[c] + al, v[c] = v[c] - al;
                        }
                        uint32_t p[4];
#pragma unroll
                        for (int j = 0; j < 4; ++j) p[j] = lf::Pair<T>::pack(v[2 * j], v[2 * j + 1]);
                        tab[0][nt] = __byte_perm(p[0], p[1], 0x6420);  // low bytes of 0..3
                        tab[1][nt] = __byte_perm(p[2], p[3], 0x6420);  // low bytes of 4..7
                        tab[2][nt] = __byte_perm(p[0], p[1], 0x7531);  // high bytes of 0..3
                        tab[3][nt] = __byte_perm(p[2], p[3], 0x7531);  // high bytes of 4..7
                    } else if constexpr (GENERAL) {
#pragma unroll
                        for (int i = 0; i < BITS; ++i) alf[i][nt] = entry(i, nt);
                        zf[nt] = entry(BITS, nt);
                    } else {
                        scale2[nt] = lf::Pair<T>::broadcast(entry(0, nt));
                        zpair[nt] = lf::Pair<T>::broadcast(entry(1, nt));
                    }
                }
            }
            wig = wig + 1 == wpg ? 0 : wig + 1;

            // This thread's plane words: rows row0 .. row0 + 3 (n-tiles 0..3), one LDS.128 each.
            uint4 pw[BITS];
#pragma unroll
            for (int i = 0; i < BITS; ++i)
                pw[i] = *(const uint4 *)(ps + (kw * BITS + i) * MMA_BN + row0);
            uint32_t b[4][4];
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                if constexpr (CODE_TABLE) {
                    // Codes gathered as in the uniform branch (pair r's lo code at bits r ..,
                    // its hi code at 16 + r ..; pair 0 at bits 0 .., 16 ..), moved into
                    // nibbles 0 and 1 of a byte-permute selector: one lookup of the low bytes,
                    // one of the high bytes, one permute to interleave them into the pair.
                    uint32_t z[BITS];
                    rotate_planes<BITS>(pw, nt, t, z);
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        const uint32_t c = pair_code<BITS>(z, r);
                        // r ≥ 1: the high word of c · (2^(32−r) + 2^(20−r)) is c >> r with
                        // c >> (r + 12) added (disjoint bits): lo code at 0, hi code at 4
                        const uint32_t sel =
                            r == 0 ? c | c >> 12 : __umulhi(c, (1u << ((32 - r) & 31)) | (1u << (20 - r)));
                        const uint32_t lo = __byte_perm(tab[0][nt], tab[1][nt], sel);
                        const uint32_t hi = __byte_perm(tab[2][nt], tab[3][nt], sel);
                        b[nt][r] = __byte_perm(lo, hi, 0x5140);
                    }
                } else if constexpr (GENERAL) {
                    // Σ_i ±α_i + z in fp32, rounded once to T: partial sums of arbitrary α would
                    // round at every add in T (error well above dequantize-then-round).
                    float lo[4] = {zf[nt], zf[nt], zf[nt], zf[nt]};
                    float hi[4] = {zf[nt], zf[nt], zf[nt], zf[nt]};
#pragma unroll
                    for (int i = 0; i < BITS; ++i) {
                        const uint32_t word = (&pw[i].x)[nt];
                        const uint32_t al_i = __float_as_uint(alf[i][nt]);
                        const uint32_t ylo = word << (28 - 4 * t), yhi = word << (12 - 4 * t);
#pragma unroll
                        for (int r = 0; r < 4; ++r) {
                            lo[r] += signed_alpha_f32(ylo << (3 - r), al_i);
                            hi[r] += signed_alpha_f32(yhi << (3 - r), al_i);
                        }
                    }
#pragma unroll
                    for (int r = 0; r < 4; ++r) b[nt][r] = lf::Pair<T>::pack(lo[r], hi[r]);
                } else if constexpr (BITS > 4) {
                    // The code does not fit the magic number's mantissa (7 bits in bf16):
                    // Σ_i ±2^(i−1) = c − (2^q − 1)/2 added in T, exactly (halves of integers,
                    // |sum| ≤ 127.5: 8 significant bits), then the same single-rounding fma.
                    const uint32_t y = (&pw[0].x)[nt] << (12 - 4 * t);
                    uint32_t sum[4];
#pragma unroll
                    for (int r = 0; r < 4; ++r)  // bits 4t + r, 4t + 16 + r → 15, 31
                        sum[r] = signed_alpha(y << (3 - r), CodeMagic<T>::pow2(-1));
#pragma unroll
                    for (int i = 1; i < BITS; ++i) {
                        const uint32_t yi = (&pw[i].x)[nt] << (12 - 4 * t);
#pragma unroll
                        for (int r = 0; r < 4; ++r)
                            sum[r] = add2<T>(sum[r], signed_alpha(yi << (3 - r), CodeMagic<T>::pow2(i - 1)));
                    }
#pragma unroll
                    for (int r = 0; r < 4; ++r) b[nt][r] = fma2<T>(sum[r], scale2[nt], zpair[nt]);
                } else {
                    // The integer code c = Σ_i bit_i 2^i of each weight, gathered straight into
                    // the mantissa of a magic number (CodeMagic): v = 2^E + c exactly, then
                    // Ŵ = s·(c − (2^q − 1)/2) + z = fma(v − K, s, z), K = 2^E + (2^q − 1)/2:
                    // the subtraction is exact, so one rounding as in dequantize-then-round.
                    // Plane i rotated right by 4t − i puts the pair bits 4t + r, 4t + 16 + r
                    // at r + i, r + i + 16: the code of pair r sits at bits r .. r + q − 1 of
                    // each half, and pair r's magic has its unit at mantissa bit r (r ≥ 1).
                    // Pair 0 (unit at bit 0 would leave no room for K's .5) is shifted up by
                    // one and shares pair 1's magic.
                    uint32_t z[BITS];
                    rotate_planes<BITS>(pw, nt, t, z);
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        uint32_t v = (r == 0 ? 0u : CodeMagic<T>::magic(r)) | pair_code<BITS>(z, r);
                        if (r == 0) v = (v << 1) + CodeMagic<T>::magic(1);  // one LEA
                        b[nt][r] = fma2<T>(sub2<T>(v, CodeMagic<T>::offset(r == 0 ? 1 : r, BITS)),
                                           scale2[nt], zpair[nt]);
                    }
                }
            }
#pragma unroll
            for (int s16 = 0; s16 < 2; ++s16) {
#pragma unroll
                for (int mt = 0; mt < M_TILES; ++mt) {
                    const int r = mt * 16 + (lane & 15);
                    const int ch = kw * 4 + s16 * 2 + (lane >> 4);
                    uint32_t af[4];
                    lf::ldmatrix_x4(af, xs + r * 64 + ((ch ^ (r & 7)) * 8));
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt)
                        lf::mma_m16n8k16<T>(acc[mt][nt], af, b[nt][2 * s16], b[nt][2 * s16 + 1]);
                }
            }
        }
    }
    lf::cp_async_wait<0>();

    // acc[mt][nt][2h + e]: activation row mt·16 + g + 8h, weight row warp·32 + 8t + 4e + nt
    // (the mma's output column 2t + e of n-tile nt is B column 2t + e → row 4(2t + e) + nt).
    const T *bias = (const T *)a.bias;
    T *out = (T *)a.out;
    const int64_t c_base = n0 + warp * 32 + 8 * t;
    if (gridDim.z > 1) {
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int64_t r = m0 + mt * 16 + g + 8 * h, c = c_base + 4 * e;
                    if (r < a.m && c < a.n_pad)
                        lf::atomic_add4(a.acc + r * a.n_pad + c,
                                    make_float4(acc[mt][0][2 * h + e], acc[mt][1][2 * h + e],
                                                acc[mt][2][2 * h + e], acc[mt][3][2 * h + e]));
                }
        if (!last_block_of_tile(a.counters + tile, gridDim.z)) return;
        for (int e = tid; e < BM * MMA_BN; e += MMA_THREADS) {
            const int64_t r = m0 + e / MMA_BN, c = n0 + e % MMA_BN;
            if (r >= a.m || c >= a.n) continue;
            const float v = __ldcg(a.acc + r * a.n_pad + c) + (bias ? (float)bias[c] : 0.0f);
            out[r * a.ldo + c] = (T)v;
        }
        return;
    }
    float bv[2][4];
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int64_t c = c_base + 4 * e + nt;
            bv[e][nt] = bias && c < a.n ? (float)bias[c] : 0.0f;
        }
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t r = m0 + mt * 16 + g + 8 * h;
            if (r >= a.m) continue;
#pragma unroll
            for (int e = 0; e < 2; ++e)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    const int64_t c = c_base + 4 * e + nt;
                    if (c < a.n) out[r * a.ldo + c] = (T)(acc[mt][nt][2 * h + e] + bv[e][nt]);
                }
        }
}

template <typename T, int BITS, bool GENERAL, int BM>
cudaError_t launch(const MmaArgs &a, dim3 grid, cudaStream_t stream, int *blocks_per_sm) {
    const int smem = MmaShape<BITS, GENERAL>::smem_bytes(BM, a.meta_type == LF_SCALAR_F32 ? 4 : 2);
    constexpr auto kernel = mma_kernel<T, BITS, GENERAL, BM>;
    cudaError_t err = lf::setup_kernel<kernel>(MMA_THREADS, smem, blocks_per_sm);
    if (err != cudaSuccess || blocks_per_sm) return err;  // a query: no launch
    kernel<<<grid, MMA_THREADS, smem, stream>>>(a);
    return cudaGetLastError();
}

template <typename T, int BITS, bool GENERAL>
cudaError_t launch_bm(int bm, const MmaArgs &a, dim3 grid, cudaStream_t stream,
                      int *blocks_per_sm) {
    switch (bm) {
    case 16: return launch<T, BITS, GENERAL, 16>(a, grid, stream, blocks_per_sm);
    case 64: return launch<T, BITS, GENERAL, 64>(a, grid, stream, blocks_per_sm);
    default: return launch<T, BITS, GENERAL, 128>(a, grid, stream, blocks_per_sm);
    }
}

template <typename T, bool GENERAL>
cudaError_t launch_bits(int bm, const MmaArgs &a, dim3 grid, cudaStream_t stream,
                        int *blocks_per_sm) {
    switch (a.bits) {
    case 1: return launch_bm<T, 1, GENERAL>(bm, a, grid, stream, blocks_per_sm);
    case 2: return launch_bm<T, 2, GENERAL>(bm, a, grid, stream, blocks_per_sm);
    case 3: return launch_bm<T, 3, GENERAL>(bm, a, grid, stream, blocks_per_sm);
    case 4: return launch_bm<T, 4, GENERAL>(bm, a, grid, stream, blocks_per_sm);
    case 5: return launch_bm<T, 5, GENERAL>(bm, a, grid, stream, blocks_per_sm);
    case 6: return launch_bm<T, 6, GENERAL>(bm, a, grid, stream, blocks_per_sm);
    case 7: return launch_bm<T, 7, GENERAL>(bm, a, grid, stream, blocks_per_sm);
    case 8: return launch_bm<T, 8, GENERAL>(bm, a, grid, stream, blocks_per_sm);
    default: return cudaErrorInvalidValue;
    }
}

template <typename T>
cudaError_t launch_mode(int bm, const MmaArgs &a, dim3 grid, cudaStream_t stream,
                        int *blocks_per_sm) {
    return a.mode == BCQ_MODE_GENERAL ? launch_bits<T, true>(bm, a, grid, stream, blocks_per_sm)
                                      : launch_bits<T, false>(bm, a, grid, stream, blocks_per_sm);
}

}  // namespace

cudaError_t lutgemm_permute_x(const void *x, int64_t ldx, uint16_t *xp, int64_t m, int64_t m_pad,
                              int64_t k, int64_t k_pad, void *zero, int64_t zero_bytes,
                              cudaStream_t stream) {
    const int64_t items = m_pad * k_pad / 8 > zero_bytes / 16 ? m_pad * k_pad / 8 : zero_bytes / 16;
    const int64_t blocks = (items + 255) / 256;
    permute_x_kernel<<<(unsigned)(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(
        (const uint16_t *)x, ldx, xp, m, m_pad, k, k_pad, (uint4 *)zero, zero_bytes / 16);
    return cudaGetLastError();
}

cudaError_t lutgemm_mma_launch(int x_type, int bm, const MmaArgs &a, dim3 grid,
                               cudaStream_t stream, int *blocks_per_sm) {
    return x_type == LF_SCALAR_F16 ? launch_mode<__half>(bm, a, grid, stream, blocks_per_sm)
                                   : launch_mode<__nv_bfloat16>(bm, a, grid, stream, blocks_per_sm);
}
