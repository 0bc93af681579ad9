/*
 * Stand-in for TVM's <tvm/support/io.h>, which the apache-tvm wheel's <tvm/runtime/tensor.h>
 * includes but does not ship.  tensor.h only uses it in inline (de)serialisation helpers this
 * runtime never calls, so declarations are enough: nothing here is ever defined or emitted.
 * It sits on the include path after the wheel's own headers, so a wheel that ships the real
 * file wins.
 */
#ifndef TVM_SMARTMEM_SHIM_TVM_SUPPORT_IO_H_
#define TVM_SMARTMEM_SHIM_TVM_SUPPORT_IO_H_

#include <tvm/ffi/endian.h>

#include <cstddef>

namespace tvm {
namespace support {

class Stream {
 public:
  virtual ~Stream() = default;
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;
  template <typename T>
  void Write(const T& data);
  template <typename T>
  bool Read(T* out);
  template <typename T>
  void WriteArray(const T* data, size_t num_elems);
  template <typename T>
  bool ReadArray(T* data, size_t num_elems);
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SMARTMEM_SHIM_TVM_SUPPORT_IO_H_
