// Instantiates the CPU kernels three times (the baseline ISA and, on x86-64 with GCC/Clang,
// AVX2+FMA and AVX-512 F/BW/DQ/VL+FMA variants selected at run time) and dispatches between
// them.  The AVX2 and AVX-512 code is confined to functions with internal linkage, defined
// after every header, so nothing compiled for them can be picked by the linker for callers
// on CPUs without them.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

#include "ms_deform_attn_cpu.h"

#if !defined(__GNUC__) && !defined(__clang__)
#error "the CPU kernels use GCC/Clang vector extensions: build with GCC or Clang"
#endif

#if defined(__x86_64__)
#define PSF_HAS_X86_VARIANTS 1
#else
#define PSF_HAS_X86_VARIANTS 0
#endif

// Vectors wider than the baseline's in (inlined, internal) function signatures: GCC notes an
// ABI change that cannot matter here.
#pragma GCC diagnostic ignored "-Wpsabi"

// The per-sample helpers of the kernels are inlined, so the hot loops have no calls.
#define PSF_INLINE inline __attribute__((always_inline))

namespace panoptic_segformer {
namespace cpu {

#define PSF_VEC_BYTES 16
namespace baseline {
namespace {
#include "ms_deform_attn_cpu_vec.inc"
#include "ms_deform_attn_cpu_kernels.inc"
}  // namespace
}  // namespace baseline
#undef PSF_VEC_BYTES

#if PSF_HAS_X86_VARIANTS
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define PSF_VEC_BYTES 32
namespace avx2 {
namespace {
#include "ms_deform_attn_cpu_vec.inc"
#include "ms_deform_attn_cpu_kernels.inc"
}  // namespace
}  // namespace avx2
#undef PSF_VEC_BYTES
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif
#define PSF_VEC_BYTES 64
namespace avx512 {
namespace {
#include "ms_deform_attn_cpu_vec.inc"
#include "ms_deform_attn_cpu_kernels.inc"
}  // namespace
}  // namespace avx512
#undef PSF_VEC_BYTES
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace {
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

Isa widest_supported() {
#if PSF_HAS_X86_VARIANTS
  static const Isa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

// -1 = auto, else a forced Isa
std::atomic<int> g_forced{-1};

Isa current_isa() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  return forced < 0 ? widest_supported() : static_cast<Isa>(forced);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}
}  // namespace

const char* kernel_isa() { return isa_name(current_isa()); }

void set_kernel_isa(const std::string& isa) {
  if (isa == "auto") {
    g_forced.store(-1);
    return;
  }
  for (Isa cand : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512}) {
    if (isa != isa_name(cand)) continue;
    TORCH_CHECK(static_cast<int>(cand) <= static_cast<int>(widest_supported()), "kernel isa '", isa,
                "' is not available on this CPU/build (widest: '", isa_name(widest_supported()), "')");
    g_forced.store(static_cast<int>(cand));
    return;
  }
  TORCH_CHECK(false, "kernel isa must be 'auto', 'baseline', 'avx2' or 'avx512', got '", isa, "'");
}

template <typename scalar_t, typename loc_t>
void forward_dispatch(const scalar_t* value, const loc_t* loc, const loc_t* attn, scalar_t* out, const Sizes& z,
                      const std::vector<Level>& levels) {
#if PSF_HAS_X86_VARIANTS
  switch (current_isa()) {
    case Isa::kAvx512: return avx512::forward_kernel(value, loc, attn, out, z, levels);
    case Isa::kAvx2: return avx2::forward_kernel(value, loc, attn, out, z, levels);
    default: break;
  }
#endif
  baseline::forward_kernel(value, loc, attn, out, z, levels);
}

template <typename scalar_t, typename loc_t>
void backward_dispatch(const scalar_t* value, const loc_t* loc, const loc_t* attn, const scalar_t* grad_out,
                       at::opmath_type<scalar_t>* grad_value_acc, loc_t* grad_loc, loc_t* grad_attn, const Sizes& z,
                       const std::vector<Level>& levels, int64_t chunks) {
#if PSF_HAS_X86_VARIANTS
  switch (current_isa()) {
    case Isa::kAvx512:
      return avx512::backward_kernel(value, loc, attn, grad_out, grad_value_acc, grad_loc, grad_attn, z, levels,
                                     chunks);
    case Isa::kAvx2:
      return avx2::backward_kernel(value, loc, attn, grad_out, grad_value_acc, grad_loc, grad_attn, z, levels,
                                   chunks);
    default: break;
  }
#endif
  baseline::backward_kernel(value, loc, attn, grad_out, grad_value_acc, grad_loc, grad_attn, z, levels, chunks);
}

#define PSF_INSTANTIATE(T, L)                                                                                   \
  template void forward_dispatch<T, L>(const T*, const L*, const L*, T*, const Sizes&, const std::vector<Level>&); \
  template void backward_dispatch<T, L>(const T*, const L*, const L*, const T*, at::opmath_type<T>*, L*, L*,     \
                                        const Sizes&, const std::vector<Level>&, int64_t);
PSF_INSTANTIATE(double, double)
PSF_INSTANTIATE(float, float)
PSF_INSTANTIATE(c10::BFloat16, c10::BFloat16)
PSF_INSTANTIATE(c10::BFloat16, float)
PSF_INSTANTIATE(c10::Half, c10::Half)
PSF_INSTANTIATE(c10::Half, float)
#undef PSF_INSTANTIATE

}  // namespace cpu
}  // namespace panoptic_segformer
