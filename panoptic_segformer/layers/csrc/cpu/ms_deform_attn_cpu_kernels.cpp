// Instantiates the CPU kernels twice (baseline ISA and, on x86-64 with GCC/Clang, an
// AVX2+FMA variant selected at run time) and dispatches between them.  The AVX2 code is
// confined to functions with internal linkage, so nothing compiled for AVX2 can be picked
// by the linker for callers on CPUs without it.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>

#include "ms_deform_attn_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PSF_HAS_AVX2_VARIANT 1
#else
#define PSF_HAS_AVX2_VARIANT 0
#endif

namespace panoptic_segformer {
namespace cpu {

namespace baseline {
namespace {
#include "ms_deform_attn_cpu_kernels.inc"
}  // namespace
}  // namespace baseline

#if PSF_HAS_AVX2_VARIANT
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
namespace {
#include "ms_deform_attn_cpu_kernels.inc"
}  // namespace
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace {
// 0 = auto, 1 = forced baseline
std::atomic<int> g_isa_override{0};

bool use_avx2() {
#if PSF_HAS_AVX2_VARIANT
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported && g_isa_override.load(std::memory_order_relaxed) == 0;
#else
  return false;
#endif
}
}  // namespace

const char* kernel_isa() { return use_avx2() ? "avx2" : "baseline"; }

void set_kernel_isa(const std::string& isa) {
  TORCH_CHECK(isa == "auto" || isa == "baseline", "kernel isa must be 'auto' or 'baseline', got '", isa, "'");
  g_isa_override.store(isa == "baseline" ? 1 : 0);
}

template <typename scalar_t>
void forward_dispatch(const scalar_t* value, const scalar_t* loc, const scalar_t* attn, scalar_t* out,
                      const Sizes& z, const std::vector<Level>& levels) {
#if PSF_HAS_AVX2_VARIANT
  if (use_avx2()) return avx2::forward_kernel<scalar_t>(value, loc, attn, out, z, levels);
#endif
  baseline::forward_kernel<scalar_t>(value, loc, attn, out, z, levels);
}

template <typename scalar_t>
void backward_dispatch(const scalar_t* value, const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                       at::opmath_type<scalar_t>* grad_value_acc, scalar_t* grad_loc, scalar_t* grad_attn,
                       const Sizes& z, const std::vector<Level>& levels, int64_t chunks) {
#if PSF_HAS_AVX2_VARIANT
  if (use_avx2()) {
    return avx2::backward_kernel<scalar_t>(value, loc, attn, grad_out, grad_value_acc, grad_loc, grad_attn, z,
                                           levels, chunks);
  }
#endif
  baseline::backward_kernel<scalar_t>(value, loc, attn, grad_out, grad_value_acc, grad_loc, grad_attn, z, levels,
                                      chunks);
}

#define PSF_INSTANTIATE(T)                                                                                  \
  template void forward_dispatch<T>(const T*, const T*, const T*, T*, const Sizes&, const std::vector<Level>&); \
  template void backward_dispatch<T>(const T*, const T*, const T*, const T*, at::opmath_type<T>*, T*, T*,     \
                                     const Sizes&, const std::vector<Level>&, int64_t);
PSF_INSTANTIATE(double)
PSF_INSTANTIATE(float)
PSF_INSTANTIATE(c10::BFloat16)
PSF_INSTANTIATE(c10::Half)
#undef PSF_INSTANTIATE

}  // namespace cpu
}  // namespace panoptic_segformer
