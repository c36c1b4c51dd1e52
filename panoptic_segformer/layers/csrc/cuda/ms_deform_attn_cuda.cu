// CUDA kernels of multi-scale deformable attention (MSDA) for panoptic_segformer.
//
// Build notes (read by setup.py):
//   * No extra nvcc flags are required beyond the defaults of torch.utils.cpp_extension
//     (CUDAExtension / BuildExtension). Those defaults include --expt-relaxed-constexpr,
//     which IS needed: without it nvcc warns that c10::BFloat16's float->bf16 rounding
//     calls a constexpr host function from device code. Keep the default
//     -D__CUDA_NO_HALF_OPERATORS__ / -D__CUDA_NO_HALF_CONVERSIONS__ /
//     -D__CUDA_NO_BFLOAT16_CONVERSIONS__ / -D__CUDA_NO_HALF2_OPERATORS__: the kernels only
//     touch half/bf16 through c10::Half / c10::BFloat16 conversions and do all arithmetic
//     and atomics in float (double for double), so they build with or without them.
//   * Recommended: "-O3". Do NOT add --use_fast_math (the fp32 tests compare with
//     F.grid_sample at 1e-5 absolute). The C++ standard is whatever cpp_extension picks
//     (C++17 for older PyTorch, C++20 for torch >= 2.10); the code is valid in both.
//   * Targets: sm_80, sm_86, sm_89, sm_90 (+PTX), e.g.
//     TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0+PTX" (verified with nvcc 13.0). Nothing is
//     arch-specific: no half/bf16 atomics or intrinsics are used (a CAS loop would replace
//     the native double atomicAdd below sm_60, which these toolkits no longer target).
//   * Only uses headers/APIs present since PyTorch 2.1; does not include
//     ATen/cuda/CUDAContext.h (which pulls cusparse.h). Does not depend on -DWITH_CUDA.
//
// Operators (schemas are defined in ../ms_deform_attn.cpp, namespace panoptic_segformer):
//   ms_deform_attn_forward(value, spatial_shapes, level_start_index,
//                          sampling_locations, attention_weights) -> output
//   ms_deform_attn_backward(..., grad_output)
//       -> (grad_value, grad_sampling_locations, grad_attention_weights)
//
// Shapes: value (N, S, M, D); spatial_shapes (L, 2) int64 as (H, W); level_start_index
// (L,) int64; sampling_locations (N, Lq, M, L, P, 2) in [0, 1], x then y;
// attention_weights (N, Lq, M, L, P); output (N, Lq, M*D) in the dtype of value.
//
// Semantics are those of F.grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False): pixel x = loc_x * W - 0.5 (y likewise) and neighbours outside
// the map contribute zero, to the output and to every gradient.  Non-finite numbers behave
// as in the CPU reference (float32/float64 F.grid_sample on the CPU) and as in our CPU
// kernels: a location whose 2*loc or loc*W is NaN/Inf in its dtype gives a NaN sample, a
// sample outside the map is 0 (so a NaN/Inf weight on it gives NaN), and every product is
// formed in the reference's order (weight * sample, grad_sample = weight * grad_output), so
// NaN/Inf in value, weights and grad_output end up where the reference puts them.
//
// dtypes: value in float32 / float64 / float16 / bfloat16. sampling_locations and
// attention_weights share one dtype: the dtype of value, or float32 when value is
// float16/bfloat16 (keeps sub-pixel precision of the locations under AMP, where they
// are naturally fp32). Accumulation is in float (double for double). For half/bf16 the
// value gradient is accumulated in a float32 buffer and cast once at the end.
//
// Design:
//   forward : one thread per output element (n, q, m, d), looping over (l, p).
//             Consecutive threads are consecutive channels d, so the four corner reads
//             of every sample are coalesced and the location / weight reads are warp
//             broadcasts. Works for any D.
//   backward: one warp per (n, q, m). Lanes stride over the D channels (any D; lanes
//             past D idle). Per (l, p) every lane accumulates its partial sums of
//             grad_attention and of d(out)/dx, d(out)/dy over its channels and
//             scatters into grad_value with coalesced float/double atomicAdd; three
//             warp shuffle reductions then give the per-(n, q, m, l, p) gradients,
//             which lane 0 writes exactly once (so those outputs need no zero-fill
//             and no atomics). __launch_bounds__(256, 3) caps it at 80 registers
//             (3 blocks = 24 warps per SM; ptxas reports an 8-byte spill for fp32).
//   All offsets are 64-bit; grid-stride loops cover any size. spatial_shapes and
//   level_start_index are read from device memory inside the kernels (no host sync);
//   a level that would index outside value trips a device-side assert (an error that
//   raises, not silent garbage or an out-of-bounds access). Every launch is followed by
//   C10_CUDA_KERNEL_LAUNCH_CHECK(), so a failed launch raises; kernels run on the current
//   stream under a device guard; empty problems launch nothing.

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

