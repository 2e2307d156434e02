// Torch-facing API of tritonmerge._C: argument checks and the pybind11 module. Compiled by the
// host compiler; it includes no CUDA header (the kernels' interface is common.h), so it also
// compiles against a CPU-only torch for checking.
#include <torch/extension.h>

#include <string>

#include "common.h"

#define TM_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define TM_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define TM_CHECK_FLOAT(x) TORCH_CHECK((x).scalar_type() == at::kFloat, #x " must be float32, got ", (x).scalar_type())
#define TM_CHECK_INPUT(x) \
  TM_CHECK_CUDA(x);       \
  TM_CHECK_CONTIGUOUS(x); \
  TM_CHECK_FLOAT(x)

namespace {

void wudi_adam_step(at::Tensor tau, at::Tensor exp_avg, at::Tensor exp_avg_sq, const at::Tensor& P,
                    const at::Tensor& B, double lerp_weight, double beta2, double one_minus_beta2,
                    double inv_bc2_sqrt, double eps, double neg_step_size, int64_t stream) {
  TM_CHECK_INPUT(tau);
  TM_CHECK_INPUT(exp_avg);
  TM_CHECK_INPUT(exp_avg_sq);
  TM_CHECK_INPUT(P);
  TM_CHECK_INPUT(B);
  for (const at::Tensor* t : {static_cast<const at::Tensor*>(&exp_avg), static_cast<const at::Tensor*>(&exp_avg_sq), &P, &B}) {
    TORCH_CHECK(t->sizes() == tau.sizes(), "wudi_adam_step: all tensors must have tau's shape ", tau.sizes(),
                ", got ", t->sizes());
    TORCH_CHECK(t->device() == tau.device(), "wudi_adam_step: all tensors must be on ", tau.device());
  }
  c10::DeviceGuard guard(tau.device());
  // scalars rounded to float exactly as torch's kernels convert their Scalar arguments
  const tritonmerge::AdamStepScalars s{static_cast<float>(lerp_weight),  static_cast<float>(beta2),
                                       static_cast<float>(one_minus_beta2), static_cast<float>(inv_bc2_sqrt),
                                       static_cast<float>(eps),          static_cast<float>(neg_step_size)};
  const char* err = tritonmerge::wudi_adam_step_launch(
      tau.data_ptr<float>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), P.data_ptr<float>(),
      B.data_ptr<float>(), tau.numel(), s, reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "wudi_adam_step: CUDA launch failed: ", err ? err : "");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tritonmerge CUDA kernels (batched WUDI Adam step)";
  m.def("wudi_adam_step", &wudi_adam_step,
        "Fused WUDI gradient 2(P - B) + torch.optim.Adam update of tau, exp_avg, exp_avg_sq (in place) "
        "on the given cudaStream_t",
        py::arg("tau"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("P"), py::arg("B"),
        py::arg("lerp_weight"), py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("inv_bc2_sqrt"),
        py::arg("eps"), py::arg("neg_step_size"), py::arg("stream"));
}
