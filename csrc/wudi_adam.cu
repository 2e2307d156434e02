// Fused gradient + Adam epilogue of the batched WUDI solver (tritonmerge/ops/wudi_solve.py).
//
// One step of the solver is P = tau·G (a cuBLAS GEMM issued by torch) followed by this kernel,
// which replaces the nine elementwise torch kernels of the reference loop
// (sub, mul, lerp_, mul_, addcmul_, sqrt, div, add_, addcdiv_): 5 reads + 3 writes of 4 bytes
// per element instead of about 22 memory passes.
//
// The per-element arithmetic, and how it follows the CUDA torch kernels' rounding, is in
// wudi_adam_step.h, where a host build can test it without a GPU.
#include <cuda_runtime.h>

#include "common.h"
#include "wudi_adam_step.h"

namespace tritonmerge {
namespace {

constexpr int kThreads = 256;

__global__ void wudi_adam_step_kernel(float* __restrict__ tau, float* __restrict__ exp_avg,
                                      float* __restrict__ exp_avg_sq, const float* __restrict__ P,
                                      const float* __restrict__ B, int64_t n, AdamStepScalars s) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float t = tau[i], m = exp_avg[i], v = exp_avg_sq[i];
    wudi_adam_element(t, m, v, P[i], B[i], s);
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
    wudi_adam_element(t.x, m.x, v.x, p.x, b.x, s);
    wudi_adam_element(t.y, m.y, v.y, p.y, b.y, s);
    wudi_adam_element(t.z, m.z, v.z, p.z, b.z, s);
    wudi_adam_element(t.w, m.w, v.w, p.w, b.w, s);
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
