#ifndef LUTFLASH_LUTGEMM_CPU_H
#define LUTFLASH_LUTGEMM_CPU_H

#include "bcq_format.h"

/* Workspace bytes lutgemm_cpu needs: the tables of activation partial sums. */
int64_t lutgemm_cpu_workspace_bytes(const lutgemm_params *p);
/* out = x · Ŵᵀ (+ bias), arguments already validated. `variant` picks the inner loop:
 * 0 = best the CPU supports, 1 = portable C, 2 = AVX2, 3 = AVX-512. */
void lutgemm_cpu(const lutgemm_params *p, int variant);
/* The variant that 0 resolves to on this CPU. */
int lutgemm_cpu_best_variant(void);
/* The instruction set of the inner loop that `variant` runs: "portable", "avx2" or "avx512"
 * (what lutgemm_cpu dispatches to, for tests that must not pass on a silent fallback). */
const char *lutgemm_cpu_variant_isa(int variant);

#endif
