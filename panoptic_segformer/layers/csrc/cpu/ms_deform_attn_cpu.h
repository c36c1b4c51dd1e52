// Declarations shared by the CPU multi-scale deformable attention files: problem sizes,
// argument checks and the kernel entry points (defined in ms_deform_attn_cpu_kernels.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

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

// Checks ranks, sizes, dtypes and level bounds (so the kernels never read out of range)
// and returns the problem sizes plus the per-level (H, W, start) table.
Sizes check_and_read_levels(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights, std::vector<Level>& levels);

// Runs the kernels with the widest instruction set this CPU supports (AVX2+FMA on x86-64
// when the compiler supports per-function targets, else the baseline build).
template <typename scalar_t>
void forward_dispatch(const scalar_t* value, const scalar_t* loc, const scalar_t* attn, scalar_t* out,
                      const Sizes& z, const std::vector<Level>& levels);
template <typename scalar_t>
void backward_dispatch(const scalar_t* value, const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                       at::opmath_type<scalar_t>* grad_value_acc, scalar_t* grad_loc, scalar_t* grad_attn,
                       const Sizes& z, const std::vector<Level>& levels, int64_t chunks);

// Name of the kernel variant in use ("avx2" or "baseline"); set_kernel_isa("baseline")
// forces the baseline kernels and "auto" restores the default (used by the tests).
const char* kernel_isa();
void set_kernel_isa(const std::string& isa);

}  // namespace cpu
}  // namespace panoptic_segformer
