// The Python extension module token_recycling._C. It holds no functions: importing it loads this
// shared library, whose static initialisers register torch.ops.token_recycling.*.
#include <Python.h>

#ifndef TOKEN_RECYCLING_TORCH_VERSION
#define TOKEN_RECYCLING_TORCH_VERSION "unknown"
#endif
#ifndef TOKEN_RECYCLING_WITH_CUDA
#define TOKEN_RECYCLING_WITH_CUDA 0
#endif

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "token_recycling native ops (registered with torch.library)",
                                 -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "built_with_torch", TOKEN_RECYCLING_TORCH_VERSION);
  PyModule_AddIntConstant(m, "with_cuda", TOKEN_RECYCLING_WITH_CUDA);
  return m;
}