constexpr int kThreads = 256;  // threads per block, a multiple of the warp size
constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
// Grid-stride loops take over beyond this many blocks (far below the 2^31 - 1 limit).
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

inline unsigned int num_blocks(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks, kMaxBlocks)));
}

__device__ __forceinline__ float floor_acc(float v) { return floorf(v); }
__device__ __forceinline__ float nan_acc(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double nan_acc(double) { return __longlong_as_double(0x7ff8000000000000LL); }
__device__ __forceinline__ double floor_acc(double v) { return ::floor(v); }

__device__ __forceinline__ void atomic_add_acc(float* address, float v) { atomicAdd(address, v); }

__device__ __forceinline__ void atomic_add_acc(double* address, double v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  // No native double atomicAdd before sm_60; not among our targets, kept for safety.
  auto* addr = reinterpret_cast<unsigned long long*>(address);
  unsigned long long old = *addr;
  unsigned long long assumed;
  do {
    assumed = old;
    old = atomicCAS(addr, assumed, __double_as_longlong(v + __longlong_as_double(assumed)));
  } while (assumed != old);
#else
  atomicAdd(address, v);
#endif
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return ::fma(a, b, c); }

// Pixel coordinate of a normalised location. Mathematically loc * size - 0.5, but computed
// exactly as PyTorch's CUDA F.grid_sample does it (grid = 2 * loc - 1, then
// ((grid + 1) * size - 1) / 2, which nvcc contracts to one fma): with sizes ~100-200 an
// fp32 pixel coordinate only resolves ~1e-5 px, so a different rounding alone would
// move fp32 outputs by ~1e-5 and break the 1e-5 agreement with the reference. The fma
// is explicit so the result does not depend on -fmad. (2 * loc is exact, so
// 2 * loc - 1 rounds once whether or not it is contracted.)
template <typename acc_t>
__device__ __forceinline__ acc_t pixel_coord(acc_t loc, acc_t size) {
  const acc_t grid = acc_t(2) * loc - acc_t(1);
  return fma_acc(grid + acc_t(1), size, acc_t(-1)) * acc_t(0.5);
}

// Level metadata read from device memory. Trips a device-side assert (reported as a
// CUDA error, raised by the next synchronising call) rather than reading out of bounds.
struct Level {
  int64_t h, w, start;
};

__device__ __forceinline__ Level load_level(const int64_t* __restrict__ spatial_shapes,
                                            const int64_t* __restrict__ level_start_index,
                                            int l, int64_t S) {
  Level lv;
  lv.h = spatial_shapes[2 * l];
  lv.w = spatial_shapes[2 * l + 1];
  lv.start = level_start_index[l];
  // overflow-safe form of start + h * w <= S (the host cannot see device-side shapes)
  CUDA_KERNEL_ASSERT(lv.h > 0 && lv.w > 0 && lv.start >= 0 && lv.start <= S && lv.h <= (S - lv.start) / lv.w);
  return lv;
}

// The four bilinear corners of one sample: element offsets relative to the level base
// (in units of value elements, i.e. already multiplied by the pixel stride M*D), whether
// each corner is inside the map, and the interpolation weights.
template <typename acc_t>
struct Corners {
  int64_t o00, o01, o10, o11;  // (y0,x0) (y0,x1) (y1,x0) (y1,x1)
  bool in00, in01, in10, in11;
  acc_t lx, ly, hx, hy;
};

template <typename acc_t>
__device__ __forceinline__ bool sample_in_range(acc_t x, acc_t y, acc_t wf, acc_t hf) {
  // Outside this range all four corners are outside the map (NaN also fails here).
  return x >= acc_t(-1) && x < wf && y >= acc_t(-1) && y < hf;
}

// False when the reference's pixel coordinate is NaN or infinite: it computes 2 * loc - 1 and
// then (g + 1) * size / 2 in the location dtype, so either product overflowing gives NaN.
template <typename loc_t>
__device__ __forceinline__ bool reference_coord_finite(loc_t loc, int64_t size) {
  using op_t = at::opmath_type<loc_t>;
  const op_t l = static_cast<op_t>(loc);
  const op_t twice = static_cast<op_t>(static_cast<loc_t>(l * op_t(2)));
  const op_t scaled = static_cast<op_t>(static_cast<loc_t>(l * static_cast<op_t>(size)));
  return isfinite(twice) && isfinite(scaled);
}

// Corners of any sample, as the reference sees them: NaN fractions on an axis whose
// coordinate is not finite (fx / fy false); no corner in the map unless in range, so floor(x)
// is only converted to an integer for coordinates in [-1, w).
template <typename acc_t>
__device__ __forceinline__ Corners<acc_t> make_corners(acc_t x, acc_t y, bool fx, bool fy, int64_t h, int64_t w,
                                                       int64_t pixel_stride) {
  Corners<acc_t> c;
  const acc_t nan = nan_acc(acc_t(0));
  if (fx && fy && sample_in_range(x, y, static_cast<acc_t>(w), static_cast<acc_t>(h))) {
    const acc_t xf = floor_acc(x);
    const acc_t yf = floor_acc(y);
    const int64_t x0 = static_cast<int64_t>(xf);
    const int64_t y0 = static_cast<int64_t>(yf);
    c.lx = x - xf;
    c.ly = y - yf;
    c.in00 = y0 >= 0 && x0 >= 0;
    c.in01 = y0 >= 0 && x0 + 1 < w;
    c.in10 = y0 + 1 < h && x0 >= 0;
    c.in11 = y0 + 1 < h && x0 + 1 < w;
    c.o00 = (y0 * w + x0) * pixel_stride;
  } else {
    // outside the map: only whether the fractions are finite matters (all values are 0)
    c.lx = fx ? acc_t(0) : nan;
    c.ly = fy ? acc_t(0) : nan;
    c.in00 = c.in01 = c.in10 = c.in11 = false;
    c.o00 = 0;
  }
  c.hx = acc_t(1) - c.lx;
  c.hy = acc_t(1) - c.ly;
  c.o01 = c.o00 + pixel_stride;
  c.o10 = c.o00 + w * pixel_stride;
  c.o11 = c.o10 + pixel_stride;
  return c;
}

// --------------------------------------------------------------------------- forward
template <typename scalar_t, typename loc_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
ms_deform_attn_forward_kernel(const scalar_t* __restrict__ value,
                              const int64_t* __restrict__ spatial_shapes,
                              const int64_t* __restrict__ level_start_index,
                              const loc_t* __restrict__ sampling_loc,
                              const loc_t* __restrict__ attn_weight,
                              scalar_t* __restrict__ output,
                              int64_t total,  // N * Lq * M * D
                              int64_t S, int64_t Lq, int64_t M, int64_t D, int L, int P) {
  const int64_t pixel_stride = M * D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t d = idx % D;
    const int64_t nqm = idx / D;  // ((n * Lq + q) * M + m)
    const int64_t m = nqm % M;
    const int64_t n = nqm / (M * Lq);
    const scalar_t* v_nm = value + n * S * pixel_stride + m * D + d;
    const loc_t* loc = sampling_loc + nqm * L * P * 2;
    const loc_t* aw = attn_weight + nqm * L * P;

    acc_t acc = acc_t(0);
    for (int l = 0; l < L; ++l) {
      const Level lv = load_level(spatial_shapes, level_start_index, l, S);
      const acc_t wf = static_cast<acc_t>(lv.w);
      const acc_t hf = static_cast<acc_t>(lv.h);
      const scalar_t* v_level = v_nm + lv.start * pixel_stride;
      for (int p = 0; p < P; ++p, loc += 2, ++aw) {
        const acc_t x = pixel_coord(static_cast<acc_t>(loc[0]), wf);
        const acc_t y = pixel_coord(static_cast<acc_t>(loc[1]), hf);
        const Corners<acc_t> c = make_corners(x, y, reference_coord_finite(loc[0], lv.w),
                                              reference_coord_finite(loc[1], lv.h), lv.h, lv.w, pixel_stride);
        const acc_t v00 = c.in00 ? static_cast<acc_t>(v_level[c.o00]) : acc_t(0);
        const acc_t v01 = c.in01 ? static_cast<acc_t>(v_level[c.o01]) : acc_t(0);
        const acc_t v10 = c.in10 ? static_cast<acc_t>(v_level[c.o10]) : acc_t(0);
        const acc_t v11 = c.in11 ? static_cast<acc_t>(v_level[c.o11]) : acc_t(0);
        // outside the map s = 0 and adds nothing, unless the weight is NaN/Inf (0 * Inf = NaN)
        const acc_t s = c.hy * c.hx * v00 + c.hy * c.lx * v01 + c.ly * c.hx * v10 + c.ly * c.lx * v11;
        acc += static_cast<acc_t>(*aw) * s;
      }
    }
    output[idx] = static_cast<scalar_t>(acc);
  }
}

