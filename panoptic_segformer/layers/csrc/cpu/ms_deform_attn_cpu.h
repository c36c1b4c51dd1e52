// Declarations shared by the CPU multi-scale deformable attention files: problem sizes,
// argument checks and the kernel entry points (defined in ms_deform_attn_cpu_kernels.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace panoptic_segformer {
namespace cpu {

struct Level {
  int64_t h, w, start;
};

struct Sizes {
  int64_t n, s, m, d, lq, l, p;
};

// Checks devices, ranks, sizes, dtypes and the level table (overflow-safe, so the kernels
// never index out of range) and returns the problem sizes plus the per-level (H, W, start)
// table.  Messages start with `op` and name the offending argument.
Sizes check_and_read_levels(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights, std::vector<Level>& levels);

// The location/weight dtype besides scalar_t: float for a float16/bfloat16 value (for float
// and double it is scalar_t itself, so no extra kernel is instantiated).
template <typename T> struct AltLoc { using type = T; };
template <> struct AltLoc<c10::Half> { using type = float; };
template <> struct AltLoc<c10::BFloat16> { using type = float; };

// Runs the lambda __VA_ARGS__ with `loc_t` = the C++ type of LOC_DTYPE (scalar_t or its
// AltLoc; check_and_read_levels admits no other).
#define PSF_DISPATCH_LOC_TYPE(SCALAR, LOC_DTYPE, ...)                      \
  do {                                                                     \
    if ((LOC_DTYPE) == c10::CppTypeToScalarType<SCALAR>::value) {          \
      using loc_t = SCALAR;                                                \
      __VA_ARGS__();                                                       \
    } else {                                                               \
      using loc_t = typename AltLoc<SCALAR>::type;                         \
      __VA_ARGS__();                                                       \
    }                                                                      \
  } while (0)

// Runs the kernels with the widest instruction set this CPU supports (AVX-512, AVX2+FMA or
// the baseline build).  scalar_t: dtype of value, output and grad_output; loc_t: dtype of the
// locations, weights and their gradients (scalar_t, or float for a float16/bfloat16 value).
template <typename scalar_t, typename loc_t>
void forward_dispatch(const scalar_t* value, const loc_t* loc, const loc_t* attn, scalar_t* out, const Sizes& z,
                      const std::vector<Level>& levels);
template <typename scalar_t, typename loc_t>
void backward_dispatch(const scalar_t* value, const loc_t* loc, const loc_t* attn, const scalar_t* grad_out,
                       at::opmath_type<scalar_t>* grad_value_acc, loc_t* grad_loc, loc_t* grad_attn, const Sizes& z,
                       const std::vector<Level>& levels, int64_t chunks);

// Name of the kernel variant in use: "avx512", "avx2" or "baseline".  set_kernel_isa forces
// one ("baseline", "avx2", "avx512"; an error when this CPU or build lacks it) or restores the
// default ("auto"); used by the tests and the benchmark.
const char* kernel_isa();
void set_kernel_isa(const std::string& isa);

}  // namespace cpu
}  // namespace panoptic_segformer
