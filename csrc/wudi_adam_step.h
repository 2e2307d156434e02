// The per-element arithmetic of the fused WUDI gradient + Adam kernel (wudi_adam.cu), shared
// with a host build so that tests can check it bit for bit against torch on a machine without
// a GPU (tests/test_cuda_host_step.py, csrc/host/wudi_step_host.cpp).
//
// Every rounding is explicit. On the device the __f*_rn intrinsics keep nvcc from contracting
// across what were separate torch kernels. On the host the same operations are plain IEEE
// float operations and std::fmaf, which round identically only if the host compiler does not
// contract them either: host builds need -ffp-contract=off (g++/clang; with nvcc pass it
// through -Xcompiler) and no -ffast-math.
#pragma once

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

#include "common.h"

#if defined(__CUDACC__)
#define TRITONMERGE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TRITONMERGE_HOST_DEVICE inline
#endif

namespace tritonmerge {
namespace round_nearest {

TRITONMERGE_HOST_DEVICE float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

TRITONMERGE_HOST_DEVICE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

TRITONMERGE_HOST_DEVICE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

TRITONMERGE_HOST_DEVICE float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

TRITONMERGE_HOST_DEVICE float sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// a * b + c with a single rounding
TRITONMERGE_HOST_DEVICE float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}

}  // namespace round_nearest

// One element of one step: grad = 2 (p - b), then torch.optim.Adam's single-tensor update of
// (tau, m = exp_avg, v = exp_avg_sq), rounded as the CUDA torch kernels round it, including
// where they round between kernels and where nvcc contracts one kernel's expression into an FMA.
TRITONMERGE_HOST_DEVICE void wudi_adam_element(float& tau, float& m, float& v, float p, float b,
                                               const AdamStepScalars& s) {
  namespace rn = round_nearest;
  // grad = 2 * (P - B): torch.sub then .mul_(2) (the doubling is exact)
  const float g = 2.0f * rn::sub(p, b);
  // exp_avg.lerp_(grad, w), w < 0.5: self + w * (end - self)  (ATen/native/Lerp.h)
  m = rn::fma(s.lerp_weight, rn::sub(g, m), m);
  // exp_avg_sq.mul_(beta2), then .addcmul_(g, g, value): a + value * (b * c)
  v = rn::fma(s.one_minus_beta2, rn::mul(g, g), rn::mul(v, s.beta2));
  // denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps): three kernels, three roundings
  const float denom = rn::add(rn::mul(rn::sqrt(v), s.inv_bc2_sqrt), s.eps);
  // param.addcdiv_(exp_avg, denom, value=-step_size): a + value * (b / c)
  tau = rn::fma(s.neg_step_size, rn::div(m, denom), tau);
}

}  // namespace tritonmerge
