// What the LibTorch glue of kernels/cuda/*.cc shares: launching on the right device and stream,
// turning a launcher's error into an exception, and small arrays of structs copied to the device.
// Generic c10 headers only, never c10/cuda or ATen/cuda: this compiles against a CPU-only
// LibTorch too (CI's), where nothing in it is ever called.
#pragma once

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/torch.h>

#include <cstring>
#include <type_traits>
#include <vector>

namespace peerd::kernels::cuda {

// The launchers enqueue on the legacy default stream; work LibTorch puts on another stream would
// not be ordered with theirs, so such a call is refused rather than raced.
inline void CheckDefaultStream(const torch::Device& device) {
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(device.type());
  TORCH_CHECK(impl->getStream(device) == impl->getDefaultStream(device),
              "peerd's CUDA kernels run on the default stream, but LibTorch's current stream on ", device,
              " is another");
}

inline void CheckLaunch(const char* error, const char* what) { TORCH_CHECK(error == nullptr, what, ": ", error); }

// items as a device buffer (a byte tensor, which keeps it alive); read it through DataOf<T>.
template <typename T>
torch::Tensor ToDevice(const std::vector<T>& items, const torch::Device& device) {
  static_assert(std::is_trivially_copyable_v<T>, "copied as bytes");
  torch::Tensor host = torch::empty({static_cast<int64_t>(items.size() * sizeof(T))}, torch::kUInt8);
  if (!items.empty()) std::memcpy(host.data_ptr(), items.data(), items.size() * sizeof(T));
  return host.to(device);
}

template <typename T>
const T* DataOf(const torch::Tensor& bytes) {
  return reinterpret_cast<const T*>(bytes.data_ptr());
}

inline void CheckOn(const torch::Tensor& t, const torch::Device& device, const char* what) {
  TORCH_CHECK(t.device() == device, what, " must be on ", device, ", not ", t.device());
}

}  // namespace peerd::kernels::cuda