// --------------------------------------------------------------------------- backward
template <typename scalar_t, typename loc_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 3)
ms_deform_attn_backward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ spatial_shapes,
                               const int64_t* __restrict__ level_start_index,
                               const loc_t* __restrict__ sampling_loc,
                               const loc_t* __restrict__ attn_weight,
                               const scalar_t* __restrict__ grad_output,
                               acc_t* __restrict__ grad_value,  // float / double buffer
                               loc_t* __restrict__ grad_loc,
                               loc_t* __restrict__ grad_attn,
                               int64_t num_nqm,  // N * Lq * M
                               int64_t S, int64_t Lq, int64_t M, int64_t D, int L, int P) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t pixel_stride = M * D;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // The loop bound is uniform across a warp, so every lane reaches every shuffle.
  for (int64_t nqm = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       nqm < num_nqm; nqm += warp_stride) {
    const int64_t m = nqm % M;
    const int64_t n = nqm / (M * Lq);
    const int64_t base_nm = n * S * pixel_stride + m * D;  // value[n, 0, m, 0]
    const scalar_t* go = grad_output + nqm * D;
    const int64_t lp0 = nqm * L * P;
    const loc_t* loc = sampling_loc + lp0 * 2;
    const loc_t* aw = attn_weight + lp0;
    loc_t* g_loc = grad_loc + lp0 * 2;
    loc_t* g_aw = grad_attn + lp0;

    for (int l = 0; l < L; ++l) {
      const Level lv = load_level(spatial_shapes, level_start_index, l, S);
      const acc_t wf = static_cast<acc_t>(lv.w);
      const acc_t hf = static_cast<acc_t>(lv.h);
      const int64_t level_base = base_nm + lv.start * pixel_stride;
      const scalar_t* v_level = value + level_base;
      acc_t* gv_level = grad_value + level_base;
      for (int p = 0; p < P; ++p, loc += 2, ++aw, g_loc += 2, ++g_aw) {
        const acc_t x = pixel_coord(static_cast<acc_t>(loc[0]), wf);
        const acc_t y = pixel_coord(static_cast<acc_t>(loc[1]), hf);
        const Corners<acc_t> c = make_corners(x, y, reference_coord_finite(loc[0], lv.w),
                                              reference_coord_finite(loc[1], lv.h), lv.h, lv.w, pixel_stride);
        const acc_t weight = static_cast<acc_t>(*aw);
        const acc_t w00 = c.hy * c.hx, w01 = c.hy * c.lx;
        const acc_t w10 = c.ly * c.hx, w11 = c.ly * c.lx;
        acc_t g_w = acc_t(0), g_x = acc_t(0), g_y = acc_t(0);
        // Every sample runs the loop (one outside the map reads no value, but a NaN/Inf weight
        // or grad_output still makes its gradients NaN, as in the reference).
        for (int64_t d = lane; d < D; d += kWarpSize) {
          const acc_t g = static_cast<acc_t>(go[d]);
          const acc_t g_sample = weight * g;  // gradient of the sample, as the reference forms it
          const acc_t v00 = c.in00 ? static_cast<acc_t>(v_level[c.o00 + d]) : acc_t(0);
          const acc_t v01 = c.in01 ? static_cast<acc_t>(v_level[c.o01 + d]) : acc_t(0);
          const acc_t v10 = c.in10 ? static_cast<acc_t>(v_level[c.o10 + d]) : acc_t(0);
          const acc_t v11 = c.in11 ? static_cast<acc_t>(v_level[c.o11 + d]) : acc_t(0);
          g_w += g * (w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11);
          g_x += g_sample * (c.hy * (v01 - v00) + c.ly * (v11 - v10));
          g_y += g_sample * (c.hx * (v10 - v00) + c.lx * (v11 - v01));
          if (c.in00) atomic_add_acc(gv_level + c.o00 + d, w00 * g_sample);
          if (c.in01) atomic_add_acc(gv_level + c.o01 + d, w01 * g_sample);
          if (c.in10) atomic_add_acc(gv_level + c.o10 + d, w10 * g_sample);
          if (c.in11) atomic_add_acc(gv_level + c.o11 + d, w11 * g_sample);
        }
        g_w = warp_sum(g_w);
        g_x = warp_sum(g_x);
        g_y = warp_sum(g_y);
        if (lane == 0) {
          // d out / d loc_x = d out / d x * W   (x = loc_x * W - 0.5)
          g_aw[0] = static_cast<loc_t>(g_w);
          g_loc[0] = static_cast<loc_t>(g_x * wf);
          g_loc[1] = static_cast<loc_t>(g_y * hf);
        }
      }
    }
  }
}

