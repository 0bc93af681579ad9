/*
 * The "opencl" runtime module: OpenCL C source from TVM's code generator, built per device on
 * first use, with one packed launcher per kernel.
 *
 * Registered as
 *   ffi.Module.create.opencl          what tvm.compile calls, so compiled modules run in memory;
 *   ffi.Module.load_from_bytes.opencl what loading an exported library calls.
 *
 * Serialised form (SaveToBytes / load_from_bytes), little-endian, the layout TVM's own OpenCL
 * modules use, so a library exported here loads in any TVM OpenCL runtime and vice versa:
 *   str fmt ("cl") | u64 n, n x (str name, FunctionInfo) | str code
 *   str = u64 length + bytes;  FunctionInfo = str name | u64 n, n x (u8 code, u8 bits, u16 lanes)
 *   | u64 n, n x str launch tag | u64 n, n x i32 extra tag
 *
 * Launch convention of TVM's host code: the kernel arguments (buffers and images as the data
 * pointers our DeviceAPI returned, ints as int64, floats as double), then one integer per launch
 * tag (blockIdx.*, threadIdx.*), then the dynamic shared memory size when the last tag is
 * "tirx.use_dyn_shared_memory".  global work size = grid * block, local = block.
 */
#include <tvm/ffi/cast.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/accessor.h>
#include <tvm/ffi/reflection/registry.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>

#include "opencl_runtime.h"

