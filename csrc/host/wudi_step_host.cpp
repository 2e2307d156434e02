// Runs the CUDA kernel's per-element WUDI gradient + Adam step (wudi_adam_step.h) on the host,
// for tests/test_cuda_host_step.py, which compares it bit for bit with torch on the CPU.
//
// Build (either; contraction must stay off, see wudi_adam_step.h):
//   g++  -std=c++17 -O2 -ffp-contract=off -Icsrc csrc/host/wudi_step_host.cpp -o wudi_step_host
//   nvcc -x cu -std=c++17 -O2 -Xcompiler -ffp-contract=off -Icsrc csrc/host/wudi_step_host.cpp -o wudi_step_host
// Usage: wudi_step_host INPUT OUTPUT
//
// INPUT, little-endian, no padding:
//   int64 n, int64 steps; float32 tau[n], B[n];
//   then for each step: float64 scalars[6] (the arguments wudi_adam_step takes, in
//   AdamStepScalars order), float32 P[n].
// OUTPUT: for each step, float32 tau[n], exp_avg[n], exp_avg_sq[n] after that step
// (exp_avg and exp_avg_sq start at zero, as in adam_loop).
#include <cstdint>
#include <cstdio>
#include <vector>

#include "common.h"
#include "wudi_adam_step.h"

namespace {

template <typename T>
bool read_exactly(std::FILE* f, T* data, size_t count) {
  return std::fread(data, sizeof(T), count, f) == count;
}

template <typename T>
bool write_exactly(std::FILE* f, const std::vector<T>& data) {
  return std::fwrite(data.data(), sizeof(T), data.size(), f) == data.size();
}

int fail(const char* what) {
  std::fprintf(stderr, "wudi_step_host: %s\n", what);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return fail("usage: wudi_step_host INPUT OUTPUT");
  std::FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) return fail("cannot open INPUT");
  int64_t n = 0, steps = 0;
  if (!read_exactly(in, &n, 1) || !read_exactly(in, &steps, 1) || n < 0 || steps < 0) {
    return fail("bad header");
  }
  const size_t count = static_cast<size_t>(n);
  std::vector<float> tau(count), b(count), p(count), exp_avg(count, 0.0f), exp_avg_sq(count, 0.0f);
  if (!read_exactly(in, tau.data(), count) || !read_exactly(in, b.data(), count)) return fail("short tau/B");
  std::FILE* out = std::fopen(argv[2], "wb");
  if (out == nullptr) return fail("cannot open OUTPUT");
  for (int64_t step = 0; step < steps; ++step) {
    double scalars[6];
    if (!read_exactly(in, scalars, 6) || !read_exactly(in, p.data(), count)) return fail("short step input");
    // the double -> float conversions bindings.cpp applies before launching the kernel
    const tritonmerge::AdamStepScalars s{static_cast<float>(scalars[0]), static_cast<float>(scalars[1]),
                                         static_cast<float>(scalars[2]), static_cast<float>(scalars[3]),
                                         static_cast<float>(scalars[4]), static_cast<float>(scalars[5])};
    for (size_t i = 0; i < count; ++i) tritonmerge::wudi_adam_element(tau[i], exp_avg[i], exp_avg_sq[i], p[i], b[i], s);
    if (!write_exactly(out, tau) || !write_exactly(out, exp_avg) || !write_exactly(out, exp_avg_sq)) {
      return fail("write failed");
    }
  }
  std::fclose(in);
  return std::fclose(out) == 0 ? 0 : fail("close failed");
}
