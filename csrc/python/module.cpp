// mpq._C: an empty CPython module. Importing it makes the dynamic loader load libmpq_ops.so
// (a DT_NEEDED entry of this module), whose static initialisers register the mpq ops.
#include <Python.h>

static PyModuleDef mpq_c_module = {PyModuleDef_HEAD_INIT, "_C", "Loads libmpq_ops.so, which registers torch.ops.mpq.",
                                   -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mpq_c_module); }
