/* The method tables that make up lutflash._C, one per concept file. */
#ifndef LUTFLASH_METHODS_H
#define LUTFLASH_METHODS_H

#include <Python.h>

extern PyMethodDef lutgemm_methods[];      /* lutgemm.c */
extern PyMethodDef bcq_quantize_methods[]; /* bcq_quantize.c */
extern PyMethodDef runtime_methods[];      /* runtime.c */
extern PyMethodDef attention_methods[];    /* attention.c */
extern PyMethodDef attention_kvcache_methods[]; /* attention_kvcache.c */
extern PyMethodDef decode_ops_methods[];   /* decode_ops.c */

#endif