namespace tvm_smartmem {

using namespace cl;  // NOLINT(build/namespaces)
namespace ffi = tvm::ffi;

namespace {

constexpr const char* kDynSharedTag = "tirx.use_dyn_shared_memory";

struct KernelInfo {
  std::string name;
  std::vector<DLDataType> arg_types;
  std::vector<std::string> launch_tags;
  std::vector<int32_t> extra_tags;
};

// -- byte streams ----------------------------------------------------------------------------

class Writer {
 public:
  void U64(uint64_t v) { Raw(&v, 8); }
  void I32(int32_t v) { Raw(&v, 4); }
  void Str(const std::string& s) {
    U64(s.size());
    out_.append(s);
  }
  void Raw(const void* p, size_t n) {
    // the hosts we run on are little-endian, as is the format
    out_.append(static_cast<const char*>(p), n);
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

class Reader {
 public:
  Reader(const char* data, size_t size) : p_(data), end_(data + size) {}
  uint64_t U64() { return Scalar<uint64_t>(); }
  int32_t I32() { return Scalar<int32_t>(); }
  std::string Str() {
    uint64_t n = U64();
    Need(n);
    std::string s(p_, n);
    p_ += n;
    return s;
  }
  uint64_t Count(size_t min_item_bytes) {
    uint64_t n = U64();
    if (n > static_cast<uint64_t>(end_ - p_) / std::max<size_t>(min_item_bytes, 1)) Corrupt();
    return n;
  }
  bool done() const { return p_ == end_; }

 private:
  template <typename T>
  T Scalar() {
    Need(sizeof(T));
    T v;
    std::memcpy(&v, p_, sizeof(T));
    p_ += sizeof(T);
    return v;
  }
  void Need(uint64_t n) {
    if (n > static_cast<uint64_t>(end_ - p_)) Corrupt();
  }
  [[noreturn]] static void Corrupt() {
    Fail("corrupt OpenCL module: the serialized module ends early or has impossible sizes");
  }
  const char* p_;
  const char* end_;
};

// -- the module ------------------------------------------------------------------------------

/*! \brief Splits TVM's generated source into per-kernel sections ("// Function: <name>"). */
std::map<std::string, std::string> SplitSections(const std::string& code) {
  static const std::string marker = "// Function: ";
  std::map<std::string, std::string> out;
  size_t pos = code.find(marker);
  while (pos != std::string::npos) {
    size_t eol = code.find('\n', pos);
    std::string name = code.substr(pos + marker.size(), eol - pos - marker.size());
    while (!name.empty() && (name.back() == '\r' || name.back() == ' ')) name.pop_back();
    size_t next = code.find(marker, eol == std::string::npos ? code.size() : eol);
    out[name] = code.substr(pos, (next == std::string::npos ? code.size() : next) - pos);
    pos = next;
  }
  return out;
}

enum class ArgKind { kUnknown, kBuffer, kImage };

/*!
 * \brief Image or buffer, per parameter of kernel `name`, read from its signature in `src`.
 *
 * Read from the source rather than asked of the driver (clGetKernelArgInfo), so that programs
 * build with no option beyond the user's own: -cl-kernel-arg-info, which the driver query
 * needs, was the one difference between the runtime's builds, which NVIDIA's compiler failed
 * for some texture kernels, and benchmarks/opencl_build_check.py's, which it passed.
 * Parameters the signature does not make clear (scalars) stay kUnknown: unchecked.
 */
std::vector<ArgKind> ParamKinds(const std::string& src, const std::string& name, size_t n) {
  std::vector<ArgKind> kinds(n, ArgKind::kUnknown);
  const std::string key = " " + name + "(";
  size_t pos = src.find(key);
  if (pos == std::string::npos) return kinds;
  size_t close = src.find(')', pos);
  if (close == std::string::npos) return kinds;
  std::string params = src.substr(pos + key.size(), close - pos - key.size());
  size_t i = 0, start = 0;
  while (i < n && start <= params.size()) {
    size_t comma = params.find(',', start);
    std::string p = params.substr(start, comma == std::string::npos ? std::string::npos
                                                                    : comma - start);
    if (p.find("image") != std::string::npos) {
      kinds[i] = ArgKind::kImage;
    } else if (p.find('*') != std::string::npos) {
      kinds[i] = ArgKind::kBuffer;
    }
    ++i;
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return kinds;
}

/*! \brief A kernel built for one device; launches on it are serialised by `mu`. */
struct BuiltKernel {
  std::mutex mu;
  cl_program program = nullptr;
  cl_kernel kernel = nullptr;
  std::vector<ArgKind> arg_kinds;
  ~BuiltKernel() {
    const Api& api = Api::Get();
    if (kernel) api.clReleaseKernel(kernel);
    if (program) api.clReleaseProgram(program);
  }
};

class OpenCLModuleNode : public ffi::ModuleObj {
 public:
  OpenCLModuleNode(std::string fmt, std::vector<KernelInfo> infos, std::string code)
      : fmt_(std::move(fmt)), code_(std::move(code)) {
    if (fmt_ != "cl") {
      Fail("OpenCL module format '" + fmt_ + "' is not supported (only OpenCL C source, 'cl')");
    }
    for (KernelInfo& k : infos) infos_.emplace(k.name, std::move(k));
    sections_ = SplitSections(code_);
  }

  const char* kind() const final { return "opencl"; }

  int GetPropertyMask() const final {
    return ffi::Module::kBinarySerializable | ffi::Module::kRunnable;
  }

  using ffi::ModuleObj::GetFunction;

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& name) final {
    auto it = infos_.find(std::string(name));
    if (it == infos_.end()) return std::nullopt;
    ffi::ObjectPtr<ffi::Object> self = ffi::GetObjectPtr<ffi::Object>(this);
    const KernelInfo* info = &it->second;
    return ffi::Function::FromPacked([self, this, info](ffi::PackedArgs args, ffi::Any* rv) {
      Launch(*info, args);
    });
  }

  ffi::Bytes SaveToBytes() const final {
    Writer w;
    w.Str(fmt_);
    w.U64(infos_.size());
    for (const auto& [name, k] : infos_) {
      w.Str(name);
      w.Str(k.name);
      w.U64(k.arg_types.size());
      for (DLDataType t : k.arg_types) {
        uint16_t lanes = t.lanes;
        w.Raw(&t.code, 1);
        w.Raw(&t.bits, 1);
        w.Raw(&lanes, 2);
      }
      w.U64(k.launch_tags.size());
      for (const std::string& tag : k.launch_tags) w.Str(tag);
      w.U64(k.arg_types.size());
      for (size_t i = 0; i < k.arg_types.size(); ++i) {
        w.I32(i < k.extra_tags.size() ? k.extra_tags[i] : 0);
      }
    }
    w.Str(code_);
    return ffi::Bytes(w.Take());
  }

  ffi::String InspectSource(const ffi::String& format) const final {
    std::string f(format);
    if (f.empty() || f == "cl" || f == "source") return code_;
    return "";
  }

  static ffi::Module Load(const ffi::Bytes& bytes) {
    Reader r(bytes.data(), bytes.size());
    std::string fmt = r.Str();
    std::vector<KernelInfo> infos;
    uint64_t n = r.Count(8);
    for (uint64_t i = 0; i < n; ++i) {
      r.Str();  // map key: equal to the kernel name
      KernelInfo k;
      k.name = r.Str();
      uint64_t nargs = r.Count(4);
      for (uint64_t a = 0; a < nargs; ++a) {
        uint64_t packed = static_cast<uint32_t>(r.I32());
        DLDataType t;
        t.code = static_cast<uint8_t>(packed & 0xff);
        t.bits = static_cast<uint8_t>((packed >> 8) & 0xff);
        t.lanes = static_cast<uint16_t>(packed >> 16);
        k.arg_types.push_back(t);
      }
      uint64_t ntags = r.Count(8);
      for (uint64_t t = 0; t < ntags; ++t) k.launch_tags.push_back(r.Str());
      uint64_t nextra = r.Count(4);
      for (uint64_t e = 0; e < nextra; ++e) k.extra_tags.push_back(r.I32());
      infos.push_back(std::move(k));
    }
    std::string code = r.Str();
    if (!r.done()) Fail("corrupt OpenCL module: trailing bytes after the source");
    return ffi::Module(ffi::make_object<OpenCLModuleNode>(fmt, std::move(infos), code));
  }

 private:
  BuiltKernel& Kernel(int device_id, const KernelInfo& info) {
    std::lock_guard<std::mutex> lock(build_mu_);
    auto key = std::make_pair(device_id, info.name);
    auto it = kernels_.find(key);
    if (it != kernels_.end()) return *it->second;
    auto built = std::make_unique<BuiltKernel>();
    Build(device_id, info, built.get());
    BuiltKernel& ref = *built;
    kernels_.emplace(key, std::move(built));
    return ref;
  }

  void Build(int device_id, const KernelInfo& info, BuiltKernel* out) {
    const Api& api = Api::Get();
    Workspace& ws = Workspace::Global();
    const DeviceInfo& dev = ws.device(device_id);
    auto sec = sections_.find(info.name);
    const std::string& src = sec != sections_.end() ? sec->second : code_;
    const char* text = src.c_str();
    size_t len = src.size();
    cl_int err = CL_SUCCESS;
    out->program = api.clCreateProgramWithSource(ws.context(), 1, &text, &len, &err);
    Check(err, "clCreateProgramWithSource");
    std::string options;
    if (const char* extra = std::getenv("TVM_SMARTMEM_OPENCL_BUILD_OPTIONS")) options = extra;
    err = api.clBuildProgram(out->program, 1, &dev.id, options.c_str(), nullptr, nullptr);
    if (err != CL_SUCCESS) {
      size_t n = 0;
      api.clGetProgramBuildInfo(out->program, dev.id, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n);
      std::string log(n, '\0');
      if (n) api.clGetProgramBuildInfo(out->program, dev.id, CL_PROGRAM_BUILD_LOG, n, log.data(),
                                       nullptr);
      log.resize(std::strlen(log.c_str()));
      std::string hint;
      if (err == -9999 && log.find("error") == std::string::npos) {
        // NVIDIA's driver answers the first call after a kernel fault with -9999: the build
        // was fine, an earlier launch read or wrote out of range and broke the context
        hint = "\n(the log holds no error: NVIDIA's OpenCL reports -9999 on the first call after "
               "a kernel faulted -- an out-of-range access -- so an earlier kernel is the likely "
               "cause; TVM_SMARTMEM_OPENCL_SYNC=1 waits after every launch and names it)";
      }
      Fail("OpenCL kernel '" + info.name + "' failed to build on " + dev.name + " (" +
           ErrorName(err) + "); build log:\n" + log + hint);
    }
    out->kernel = api.clCreateKernel(out->program, info.name.c_str(), &err);
    Check(err, ("clCreateKernel(" + info.name + ")").c_str());
    out->arg_kinds = ParamKinds(src, info.name, info.arg_types.size());
  }

  void Launch(const KernelInfo& info, const ffi::PackedArgs& args) {
    const Api& api = Api::Get();
    int device_id = Workspace::CurrentDevice();
    const DeviceInfo& dev = Workspace::Global().device(device_id);

    size_t work[6] = {1, 1, 1, 1, 1, 1};  // grid x,y,z then block x,y,z
    int work_dim = 1;
    size_t nargs = info.arg_types.size();
    size_t n_launch = 0;
    bool dyn_shared = !info.launch_tags.empty() && info.launch_tags.back() == kDynSharedTag;
    std::vector<std::pair<int, int>> slots;  // (index into work, or -1 to skip) per tag
    for (const std::string& tag : info.launch_tags) {
      if (tag.rfind("blockIdx.", 0) == 0 || tag.rfind("threadIdx.", 0) == 0) {
        int axis = tag.back() - 'x';
        if (axis < 0 || axis > 2) Fail("bad launch tag '" + tag + "'");
        int base = tag[0] == 'b' ? 0 : 3;
        slots.emplace_back(base + axis, 0);
        work_dim = std::max(work_dim, axis + 1);
        ++n_launch;
      } else if (tag.rfind("tirx.", 0) == 0 || tag.rfind("tir.", 0) == 0) {
        continue;  // flags; the dynamic shared memory size is read after the extents
      } else {
        Fail("launch tag '" + tag + "' of kernel '" + info.name + "' is not supported by OpenCL");
      }
    }
    size_t expected = nargs + n_launch + (dyn_shared ? 1 : 0);
    if (static_cast<size_t>(args.size()) != expected) {
      std::ostringstream os;
      os << "kernel '" << info.name << "' takes " << expected << " packed arguments (" << nargs
         << " kernel args + " << n_launch << " launch extents" << (dyn_shared ? " + 1" : "")
         << "), got " << args.size();
      Fail(os.str());
    }
    for (size_t t = 0; t < slots.size(); ++t) {
      int64_t v = args[static_cast<int>(nargs + t)].cast<int64_t>();
      work[slots[t].first] = v > 0 ? static_cast<size_t>(v) : 1;
    }

    BuiltKernel& k = Kernel(device_id, info);
    std::lock_guard<std::mutex> lock(k.mu);
    static const bool debug = std::getenv("TVM_SMARTMEM_OPENCL_DEBUG") != nullptr;
    if (debug) {
      std::fprintf(stderr, "[smartmem-opencl] module %p kernel %s (%p): %zu args, grid %zux%zux%zu"
                   " block %zux%zux%zu\n", static_cast<void*>(this), info.name.c_str(),
                   static_cast<void*>(k.kernel), nargs, work[0], work[1], work[2], work[3],
                   work[4], work[5]);
    }
    for (size_t i = 0; i < nargs; ++i) SetArg(info, k, i, args[static_cast<int>(i)]);
    size_t global[3], local[3];
    for (int d = 0; d < 3; ++d) {
      local[d] = work[3 + d];
      global[d] = work[d] * work[3 + d];
    }
    cl_int err = api.clEnqueueNDRangeKernel(dev.queue, k.kernel, static_cast<cl_uint>(work_dim),
                                            nullptr, global, local, 0, nullptr, nullptr);
    if (err != CL_SUCCESS) {
      std::ostringstream os;
      os << "launch of OpenCL kernel '" << info.name << "' on " << dev.name << " failed: "
         << ErrorName(err) << " (global [" << global[0] << ", " << global[1] << ", "
         << global[2] << "], local [" << local[0] << ", " << local[1] << ", " << local[2]
         << "])";
      Fail(os.str());
    }
    // like CUDA_LAUNCH_BLOCKING: a fault is reported by the kernel that caused it, not by
    // whichever later call the driver fails first
    static const bool sync = [] {
      const char* v = std::getenv("TVM_SMARTMEM_OPENCL_SYNC");
      return v != nullptr && std::string(v) != "0" && std::string(v) != "";
    }();
    if (sync) {
      err = api.clFinish(dev.queue);
      if (err != CL_SUCCESS) {
        Fail("OpenCL kernel '" + info.name + "' failed while running on " + dev.name + ": " +
             ErrorName(err) + " (TVM_SMARTMEM_OPENCL_SYNC: waited after its launch)");
      }
    }
  }

  static void* DataPointer(const ffi::AnyView& v) {
    if (auto t = v.try_cast<DLTensor*>()) return (*t)->data;
    return v.cast<void*>();
  }

  void SetArg(const KernelInfo& info, BuiltKernel& k, size_t i, const ffi::AnyView& v) {
    const Api& api = Api::Get();
    DLDataType t = info.arg_types[i];
    cl_uint idx = static_cast<cl_uint>(i);
    cl_int err = CL_SUCCESS;
    if (t.code == kDLOpaqueHandle) {
      void* data = DataPointer(v);
      MemHandle* h = AsHandle(data, ("argument #" + std::to_string(i) + " of kernel '" +
                                     info.name + "'").c_str());
      ArgKind want = k.arg_kinds[i];
      if (want != ArgKind::kUnknown && (want == ArgKind::kImage) != h->is_image()) {
        Fail("argument #" + std::to_string(i) + " of kernel '" + info.name + "' must be " +
             (want == ArgKind::kImage ? "an image (texture memory scope)" : "a buffer") +
             ", got " + (h->is_image() ? "an image" : "a buffer"));
      }
      static const bool debug = std::getenv("TVM_SMARTMEM_OPENCL_DEBUG") != nullptr;
      if (debug) {
        size_t size = 0;
        cl_int q = api.clGetMemObjectInfo(h->mem, CL_MEM_SIZE, sizeof(size), &size, nullptr);
        std::fprintf(stderr, "    arg %zu: handle %p mem %p nbytes %zu -> %s %zu\n", i,
                     static_cast<void*>(h), static_cast<void*>(h->mem), h->nbytes,
                     ErrorName(q).c_str(), size);
      }
      err = api.clSetKernelArg(k.kernel, idx, sizeof(cl_mem), &h->mem);
    } else if (t.code == kDLInt || t.code == kDLUInt) {
      int64_t value = v.cast<int64_t>();
      if (t.bits == 64) {
        err = api.clSetKernelArg(k.kernel, idx, 8, &value);
      } else if (t.bits == 32) {
        int32_t v32 = static_cast<int32_t>(value);
        err = api.clSetKernelArg(k.kernel, idx, 4, &v32);
      } else {
        Fail("unsupported integer argument width for kernel '" + info.name + "'");
      }
    } else if (t.code == kDLFloat) {
      double value = v.cast<double>();
      if (t.bits == 64) {
        err = api.clSetKernelArg(k.kernel, idx, 8, &value);
      } else if (t.bits == 32) {
        float f = static_cast<float>(value);
        err = api.clSetKernelArg(k.kernel, idx, 4, &f);
      } else {
        Fail("unsupported float argument width for kernel '" + info.name + "'");
      }
    } else {
      Fail("unsupported argument type for kernel '" + info.name + "'");
    }
    Check(err, ("clSetKernelArg(" + info.name + ", #" + std::to_string(i) + ")").c_str());
  }

  std::string fmt_;
  std::string code_;
  std::map<std::string, KernelInfo> infos_;
  std::map<std::string, std::string> sections_;
  std::mutex build_mu_;
  std::map<std::pair<int, std::string>, std::unique_ptr<BuiltKernel>> kernels_;
};

/*! \brief Reads a runtime.FunctionInfo through reflection (no layout coupling to TVM). */
KernelInfo FromFunctionInfo(const ffi::Any& obj) {
  static const ffi::reflection::FieldGetter name_of("runtime.FunctionInfo", "name");
  static const ffi::reflection::FieldGetter types_of("runtime.FunctionInfo", "arg_types");
  static const ffi::reflection::FieldGetter tags_of("runtime.FunctionInfo", "launch_param_tags");
  ffi::ObjectRef ref = obj.cast<ffi::ObjectRef>();
  KernelInfo k;
  k.name = std::string(name_of(ref).cast<ffi::String>());
  for (const ffi::Any& t : types_of(ref).cast<ffi::Array<ffi::Any>>()) {
    k.arg_types.push_back(t.cast<DLDataType>());
  }
  for (const ffi::Any& tag : tags_of(ref).cast<ffi::Array<ffi::Any>>()) {
    k.launch_tags.push_back(std::string(tag.cast<ffi::String>()));
  }
  return k;
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("ffi.Module.load_from_bytes.opencl",
           [](const ffi::Bytes& bytes) { return OpenCLModuleNode::Load(bytes); })
      .def("ffi.Module.create.opencl",
           [](const ffi::Bytes& code, const ffi::String& fmt,
              const ffi::Map<ffi::String, ffi::Any>& fmap, const ffi::Any& /*source*/) {
             std::vector<KernelInfo> infos;
             for (const auto& kv : fmap) infos.push_back(FromFunctionInfo(kv.second));
             return ffi::Module(ffi::make_object<OpenCLModuleNode>(
                 std::string(fmt), std::move(infos), std::string(code.data(), code.size())));
           });
}

}  // namespace tvm_smartmem