// --------------------------------------------------------------------------- host side
struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

Dims check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                  const at::Tensor& attn_weight, const char* op) {
  TORCH_CHECK(value.is_cuda(), op, ": value must be a CUDA tensor, got device ", value.device());
  const auto device = value.device();
  auto same_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device,
                " (the device of value), got ", t.device());
  };
  same_device(spatial_shapes, "spatial_shapes");
  same_device(level_start_index, "level_start_index");
  same_device(sampling_loc, "sampling_locations");
  same_device(attn_weight, "attention_weights");

  TORCH_CHECK(value.dim() == 4, op, ": value must be 4-d (N, S, M, D), got shape ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op,
              ": spatial_shapes must have shape (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1, op, ": level_start_index must be 1-d (L,), got shape ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_loc.dim() == 6, op,
              ": sampling_locations must be 6-d (N, Lq, M, L, P, 2), got shape ", sampling_loc.sizes());
  TORCH_CHECK(attn_weight.dim() == 5, op,
              ": attention_weights must be 5-d (N, Lq, M, L, P), got shape ", attn_weight.sizes());

  Dims s;
  s.N = value.size(0);
  s.S = value.size(1);
  s.M = value.size(2);
  s.D = value.size(3);
  s.Lq = sampling_loc.size(1);
  s.L = spatial_shapes.size(0);
  s.P = sampling_loc.size(4);
  TORCH_CHECK(level_start_index.size(0) == s.L, op, ": level_start_index must have L = ", s.L,
              " entries, got ", level_start_index.size(0));
  TORCH_CHECK(sampling_loc.size(0) == s.N && sampling_loc.size(2) == s.M && sampling_loc.size(3) == s.L &&
                  sampling_loc.size(5) == 2,
              op, ": sampling_locations must have shape (N=", s.N, ", Lq, M=", s.M, ", L=", s.L,
              ", P, 2), got ", sampling_loc.sizes());
  TORCH_CHECK(attn_weight.sizes() == sampling_loc.sizes().slice(0, 5), op,
              ": attention_weights must have shape ", sampling_loc.sizes().slice(0, 5),
              " (sampling_locations without the last dim), got ", attn_weight.sizes());
  TORCH_CHECK(s.L <= INT32_MAX && s.P <= INT32_MAX, op, ": too many levels or points");

  const auto vt = value.scalar_type();
  TORCH_CHECK(vt == at::kFloat || vt == at::kDouble || vt == at::kHalf || vt == at::kBFloat16, op,
              ": value must be float32, float64, float16 or bfloat16, got ", vt);
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, op, ": spatial_shapes must be int64, got ",
              spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, op,
              ": level_start_index must be int64, got ", level_start_index.scalar_type());
  const auto lt = sampling_loc.scalar_type();
  TORCH_CHECK(attn_weight.scalar_type() == lt, op,
              ": sampling_locations and attention_weights must have the same dtype, got ", lt, " and ",
              attn_weight.scalar_type());
  const bool reduced = vt == at::kHalf || vt == at::kBFloat16;
  TORCH_CHECK(lt == vt || (reduced && lt == at::kFloat), op,
              ": sampling_locations / attention_weights must have the dtype of value (", vt,
              (reduced ? ") or float32" : ")"), ", got ", lt);

  TORCH_CHECK(value.is_contiguous(), op, ": value must be contiguous");
  TORCH_CHECK(spatial_shapes.is_contiguous(), op, ": spatial_shapes must be contiguous");
  TORCH_CHECK(level_start_index.is_contiguous(), op, ": level_start_index must be contiguous");
  TORCH_CHECK(sampling_loc.is_contiguous(), op, ": sampling_locations must be contiguous");
  TORCH_CHECK(attn_weight.is_contiguous(), op, ": attention_weights must be contiguous");
  return s;
}

