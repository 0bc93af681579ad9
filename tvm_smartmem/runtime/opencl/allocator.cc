/*
 * The VM's memory allocator for OpenCL devices, registered as "DeviceAllocator.opencl".
 *
 * TVM's runtime asks that global function for the allocator of an OpenCL device before falling
 * back to its generic ones, and the generic ones refuse every memory scope but "global": a
 * compiled model whose intermediate tensors live in texture memory (image2d arrays) could not
 * run.  This allocator serves both:
 *
 *  - buffers ("global"): cl_mem buffers, pooled by size in the pooled variant, so that the
 *    storage the memory planner gives each inference is not re-created on every call;
 *  - texture scopes: the memory planner gives a texture tensor a *storage* of some bytes in the
 *    scope (`vm.builtin.alloc_storage`) and then the tensor itself as a scoped view of it
 *    (`vm.builtin.alloc_tensor(..., scope)` -> CreateView).  An image2d array cannot be a view
 *    of memory whose extents are not known yet (and OpenCL creates no image arrays from
 *    buffers), so the storage is a placeholder holding no OpenCL memory, and each view is an
 *    image of the extents its tensor's shape and scope give.  Released images go back to a pool
 *    keyed by extents and channel type, so a model's images are created once, on its first
 *    inference.
 *
 * `smartmem.opencl.allocator_stats` reports what was created and reused (the tests check that a
 * second inference creates nothing).
 */
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/device_api.h>
#include <tvm/runtime/memory/memory_manager.h>

#include <map>
#include <mutex>
#include <tuple>
#include <unordered_set>

#include "opencl_runtime.h"

namespace tvm_smartmem {

namespace {

using tvm::runtime::DeviceAPI;
using tvm::runtime::memory::AllocatorType;
using tvm::runtime::memory::Buffer;

/*! \brief What the allocators of this process created and reused (all devices together). */
struct AllocatorStats {
  int64_t buffers_created = 0, buffers_reused = 0;
  int64_t images_created = 0, images_reused = 0;
  int64_t texture_storages = 0;
};

AllocatorStats& Stats() {
  static AllocatorStats stats;
  return stats;
}

std::mutex& StatsMutex() {
  static std::mutex mu;
  return mu;
}

/*! \brief Buffer sizes are rounded up to this, so that nearby sizes share pool entries. */
constexpr size_t kPageBytes = 4096;

size_t RoundUp(size_t n) { return (n + kPageBytes - 1) / kPageBytes * kPageBytes; }

/*! \brief Pool key of an image: extents in texels and the element type (channel type). */
using ImageKey = std::tuple<size_t, size_t, size_t, uint8_t, uint8_t, std::string>;

class SmartMemAllocator final : public tvm::runtime::memory::Allocator {
 public:
  explicit SmartMemAllocator(AllocatorType type) : Allocator(type), pooled_(type == tvm::runtime::memory::kPooled) {}

  Buffer Alloc(DLDevice dev, size_t nbytes, size_t alignment, DLDataType type_hint) final {
    std::lock_guard<std::mutex> lock(mu_);
    Buffer buf;
    buf.device = dev;
    buf.alloc_type = type();
    buf.size = pooled_ ? RoundUp(std::max<size_t>(nbytes, 1)) : nbytes;
    if (pooled_) {
      auto it = free_buffers_.find({dev.device_id, buf.size});
      if (it != free_buffers_.end()) {
        buf.data = it->second;
        free_buffers_.erase(it);
        Count(&AllocatorStats::buffers_reused);
        used_ += buf.size;
        return buf;
      }
    }
    buf.data = Api(dev)->AllocDataSpace(dev, buf.size, alignment, type_hint);
    Count(&AllocatorStats::buffers_created);
    used_ += buf.size;
    return buf;
  }

  Buffer Alloc(DLDevice dev, tvm::ffi::Shape shape, DLDataType type_hint,
               const std::string& mem_scope) final {
    if (mem_scope.empty() || mem_scope == "global") {
      size_t bytes = (static_cast<size_t>(type_hint.bits) * type_hint.lanes + 7) / 8;
      for (int64_t d : shape) bytes *= static_cast<size_t>(d);
      return Alloc(dev, bytes, 64, type_hint);
    }
    if (!IsTextureScope(mem_scope)) {
      Fail("the OpenCL allocator has no memory scope '" + mem_scope +
           "' (global, global.texture, global.texture-weight, global.texture-nhwc)");
    }
    Buffer buf;
    buf.device = dev;
    buf.alloc_type = type();
    if (shape.size() == 1) {
      // a planned storage (`alloc_storage` passes its size in bytes): the images are its views
      auto* h = new MemHandle();
      h->kind = MemHandle::Kind::kStorage;
      h->device_id = dev.device_id;
      h->nbytes = static_cast<size_t>(shape[0]);
      h->scope = mem_scope;
      buf.data = h;
      buf.size = h->nbytes;
      Count(&AllocatorStats::texture_storages);
      return buf;
    }
    // a tensor allocated directly in a texture scope (Allocator::Empty): one image
    buf.data = TakeImage(dev, shape, type_hint, mem_scope);
    buf.size = static_cast<MemHandle*>(buf.data)->nbytes;
    return buf;
  }

