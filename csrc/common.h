// Shared declarations between the CUDA kernels (compiled by nvcc, no torch headers) and the
// torch glue in bindings.cpp (compiled by the host compiler, no CUDA headers). Keeping this
// interface to raw pointers and plain scalars lets every .cu file be compile-checked against
// the CUDA toolkit alone, whatever torch build is installed.
#pragma once

#include <cstdint>

namespace tritonmerge {

// Per-step scalars of torch.optim.Adam's single-tensor update, already rounded the way the
// CUDA torch kernels round them (all float): see tritonmerge/ops/wudi_solve.py.
struct AdamStepScalars {
  float lerp_weight;       // 1 - beta1            (exp_avg.lerp_(grad, 1 - beta1))
  float beta2;             // beta2                (exp_avg_sq.mul_(beta2))
  float one_minus_beta2;   // 1 - beta2            (.addcmul_(grad, grad, value=1 - beta2))
  float inv_bc2_sqrt;      // 1 / float(sqrt(1 - beta2^t)) in float: CUDA torch's reciprocal of a CPU divisor
  float eps;               // eps                  (.add_(eps))
  float neg_step_size;     // -lr / (1 - beta1^t)  (param.addcdiv_(exp_avg, denom, value=-step_size))
};

// Fused WUDI gradient + Adam update over n contiguous float32 elements (a whole batch of
// same-shaped layers at once): grad = 2 (P - B); exp_avg, exp_avg_sq and tau updated in place.
// `stream` is a cudaStream_t. Returns nullptr on success, else the CUDA error string.
const char* wudi_adam_step_launch(float* tau, float* exp_avg, float* exp_avg_sq, const float* P,
                                  const float* B, int64_t n, AdamStepScalars s, void* stream);

}  // namespace tritonmerge