// The second accepted location/weight dtype: float for half/bf16 values; for float and
// double it is the value dtype itself (check_inputs rejects anything else), so no dead
// kernel is instantiated.
template <typename T> struct AltLoc { using type = T; };
template <> struct AltLoc<c10::Half> { using type = float; };
template <> struct AltLoc<c10::BFloat16> { using type = float; };

// Dispatch over value dtype (scalar_t) and then over the location/weight dtype (loc_t:
// scalar_t, or float for half/bf16 values).
#define MSDA_DISPATCH(VALUE, LOC, NAME, ...)                                                \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (VALUE).scalar_type(), NAME, [&] { \
    using acc_t = at::opmath_type<scalar_t>;                                                \
    if ((LOC).scalar_type() == (VALUE).scalar_type()) {                                     \
      using loc_t = scalar_t;                                                               \
      __VA_ARGS__();                                                                        \
    } else {                                                                                \
      using loc_t = typename AltLoc<scalar_t>::type;                                        \
      __VA_ARGS__();                                                                        \
    }                                                                                       \
  })

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  const char* op = "panoptic_segformer::ms_deform_attn_forward (CUDA)";
  const Dims s = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, op);
  const c10::cuda::CUDAGuard guard(value.device());

  const int64_t total = s.N * s.Lq * s.M * s.D;
  if (total == 0) {
    return at::zeros({s.N, s.Lq, s.M * s.D}, value.options());
  }
  at::Tensor output = at::empty({s.N, s.Lq, s.M * s.D}, value.options());  // every element written
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  MSDA_DISPATCH(value, sampling_loc, "ms_deform_attn_forward_cuda", [&] {
    ms_deform_attn_forward_kernel<scalar_t, loc_t, acc_t>
        <<<num_blocks(total, kThreads), kThreads, 0, stream>>>(
            value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<loc_t>(),
            attn_weight.data_ptr<loc_t>(), output.data_ptr<scalar_t>(), total, s.S, s.Lq, s.M, s.D,
            static_cast<int>(s.L), static_cast<int>(s.P));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_loc, const at::Tensor& attn_weight, const at::Tensor& grad_output) {
  const char* op = "panoptic_segformer::ms_deform_attn_backward (CUDA)";
  const Dims s = check_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, op);
  TORCH_CHECK(grad_output.device() == value.device(), op, ": grad_output must be on ", value.device(),
              ", got ", grad_output.device());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), op, ": grad_output must have dtype ",
              value.scalar_type(), " (the dtype of value), got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.N && grad_output.size(1) == s.Lq &&
                  grad_output.size(2) == s.M * s.D,
              op, ": grad_output must have shape (N=", s.N, ", Lq=", s.Lq, ", M*D=", s.M * s.D, "), got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.is_contiguous(), op, ": grad_output must be contiguous");
  const c10::cuda::CUDAGuard guard(value.device());

  const auto vt = value.scalar_type();
  const bool reduced = vt == at::kHalf || vt == at::kBFloat16;
  // grad_value accumulates with atomics: float32 buffer for half/bf16, else in place.
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(reduced ? at::kFloat : vt));
  const int64_t num_nqm = s.N * s.Lq * s.M;
  const bool empty = num_nqm == 0 || s.D == 0 || s.L == 0 || s.P == 0;
  // Written once per element by the kernel; zero-filled only when nothing is launched.
  at::Tensor grad_loc = empty ? at::zeros(sampling_loc.sizes(), sampling_loc.options())
                              : at::empty(sampling_loc.sizes(), sampling_loc.options());
  at::Tensor grad_attn = empty ? at::zeros(attn_weight.sizes(), attn_weight.options())
                               : at::empty(attn_weight.sizes(), attn_weight.options());

  if (!empty) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    MSDA_DISPATCH(value, sampling_loc, "ms_deform_attn_backward_cuda", [&] {
      ms_deform_attn_backward_kernel<scalar_t, loc_t, acc_t>
          <<<num_blocks(num_nqm, kWarpsPerBlock), kThreads, 0, stream>>>(
              value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
              level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<loc_t>(),
              attn_weight.data_ptr<loc_t>(), grad_output.data_ptr<scalar_t>(),
              grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<loc_t>(), grad_attn.data_ptr<loc_t>(),
              num_nqm, s.S, s.Lq, s.M, s.D, static_cast<int>(s.L), static_cast<int>(s.P));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor grad_value = reduced ? grad_value_acc.to(vt) : grad_value_acc;
  return std::make_tuple(grad_value, grad_loc, grad_attn);
}

#undef MSDA_DISPATCH

}  // namespace

TORCH_LIBRARY_IMPL(panoptic_segformer, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}
