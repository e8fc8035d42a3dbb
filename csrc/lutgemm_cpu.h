#ifndef LUTFLASH_LUTGEMM_CPU_H
#define LUTFLASH_LUTGEMM_CPU_H

#include "bcq_format.h"

/* Workspace bytes lutgemm_cpu needs: the tables of activation partial sums. */
int64_t lutgemm_cpu_workspace_bytes(const lutgemm_params *p);
/* Which tables of activation partial sums lutgemm_cpu looks up: float32 (exact) or int16 with
 * a scale per group (relative error about 2^-15 per entry, looked up by byte shuffles); auto
 * is float32 for float32 activations, int16 for float16/bfloat16 ones. */
enum { LUTGEMM_TABLES_AUTO = 0, LUTGEMM_TABLES_FLOAT = 1, LUTGEMM_TABLES_INT16 = 2 };
/* out = x · Ŵᵀ (+ bias), arguments already validated. `variant` picks the inner loop:
 * 0 = best the CPU supports, 1 = portable C, 2 = AVX2, 3 = AVX-512 (with AVX512BW);
 * `tables` one of LUTGEMM_TABLES_*. */
void lutgemm_cpu(const lutgemm_params *p, int variant, int tables);
/* The variant that 0 resolves to on this CPU. */
int lutgemm_cpu_best_variant(void);
/* The instruction set of the inner loop that `variant` runs: "portable", "avx2" or "avx512"
 * (what lutgemm_cpu dispatches to, for tests that must not pass on a silent fallback). */
const char *lutgemm_cpu_variant_isa(int variant);

#endif
