// A stand-in CUDA device for tracing the CUDA program's memory on a machine without a GPU
// (runtime/fake_cuda.py loads it before `import torch`). Only metadata ever touches it:
// every tensor on it is a FakeTensor, so no kernel runs and nothing is allocated.
//
// - CUDA hooks that say CUDA is built and available (autograd asks before it runs a
//   backward on a cuda tensor: hasPrimaryContext);
// - a no-op device guard (c10's FakeGuardImpl) for the CUDA device type;
// - SDPA's backend chooser for CUDA tensors, which the CPU wheel lacks (so
//   scaled_dot_product_attention would take the math path): it returns the backend the
//   traced program asks for, so the fused kernels' ops (and what they save) are traced,
//   and PyTorch's ring attention, which hooks those ops, can run.
// Tested with torch 2.13.0 only (runtime/fake_cuda.py refuses others).
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace autoplan_fake {
struct CUDAHooks : public at::CUDAHooksInterface {
  CUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 8; }
  int getNumGPUs() const override { return 8; }
  c10::DeviceIndex current_device() const override { return 0; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  void deviceSynchronize(c10::DeviceIndex) const override {}
};
}  // namespace autoplan_fake

namespace at {
using autoplan_fake::CUDAHooks;
REGISTER_CUDA_HOOKS(CUDAHooks);
}
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);

#include <ATen/native/transformers/attention.h>
#include <ATen/native/DispatchStub.h>

// SDPA's backend choice for CUDA tensors: the CPU wheel registers no CUDA chooser, so
// scaled_dot_product_attention would fall back to the math path. Return the backend the
// traced program asks for (SDPBackend: 1 flash, 2 efficient, 3 cuDNN).
static int64_t g_sdpa_backend = 1;
extern "C" void autoplan_set_sdpa_backend(int64_t backend) { g_sdpa_backend = backend; }
static int64_t fake_sdp_choice(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, double, bool, std::optional<double>, bool) {
  return g_sdpa_backend;
}
namespace at::native {
REGISTER_CUDA_DISPATCH(_fused_sdp_choice_stub, &fake_sdp_choice)
}
