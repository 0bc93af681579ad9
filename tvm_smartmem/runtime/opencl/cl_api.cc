/*
 * Run-time binding of the OpenCL ICD loader: dlopen, then dlsym of every entry point listed in
 * cl_api.h.  Nothing here links against OpenCL, so the library loads (and reports "no device")
 * on machines that have no OpenCL at all.
 */
#include "cl_api.h"

#include <dlfcn.h>

#include <cstdlib>
#include <sstream>
#include <vector>

namespace tvm_smartmem {
namespace cl {

namespace {

std::vector<std::string> CandidateLibraries() {
  std::vector<std::string> out;
  // The Python side sets this to the loader it chose (system, or the one bundled with pyopencl).
  if (const char* env = std::getenv("TVM_SMARTMEM_OPENCL_LIB")) {
    if (*env) out.emplace_back(env);
  }
  out.emplace_back("libOpenCL.so.1");
  out.emplace_back("libOpenCL.so");
  return out;
}

Api LoadApi() {
  Api api;
  void* handle = nullptr;
  std::ostringstream tried;
  for (const std::string& name : CandidateLibraries()) {
    handle = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) {
      api.library = name;
      break;
    }
    tried << (tried.tellp() > 0 ? ", " : "") << name;
  }
  if (handle == nullptr) {
    api.error = "no OpenCL ICD loader could be opened (tried " + tried.str() + ")";
    return api;
  }
  std::ostringstream missing;
#define TVM_SMARTMEM_CL_RESOLVE(name, ret, args)                          \
  api.name = reinterpret_cast<ret(*) args>(dlsym(handle, #name));        \
  if (api.name == nullptr) missing << (missing.tellp() > 0 ? ", " : "") << #name;
  TVM_SMARTMEM_CL_FUNCTIONS(TVM_SMARTMEM_CL_RESOLVE)
#undef TVM_SMARTMEM_CL_RESOLVE
  if (missing.tellp() > 0) {
    api.error = "OpenCL loader " + api.library + " lacks: " + missing.str();
  }
  // The handle stays open for the life of the process: kernels and buffers outlive any scope.
  return api;
}

}  // namespace

const Api& Api::Get() {
  static const Api api = LoadApi();
  return api;
}

std::string ErrorName(cl_int code) {
  const char* name = nullptr;
  switch (code) {
    case 0: name = "CL_SUCCESS"; break;
    case -1: name = "CL_DEVICE_NOT_FOUND"; break;
    case -2: name = "CL_DEVICE_NOT_AVAILABLE"; break;
    case -3: name = "CL_COMPILER_NOT_AVAILABLE"; break;
    case -4: name = "CL_MEM_OBJECT_ALLOCATION_FAILURE"; break;
    case -5: name = "CL_OUT_OF_RESOURCES"; break;
    case -6: name = "CL_OUT_OF_HOST_MEMORY"; break;
    case -7: name = "CL_PROFILING_INFO_NOT_AVAILABLE"; break;
    case -10: name = "CL_IMAGE_FORMAT_NOT_SUPPORTED"; break;
    case -11: name = "CL_BUILD_PROGRAM_FAILURE"; break;
    case -30: name = "CL_INVALID_VALUE"; break;
    case -33: name = "CL_INVALID_DEVICE"; break;
    case -34: name = "CL_INVALID_CONTEXT"; break;
    case -36: name = "CL_INVALID_COMMAND_QUEUE"; break;
    case -38: name = "CL_INVALID_MEM_OBJECT"; break;
    case -39: name = "CL_INVALID_IMAGE_FORMAT_DESCRIPTOR"; break;
    case -40: name = "CL_INVALID_IMAGE_SIZE"; break;
    case -44: name = "CL_INVALID_PROGRAM"; break;
    case -45: name = "CL_INVALID_PROGRAM_EXECUTABLE"; break;
    case -46: name = "CL_INVALID_KERNEL_NAME"; break;
    case -48: name = "CL_INVALID_KERNEL"; break;
    case -49: name = "CL_INVALID_ARG_INDEX"; break;
    case -50: name = "CL_INVALID_ARG_VALUE"; break;
    case -51: name = "CL_INVALID_ARG_SIZE"; break;
    case -52: name = "CL_INVALID_KERNEL_ARGS"; break;
    case -53: name = "CL_INVALID_WORK_DIMENSION"; break;
    case -54: name = "CL_INVALID_WORK_GROUP_SIZE"; break;
    case -55: name = "CL_INVALID_WORK_ITEM_SIZE"; break;
    case -56: name = "CL_INVALID_GLOBAL_OFFSET"; break;
    case -61: name = "CL_INVALID_BUFFER_SIZE"; break;
    case -63: name = "CL_INVALID_GLOBAL_WORK_SIZE"; break;
    case -1001: name = "CL_PLATFORM_NOT_FOUND_KHR"; break;
    default: break;
  }
  std::ostringstream os;
  os << (name ? name : "CL_ERROR") << " (" << code << ")";
  return os.str();
}

}  // namespace cl
}  // namespace tvm_smartmem
