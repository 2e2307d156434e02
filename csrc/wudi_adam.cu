// Fused gradient + Adam epilogue of the batched WUDI solver (tritonmerge/ops/wudi_solve.py).
//
// One step of the solver is P = tau·G (a cuBLAS GEMM issued by torch) followed by this kernel,
// which replaces the nine elementwise torch kernels of the reference loop
// (sub, mul, lerp_, mul_, addcmul_, sqrt, div, add_, addcdiv_): 5 reads + 3 writes of 4 bytes
// per element instead of about 22 memory passes.
//
// Rounding follows the CUDA torch kernels op by op, including where they round between kernels
// and where nvcc contracts one kernel's expression into an FMA; the explicit __f*_rn intrinsics
// pin that down so nvcc cannot contract across what were separate torch kernels.
#include <cuda_runtime.h>

#include "common.h"

namespace tritonmerge {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void adam_element(float& tau, float& m, float& v, float p, float b,
                                             const AdamStepScalars& s) {
  // grad = 2 * (P - B): torch.sub then .mul_(2) (the doubling is exact)
  const float g = 2.0f * __fsub_rn(p, b);
  // exp_avg.lerp_(grad, w), w < 0.5: self + w * (end - self)  (ATen/native/Lerp.h)
  m = __fmaf_rn(s.lerp_weight, __fsub_rn(g, m), m);
  // exp_avg_sq.mul_(beta2), then .addcmul_(g, g, value): a + value * (b * c)
  v = __fmaf_rn(s.one_minus_beta2, __fmul_rn(g, g), __fmul_rn(v, s.beta2));
  // denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps): three kernels, three roundings
  const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), s.inv_bc2_sqrt), s.eps);
  // param.addcdiv_(exp_avg, denom, value=-step_size): a + value * (b / c)
  tau = __fmaf_rn(s.neg_step_size, __fdiv_rn(m, denom), tau);
}

__global__ void wudi_adam_step_kernel(float* __restrict__ tau, float* __restrict__ exp_avg,
                                      float* __restrict__ exp_avg_sq, const float* __restrict__ P,
                                      const float* __restrict__ B, int64_t n, AdamStepScalars s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float t = tau[i], m = exp_avg[i], v = exp_avg_sq[i];
    adam_element(t, m, v, P[i], B[i], s);
    tau[i] = t;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

// 16-byte accesses: the kernel is bandwidth-bound (32 bytes per element)
__global__ void wudi_adam_step_kernel_vec4(float4* __restrict__ tau, float4* __restrict__ exp_avg,
                                           float4* __restrict__ exp_avg_sq, const float4* __restrict__ P,
                                           const float4* __restrict__ B, int64_t n4, AdamStepScalars s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4; i += stride) {
    float4 t = tau[i], m = exp_avg[i], v = exp_avg_sq[i];
    const float4 p = P[i], b = B[i];
    adam_element(t.x, m.x, v.x, p.x, b.x, s);
    adam_element(t.y, m.y, v.y, p.y, b.y, s);
    adam_element(t.z, m.z, v.z, p.z, b.z, s);
    adam_element(t.w, m.w, v.w, p.w, b.w, s);
    tau[i] = t;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int grid_for(int64_t work) {
  // enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

const char* wudi_adam_step_launch(float* tau, float* exp_avg, float* exp_avg_sq, const float* P,
                                  const float* B, int64_t n, AdamStepScalars s, void* stream) {
  if (n == 0) return nullptr;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool vec = (n % 4 == 0) && aligned16(tau) && aligned16(exp_avg) && aligned16(exp_avg_sq) &&
                   aligned16(P) && aligned16(B);
  if (vec) {
    const int64_t n4 = n / 4;
    wudi_adam_step_kernel_vec4<<<grid_for(n4), kThreads, 0, st>>>(
        reinterpret_cast<float4*>(tau), reinterpret_cast<float4*>(exp_avg),
        reinterpret_cast<float4*>(exp_avg_sq), reinterpret_cast<const float4*>(P),
        reinterpret_cast<const float4*>(B), n4, s);
  } else {
    wudi_adam_step_kernel<<<grid_for(n), kThreads, 0, st>>>(tau, exp_avg, exp_avg_sq, P, B, n, s);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace tritonmerge
