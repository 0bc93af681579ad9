/*
 * Stand-in for TVM's <tvm/support/serializer.h>, included but not shipped by the apache-tvm
 * wheel's <tvm/runtime/tensor.h>, which uses nothing from it (see io.h beside it).
 */
#ifndef TVM_SMARTMEM_SHIM_TVM_SUPPORT_SERIALIZER_H_
#define TVM_SMARTMEM_SHIM_TVM_SUPPORT_SERIALIZER_H_

#include <tvm/support/io.h>

#endif  // TVM_SMARTMEM_SHIM_TVM_SUPPORT_SERIALIZER_H_
