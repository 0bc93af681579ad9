/*
 * The slice of the OpenCL 1.2 / 2.0 C API this runtime uses, declared here so that the library
 * builds without OpenCL headers and links against no OpenCL library: every entry point is looked
 * up at run time (dlopen of an ICD loader, then dlsym).  Values are those of the Khronos spec.
 */
#ifndef TVM_SMARTMEM_RUNTIME_OPENCL_CL_API_H_
#define TVM_SMARTMEM_RUNTIME_OPENCL_CL_API_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace tvm_smartmem {
namespace cl {

using cl_int = int32_t;
using cl_uint = uint32_t;
using cl_ulong = uint64_t;
using cl_bool = cl_uint;
using cl_bitfield = cl_ulong;
using cl_device_type = cl_bitfield;
using cl_platform_info = cl_uint;
using cl_device_info = cl_uint;
using cl_mem_flags = cl_bitfield;
using cl_mem_object_type = cl_uint;
using cl_mem_info = cl_uint;
using cl_image_info = cl_uint;
using cl_program_build_info = cl_uint;
using cl_kernel_work_group_info = cl_uint;
using cl_kernel_arg_info = cl_uint;
using cl_profiling_info = cl_uint;
using cl_command_queue_properties = cl_bitfield;
using cl_queue_properties = cl_bitfield;
using cl_context_properties = intptr_t;
using cl_channel_order = cl_uint;
using cl_channel_type = cl_uint;

using cl_platform_id = struct _cl_platform_id*;
using cl_device_id = struct _cl_device_id*;
using cl_context = struct _cl_context*;
using cl_command_queue = struct _cl_command_queue*;
using cl_mem = struct _cl_mem*;
using cl_program = struct _cl_program*;
using cl_kernel = struct _cl_kernel*;
using cl_event = struct _cl_event*;

struct cl_image_format {
  cl_channel_order image_channel_order;
  cl_channel_type image_channel_data_type;
};

struct cl_image_desc {
  cl_mem_object_type image_type;
  size_t image_width;
  size_t image_height;
  size_t image_depth;
  size_t image_array_size;
  size_t image_row_pitch;
  size_t image_slice_pitch;
  cl_uint num_mip_levels;
  cl_uint num_samples;
  cl_mem buffer;
};

// Error codes.
constexpr cl_int CL_SUCCESS = 0;
constexpr cl_int CL_DEVICE_NOT_FOUND = -1;
constexpr cl_int CL_MEM_OBJECT_ALLOCATION_FAILURE = -4;
constexpr cl_int CL_OUT_OF_RESOURCES = -5;
constexpr cl_int CL_OUT_OF_HOST_MEMORY = -6;
constexpr cl_int CL_IMAGE_FORMAT_NOT_SUPPORTED = -10;
constexpr cl_int CL_BUILD_PROGRAM_FAILURE = -11;
constexpr cl_int CL_INVALID_VALUE = -30;
constexpr cl_int CL_INVALID_MEM_OBJECT = -38;
constexpr cl_int CL_INVALID_IMAGE_SIZE = -40;
constexpr cl_int CL_INVALID_KERNEL_NAME = -46;
constexpr cl_int CL_INVALID_ARG_VALUE = -50;
constexpr cl_int CL_INVALID_ARG_SIZE = -51;
constexpr cl_int CL_INVALID_KERNEL_ARGS = -52;
constexpr cl_int CL_INVALID_WORK_GROUP_SIZE = -54;
constexpr cl_int CL_PLATFORM_NOT_FOUND_KHR = -1001;

// Platform / device queries.
constexpr cl_platform_info CL_PLATFORM_VERSION = 0x0901;
constexpr cl_platform_info CL_PLATFORM_NAME = 0x0902;
constexpr cl_platform_info CL_PLATFORM_VENDOR = 0x0903;
constexpr cl_device_type CL_DEVICE_TYPE_CPU = 1 << 1;
constexpr cl_device_type CL_DEVICE_TYPE_GPU = 1 << 2;
constexpr cl_device_type CL_DEVICE_TYPE_ACCELERATOR = 1 << 3;
constexpr cl_device_type CL_DEVICE_TYPE_ALL = 0xFFFFFFFF;
constexpr cl_device_info CL_DEVICE_TYPE = 0x1000;
constexpr cl_device_info CL_DEVICE_MAX_COMPUTE_UNITS = 0x1002;
constexpr cl_device_info CL_DEVICE_MAX_WORK_ITEM_DIMENSIONS = 0x1003;
constexpr cl_device_info CL_DEVICE_MAX_WORK_GROUP_SIZE = 0x1004;
constexpr cl_device_info CL_DEVICE_MAX_WORK_ITEM_SIZES = 0x1005;
constexpr cl_device_info CL_DEVICE_MAX_CLOCK_FREQUENCY = 0x100C;
constexpr cl_device_info CL_DEVICE_MAX_MEM_ALLOC_SIZE = 0x1010;
constexpr cl_device_info CL_DEVICE_IMAGE_SUPPORT = 0x1016;
constexpr cl_device_info CL_DEVICE_IMAGE2D_MAX_WIDTH = 0x1011;
constexpr cl_device_info CL_DEVICE_IMAGE2D_MAX_HEIGHT = 0x1012;
constexpr cl_device_info CL_DEVICE_GLOBAL_MEM_CACHE_SIZE = 0x101E;
constexpr cl_device_info CL_DEVICE_GLOBAL_MEM_SIZE = 0x101F;
constexpr cl_device_info CL_DEVICE_LOCAL_MEM_SIZE = 0x1023;
constexpr cl_device_info CL_DEVICE_NAME = 0x102B;
constexpr cl_device_info CL_DEVICE_VENDOR = 0x102C;
constexpr cl_device_info CL_DRIVER_VERSION = 0x102D;
constexpr cl_device_info CL_DEVICE_VERSION = 0x102F;
constexpr cl_device_info CL_DEVICE_EXTENSIONS = 0x1030;
constexpr cl_device_info CL_DEVICE_IMAGE_MAX_ARRAY_SIZE = 0x1041;
constexpr cl_device_info CL_DEVICE_IMAGE_PITCH_ALIGNMENT = 0x104A;

// Memory objects.
constexpr cl_mem_flags CL_MEM_READ_WRITE = 1 << 0;
constexpr cl_mem_object_type CL_MEM_OBJECT_BUFFER = 0x10F0;
constexpr cl_mem_object_type CL_MEM_OBJECT_IMAGE2D = 0x10F1;
constexpr cl_mem_object_type CL_MEM_OBJECT_IMAGE2D_ARRAY = 0x10F3;
constexpr cl_channel_order CL_RGBA = 0x10B5;
constexpr cl_channel_type CL_SIGNED_INT8 = 0x10D7;
constexpr cl_channel_type CL_SIGNED_INT16 = 0x10D8;
constexpr cl_channel_type CL_SIGNED_INT32 = 0x10D9;
constexpr cl_channel_type CL_UNSIGNED_INT8 = 0x10DA;
constexpr cl_channel_type CL_UNSIGNED_INT16 = 0x10DB;
constexpr cl_channel_type CL_UNSIGNED_INT32 = 0x10DC;
constexpr cl_channel_type CL_HALF_FLOAT = 0x10DD;
constexpr cl_channel_type CL_FLOAT = 0x10DE;
constexpr cl_mem_info CL_MEM_TYPE = 0x1100;
constexpr cl_mem_info CL_MEM_SIZE = 0x1102;

// Programs, kernels, queues, events.
constexpr cl_program_build_info CL_PROGRAM_BUILD_LOG = 0x1183;
constexpr cl_kernel_work_group_info CL_KERNEL_WORK_GROUP_SIZE = 0x11B0;
constexpr cl_kernel_arg_info CL_KERNEL_ARG_TYPE_NAME = 0x1198;
constexpr cl_command_queue_properties CL_QUEUE_PROFILING_ENABLE = 1 << 1;
constexpr cl_profiling_info CL_PROFILING_COMMAND_START = 0x1282;
constexpr cl_profiling_info CL_PROFILING_COMMAND_END = 0x1283;
constexpr cl_bool CL_TRUE = 1;
constexpr cl_bool CL_FALSE = 0;

// Every entry point used, as a table of function pointers filled by Api::Load().
#define TVM_SMARTMEM_CL_FUNCTIONS(X)                                                          \
  X(clGetPlatformIDs, cl_int, (cl_uint, cl_platform_id*, cl_uint*))                           \
  X(clGetPlatformInfo, cl_int, (cl_platform_id, cl_platform_info, size_t, void*, size_t*))    \
  X(clGetDeviceIDs, cl_int, (cl_platform_id, cl_device_type, cl_uint, cl_device_id*, cl_uint*)) \
  X(clGetDeviceInfo, cl_int, (cl_device_id, cl_device_info, size_t, void*, size_t*))          \
  X(clCreateContext, cl_context,                                                              \
    (const cl_context_properties*, cl_uint, const cl_device_id*,                              \
     void (*)(const char*, const void*, size_t, void*), void*, cl_int*))                      \
  X(clReleaseContext, cl_int, (cl_context))                                                   \
  X(clCreateCommandQueue, cl_command_queue,                                                   \
    (cl_context, cl_device_id, cl_command_queue_properties, cl_int*))                         \
  X(clReleaseCommandQueue, cl_int, (cl_command_queue))                                        \
  X(clCreateBuffer, cl_mem, (cl_context, cl_mem_flags, size_t, void*, cl_int*))               \
  X(clCreateImage, cl_mem,                                                                    \
    (cl_context, cl_mem_flags, const cl_image_format*, const cl_image_desc*, void*, cl_int*)) \
  X(clReleaseMemObject, cl_int, (cl_mem))                                                     \
  X(clGetMemObjectInfo, cl_int, (cl_mem, cl_mem_info, size_t, void*, size_t*))                \
  X(clEnqueueReadBuffer, cl_int,                                                              \
    (cl_command_queue, cl_mem, cl_bool, size_t, size_t, void*, cl_uint, const cl_event*,      \
     cl_event*))                                                                              \
  X(clEnqueueWriteBuffer, cl_int,                                                             \
    (cl_command_queue, cl_mem, cl_bool, size_t, size_t, const void*, cl_uint,                 \
     const cl_event*, cl_event*))                                                             \
  X(clEnqueueCopyBuffer, cl_int,                                                              \
    (cl_command_queue, cl_mem, cl_mem, size_t, size_t, size_t, cl_uint, const cl_event*,      \
     cl_event*))                                                                              \
  X(clEnqueueReadImage, cl_int,                                                               \
    (cl_command_queue, cl_mem, cl_bool, const size_t*, const size_t*, size_t, size_t, void*,  \
     cl_uint, const cl_event*, cl_event*))                                                    \
  X(clEnqueueWriteImage, cl_int,                                                              \
    (cl_command_queue, cl_mem, cl_bool, const size_t*, const size_t*, size_t, size_t,         \
     const void*, cl_uint, const cl_event*, cl_event*))                                       \
  X(clEnqueueCopyImage, cl_int,                                                               \
    (cl_command_queue, cl_mem, cl_mem, const size_t*, const size_t*, const size_t*, cl_uint,  \
     const cl_event*, cl_event*))                                                             \
  X(clEnqueueCopyImageToBuffer, cl_int,                                                       \
    (cl_command_queue, cl_mem, cl_mem, const size_t*, const size_t*, size_t, cl_uint,         \
     const cl_event*, cl_event*))                                                             \
  X(clEnqueueCopyBufferToImage, cl_int,                                                       \
    (cl_command_queue, cl_mem, cl_mem, size_t, const size_t*, const size_t*, cl_uint,         \
     const cl_event*, cl_event*))                                                             \
  X(clCreateProgramWithSource, cl_program,                                                    \
    (cl_context, cl_uint, const char**, const size_t*, cl_int*))                              \
  X(clBuildProgram, cl_int,                                                                   \
    (cl_program, cl_uint, const cl_device_id*, const char*,                                   \
     void (*)(cl_program, void*), void*))                                                     \
  X(clGetProgramBuildInfo, cl_int,                                                            \
    (cl_program, cl_device_id, cl_program_build_info, size_t, void*, size_t*))                \
  X(clReleaseProgram, cl_int, (cl_program))                                                   \
  X(clCreateKernel, cl_kernel, (cl_program, const char*, cl_int*))                            \
  X(clReleaseKernel, cl_int, (cl_kernel))                                                     \
  X(clSetKernelArg, cl_int, (cl_kernel, cl_uint, size_t, const void*))                        \
  X(clGetKernelArgInfo, cl_int, (cl_kernel, cl_uint, cl_kernel_arg_info, size_t, void*, size_t*)) \
  X(clGetKernelWorkGroupInfo, cl_int,                                                         \
    (cl_kernel, cl_device_id, cl_kernel_work_group_info, size_t, void*, size_t*))             \
  X(clEnqueueNDRangeKernel, cl_int,                                                           \
    (cl_command_queue, cl_kernel, cl_uint, const size_t*, const size_t*, const size_t*,       \
     cl_uint, const cl_event*, cl_event*))                                                    \
  X(clFinish, cl_int, (cl_command_queue))                                                     \
  X(clFlush, cl_int, (cl_command_queue))                                                      \
  X(clWaitForEvents, cl_int, (cl_uint, const cl_event*))                                      \
  X(clReleaseEvent, cl_int, (cl_event))                                                       \
  X(clGetEventProfilingInfo, cl_int, (cl_event, cl_profiling_info, size_t, void*, size_t*))

/*! \brief Function table of the dynamically loaded OpenCL ICD loader. */
struct Api {
#define TVM_SMARTMEM_CL_DECLARE(name, ret, args) ret(*name) args = nullptr;
  TVM_SMARTMEM_CL_FUNCTIONS(TVM_SMARTMEM_CL_DECLARE)
#undef TVM_SMARTMEM_CL_DECLARE

  /*! \brief Path of the loader that was opened, or empty when none could be. */
  std::string library;
  /*! \brief Why loading failed (empty on success). */
  std::string error;

  bool ok() const { return error.empty(); }

  /*! \brief The process-wide table; loaded on first call. */
  static const Api& Get();
};

/*! \brief Spec name of an error code, e.g. "CL_INVALID_KERNEL_ARGS (-52)". */
std::string ErrorName(cl_int code);

}  // namespace cl
}  // namespace tvm_smartmem

#endif  // TVM_SMARTMEM_RUNTIME_OPENCL_CL_API_H_
