/*
 * tvm-smartmem OpenCL runtime: shared declarations of the device API and the module loader.
 *
 * Memory handles.  Every pointer this runtime hands to TVM as a tensor's `data` is a MemHandle*,
 * for buffers and images alike.  TVM treats device pointers as opaque (kernels receive them as
 * `handle` arguments, copies receive them inside DLTensors without any memory scope), so the
 * handle itself must say what it is: buffer or image, and for an image its extents in texels.
 */
#ifndef TVM_SMARTMEM_RUNTIME_OPENCL_OPENCL_RUNTIME_H_
#define TVM_SMARTMEM_RUNTIME_OPENCL_OPENCL_RUNTIME_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/error.h>

#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "cl_api.h"

namespace tvm_smartmem {

/*! \brief Error kind registered on the Python side (tvm_smartmem.errors.OpenCLError). */
constexpr const char* kErrorKind = "SmartMem.OpenCLError";

/*! \brief Throw an OpenCLError with the given message (reaches Python as OpenCLError). */
[[noreturn]] void Fail(const std::string& message);

/*! \brief Fail with the call's name and the spec name of `code` unless it is CL_SUCCESS. */
inline void Check(cl::cl_int code, const char* what) {
  if (code != cl::CL_SUCCESS) Fail(std::string(what) + " failed: " + cl::ErrorName(code));
}

struct MemHandle {
  static constexpr uint32_t kMagic = 0x4c434d53;  // "SMCL"
  // kStorage: a planned storage in a texture scope, with no OpenCL memory of its own (its
  // tensors are images created as its views, see allocator.cc)
  enum class Kind : int { kBuffer = 0, kImage = 1, kStorage = 2 };

  uint32_t magic = kMagic;
  Kind kind = Kind::kBuffer;
  cl::cl_mem mem = nullptr;
  int device_id = 0;
  size_t nbytes = 0;  // buffer bytes; for images width*height*depth*texel_bytes
  // images only
  size_t width = 0, height = 0, depth = 0;
  size_t texel_bytes = 0;
  std::string scope;
  uint8_t pool_key_code = 0, pool_key_bits = 0;  // element type, for the allocator's image pool

  bool is_image() const { return kind == Kind::kImage; }
};

/*! \brief The handle behind a tensor's data pointer; fails clearly on anything else. */
MemHandle* AsHandle(void* data, const char* where);

/*! \brief One OpenCL device of the selected platform, with its queue and limits. */
struct DeviceInfo {
  cl::cl_device_id id = nullptr;
  cl::cl_command_queue queue = nullptr;
  std::string name, vendor, version, driver, extensions;
  cl::cl_device_type type = 0;
  size_t max_work_group_size = 0;
  std::vector<size_t> max_work_item_sizes;
  cl::cl_ulong local_mem = 0, global_mem = 0, cache = 0, max_alloc = 0;
  cl::cl_uint compute_units = 0, clock_mhz = 0, pitch_alignment = 0;
  bool image_support = false;
  size_t image2d_max_width = 0, image2d_max_height = 0, image_max_array = 0;
};

/*!
 * \brief Process-wide OpenCL state: the loader, one platform, its devices, one context, one
 * in-order queue per device.  Initialised on first use; never torn down (TVM keeps device
 * allocations alive until exit).
 */
class Workspace {
 public:
  static Workspace& Global();

  /*! \brief Empty when a platform with devices was found; otherwise why not. */
  const std::string& init_error() const { return init_error_; }
  bool ready() const { return init_error_.empty(); }
  const std::string& platform_name() const { return platform_name_; }
  const std::string& loader() const { return loader_; }
  cl::cl_context context() const { return context_; }
  size_t num_devices() const { return devices_.size(); }
  /*! \brief The device, or an OpenCLError naming the reason it does not exist. */
  const DeviceInfo& device(int id) const;
  /*! \brief JSON description of every platform seen and of the selection. */
  std::string Describe() const;

  /*! \brief Thread-local current device (TVM calls SetDevice before each launch). */
  static int& CurrentDevice();

 private:
  Workspace();
  std::string init_error_;
  std::string platform_name_;
  std::string loader_;
  std::string platforms_json_;
  cl::cl_context context_ = nullptr;
  std::vector<DeviceInfo> devices_;
};

/*! \brief Texture extents (width, height, depth) in texels of a tensor in a texture scope. */
struct ImageExtent {
  size_t width = 1, height = 1, depth = 1, lanes = 4;
};

/*! \brief TVM's flattening of an N-d texture-scope tensor (last axis = RGBA lanes). */
ImageExtent TextureExtent(const int64_t* shape, int ndim, const std::string& scope);

/*! \brief True for "global.texture", "global.texture-weight", "global.texture-nhwc". */
bool IsTextureScope(const std::string& scope);

}  // namespace tvm_smartmem

#endif  // TVM_SMARTMEM_RUNTIME_OPENCL_OPENCL_RUNTIME_H_