  void* CreateView(const Buffer& buffer, tvm::ffi::Shape shape, DLDataType type_hint,
                   const std::string& mem_scope) final {
    if (!IsTextureScope(mem_scope)) return buffer.data;  // a buffer view is the buffer itself
    auto* storage = static_cast<MemHandle*>(buffer.data);
    if (storage == nullptr || storage->magic != MemHandle::kMagic ||
        storage->kind != MemHandle::Kind::kStorage) {
      Fail("a tensor in " + mem_scope + " must be placed in a storage allocated in a texture "
           "scope (vm.builtin.alloc_storage with that scope)");
    }
    return TakeImage(buffer.device, shape, type_hint, mem_scope);
  }

  void FreeView(DLDevice dev, void* data) final { GiveImage(dev, data); }

  void Free(const Buffer& buffer) final {
    auto* h = static_cast<MemHandle*>(buffer.data);
    if (h != nullptr && h->magic == MemHandle::kMagic && h->kind == MemHandle::Kind::kStorage) {
      h->magic = 0;
      delete h;
      return;
    }
    if (h != nullptr && h->magic == MemHandle::kMagic && h->is_image()) {
      GiveImage(buffer.device, buffer.data);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    used_ -= std::min(used_, buffer.size);
    if (pooled_) {
      free_buffers_.insert({{buffer.device.device_id, buffer.size}, buffer.data});
    } else {
      Api(buffer.device)->FreeDataSpace(buffer.device, buffer.data);
    }
  }

  void Clear() final {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [key, data] : free_buffers_) {
      DLDevice dev{kDLOpenCL, key.first};
      Api(dev)->FreeDataSpace(dev, data);
    }
    free_buffers_.clear();
    for (auto& [key, h] : free_images_) {
      DLDevice dev{kDLOpenCL, h->device_id};
      Api(dev)->FreeDataSpace(dev, h);
    }
    free_images_.clear();
  }

  size_t UsedMemory() const final { return used_; }

 protected:
  bool AllowMemoryScope(const std::string& mem_scope) const final {
    return mem_scope.empty() || mem_scope == "global" || IsTextureScope(mem_scope);
  }

 private:
  static DeviceAPI* Api(DLDevice dev) { return DeviceAPI::Get(dev); }

  static void Count(int64_t AllocatorStats::*field) {
    std::lock_guard<std::mutex> lock(StatsMutex());
    ++(Stats().*field);
  }

  void* TakeImage(DLDevice dev, const tvm::ffi::Shape& shape, DLDataType dtype,
                  const std::string& scope) {
    ImageExtent e = TextureExtent(shape.data(), static_cast<int>(shape.size()), scope);
    ImageKey key{e.width, e.height, e.depth, dtype.code, dtype.bits, scope};
    std::lock_guard<std::mutex> lock(mu_);
    if (pooled_) {
      for (auto it = free_images_.lower_bound(key); it != free_images_.end() && it->first == key;
           ++it) {
        if (it->second->device_id != dev.device_id) continue;
        MemHandle* h = it->second;
        free_images_.erase(it);
        live_images_.insert(h);
        Count(&AllocatorStats::images_reused);
        return h;
      }
    }
    // the device API checks the lanes, the channel type and the device's image limits
    void* data = Api(dev)->AllocDataSpace(dev, static_cast<int>(shape.size()), shape.data(),
                                          dtype, tvm::ffi::String(scope));
    auto* h = static_cast<MemHandle*>(data);
    h->pool_key_code = dtype.code;
    h->pool_key_bits = dtype.bits;
    live_images_.insert(h);
    Count(&AllocatorStats::images_created);
    return h;
  }

  void GiveImage(DLDevice dev, void* data) {
    auto* h = static_cast<MemHandle*>(data);
    std::lock_guard<std::mutex> lock(mu_);
    if (live_images_.erase(h) == 0) return;  // not one of our views (a buffer view)
    if (pooled_) {
      ImageKey key{h->width, h->height, h->depth, h->pool_key_code, h->pool_key_bits, h->scope};
      free_images_.insert({key, h});
    } else {
      Api(dev)->FreeDataSpace(dev, h);
    }
  }

  bool pooled_;
  std::mutex mu_;
  size_t used_ = 0;
  std::multimap<std::pair<int, size_t>, void*> free_buffers_;
  std::multimap<ImageKey, MemHandle*> free_images_;
  std::unordered_set<MemHandle*> live_images_;
};

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("DeviceAllocator.opencl",
           [](DLDevice dev, int type) -> void* {
             // one allocator per (device, type); TVM's MemoryManager owns and caches it
             return static_cast<tvm::runtime::memory::Allocator*>(
                 new SmartMemAllocator(static_cast<AllocatorType>(type)));
           })
      .def("smartmem.opencl.allocator_stats", []() {
        std::lock_guard<std::mutex> lock(StatsMutex());
        const AllocatorStats& s = Stats();
        tvm::ffi::Map<tvm::ffi::String, int64_t> out;
        out.Set("buffers_created", s.buffers_created);
        out.Set("buffers_reused", s.buffers_reused);
        out.Set("images_created", s.images_created);
        out.Set("images_reused", s.images_reused);
        out.Set("texture_storages", s.texture_storages);
        return out;
      });
}

}  // namespace tvm_smartmem
