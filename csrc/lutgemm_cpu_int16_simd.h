/* The body of lutgemm_int16_word_<isa>, included once per instruction set by
 * lutgemm_cpu_int16.c with these defined (AVX-512 is AVX2 with 64-byte vectors):
 *   LF_ISA(name)            name##_<isa>         LF_TARGET   the target attribute
 *   lf_vec                  the integer vector   LF_OP(op)   _mm<bits>_##op
 *   LF_VEC_BYTES            bytes of a vector    lf_loadu, lf_storeu, lf_and, lf_zero
 *   lf_broadcast128(p)      16 bytes at p in every 128-bit lane
 *   lf_even_qwords_first(v) the 64-bit halves 0 of every lane, then the halves 1
 *   lf_widen_lo/hi(v)       the low/high half's int16 sign-extended to int32
 *
 * A step takes 4 vectors of words (4 x LF_VEC_BYTES / 4 rows) and transposes their bytes
 * within 128-bit lanes, so that vector j holds byte j (runs 2j, 2j+1) of every row: in lane L,
 * byte 4q + s is row q·LF_VEC_BYTES/4 + 4L + s. Each nibble vector then indexes one run's
 * table (vpshufb looks up 16 bytes per lane, the same table in every lane); the low and high
 * bytes of the entries interleave into int16 (rows of q = 0, 1 in one vector, q = 2, 3 in the
 * other), summed over the word's 8 runs and widened to int32 in row order. */

#define LF_STEP_ROWS LF_VEC_BYTES

LF_TARGET static inline void LF_ISA(add_widened)(int32_t *sum, lf_vec word_sums) {
    const lf_vec rows = lf_even_qwords_first(word_sums);
    lf_storeu(sum, LF_OP(add_epi32)(lf_loadu(sum), lf_widen_lo(rows)));
    lf_storeu(sum + LF_STEP_ROWS / 4,
              LF_OP(add_epi32)(lf_loadu(sum + LF_STEP_ROWS / 4), lf_widen_hi(rows)));
}

LF_TARGET void LF_ISA(lutgemm_int16_word)(const uint32_t *restrict words, int64_t rows,
                                          const uint8_t *restrict tables, int64_t table_stride,
                                          int64_t xs, int32_t *restrict sums,
                                          int64_t sums_stride, const uint32_t *next) {
    const lf_vec nibble = LF_OP(set1_epi8)(0x0f);
    const lf_vec gather_bytes = lf_broadcast128(lf_byte_transpose);
    for (int64_t r = 0; r < rows; r += LF_STEP_ROWS) {
        if (next) {
            for (int line = 0; line < LF_STEP_ROWS * 4 && r * 4 + line < rows * 4; line += 64)
                _mm_prefetch((const char *)(next + r) + line, _MM_HINT_T0);
        }
        uint32_t tail[LF_STEP_ROWS];
        const uint32_t *src = words + r;
        if (rows - r < LF_STEP_ROWS) { /* rows past the run are read as 0, their sums unused */
            memset(tail, 0, sizeof(tail));
            memcpy(tail, src, (size_t)(rows - r) * sizeof(uint32_t));
            src = tail;
        }
        lf_vec v[4];
        for (int q = 0; q < 4; ++q)
            v[q] = LF_OP(shuffle_epi8)(lf_loadu(src + q * LF_STEP_ROWS / 4), gather_bytes);
        const lf_vec lo01 = LF_OP(unpacklo_epi32)(v[0], v[1]), hi01 = LF_OP(unpackhi_epi32)(v[0], v[1]);
        const lf_vec lo23 = LF_OP(unpacklo_epi32)(v[2], v[3]), hi23 = LF_OP(unpackhi_epi32)(v[2], v[3]);
        const lf_vec byte[4] = {LF_OP(unpacklo_epi64)(lo01, lo23), LF_OP(unpackhi_epi64)(lo01, lo23),
                                LF_OP(unpacklo_epi64)(hi01, hi23), LF_OP(unpackhi_epi64)(hi01, hi23)};
        lf_vec index[LF_CHUNKS_PER_WORD];
        for (int j = 0; j < 4; ++j) {
            index[2 * j] = lf_and(byte[j], nibble);
            index[2 * j + 1] = lf_and(LF_OP(srli_epi16)(byte[j], 4), nibble);
        }
        for (int64_t i = 0; i < xs; ++i) {
            const uint8_t *table = tables + i * table_stride;
            lf_vec rows01 = lf_zero(), rows23 = lf_zero();
            for (int c = 0; c < LF_CHUNKS_PER_WORD; ++c) {
                const lf_vec lo = LF_OP(shuffle_epi8)(lf_broadcast128(table + 32 * c), index[c]);
                const lf_vec hi = LF_OP(shuffle_epi8)(lf_broadcast128(table + 32 * c + 16), index[c]);
                rows01 = LF_OP(add_epi16)(rows01, LF_OP(unpacklo_epi8)(lo, hi));
                rows23 = LF_OP(add_epi16)(rows23, LF_OP(unpackhi_epi8)(lo, hi));
            }
            int32_t *sum = sums + i * sums_stride + r;
            LF_ISA(add_widened)(sum, rows01);
            LF_ISA(add_widened)(sum + LF_STEP_ROWS / 2, rows23);
        }
    }
}

#undef LF_STEP_ROWS
