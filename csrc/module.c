/* lutflash._C: the module object, assembled from each concept file's method table. */
#include "tensor_arg.h"

#include "bcq_format.h"
#include "methods.h"

static PyMethodDef *const method_tables[] = {
    lutgemm_methods,
    bcq_quantize_methods,
    runtime_methods,
    attention_methods,
    attention_kvcache_methods,
    decode_ops_methods,
};

static struct PyModuleDef lutflash_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "lutflash._C",
    .m_doc = "lutflash's C and CUDA kernels. Use the Python API in lutflash instead.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__C(void) {
    PyObject *module = PyModule_Create(&lutflash_module);
    if (module == NULL) return NULL;
    for (size_t i = 0; i < sizeof(method_tables) / sizeof(method_tables[0]); ++i) {
        if (PyModule_AddFunctions(module, method_tables[i]) < 0) goto fail;
    }
    if (PyModule_AddIntConstant(module, "BCQ_FORMAT_VERSION", BCQ_FORMAT_VERSION) < 0 ||
        PyModule_AddIntConstant(module, "BCQ_MAX_BITS", BCQ_MAX_BITS) < 0 ||
        PyModule_AddIntConstant(module, "BCQ_WORD_K", BCQ_WORD_K) < 0 ||
        PyModule_AddIntConstant(module, "BCQ_ROW_PAD", BCQ_ROW_PAD) < 0)
        goto fail;
    return module;
fail:
    Py_DECREF(module);
    return NULL;
}
