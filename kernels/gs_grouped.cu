// Optional CUDA extension of gsoft: one block-diagonal pass y = W x (or W^T x) over the rows of x, and its gradients.
//
// It covers the one-pass GS cases (see gsoft/kernels/ops.py): n_factors = 1 (OFT-style block-diagonal rotation) and
// n_factors = 2 with block_size | n_blocks, multiplied through the dense b^2 x b^2 groups built in torch. Every group
// is at most GSOFT_MAX_GROUP wide, so a whole group lives in shared memory.
//
// * gs_grouped_forward(x, w, transpose): x (N, nb * bs) with any row stride and unit column stride, w (nb, bs, bs);
//   out[row, k bs + i] = sum_j W_k[i, j] x[row, k bs + j] (W_k^T with transpose). Thread block: one group k and
//   GSOFT_ROWS rows; the group and the x tile are staged in shared memory (fp32), each thread owns output columns.
// * gs_grouped_weight_grad(g, x, transpose, splits): partial sums dW_k[i, j] = sum_rows g[row, k bs + i] x[row, k bs + j]
//   over `splits` chunks of rows, returned as (splits, nb, bs, bs) fp32; the caller adds them (deterministic).
// * The input gradient is gs_grouped_forward(g, w, !transpose).
//
// Accumulation is in fp32 for fp16 / bf16 / fp32 inputs (fp64 for fp64); outputs have the input's dtype.
// Compile check without torch: nvcc -c -DGSOFT_KERNELS_ONLY kernels/gs_grouped.cu

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#ifndef GSOFT_MAX_GROUP
#define GSOFT_MAX_GROUP 64
#endif
#define GSOFT_ROWS 32

namespace gsoft {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) { return static_cast<typename Acc<T>::type>(v); }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// grid: (ceil(N / GSOFT_ROWS), nb); block: (GSOFT_MAX_GROUP) threads, thread t computes output column t of the group
// for every row of the tile. W is read in the precision of the blocks (WT: float or double).
template <typename T, typename WT>
__global__ void grouped_forward_kernel(const T* __restrict__ x, const WT* __restrict__ w, T* __restrict__ out,
                                       long long n_rows, long long stride_x, long long stride_out, int bs,
                                       bool transpose) {
  using A = typename Acc<T>::type;
  __shared__ A w_s[GSOFT_MAX_GROUP * GSOFT_MAX_GROUP];
  __shared__ A x_s[GSOFT_ROWS * GSOFT_MAX_GROUP];
  const int k = blockIdx.y;
  const long long row0 = static_cast<long long>(blockIdx.x) * GSOFT_ROWS;
  const WT* w_k = w + static_cast<long long>(k) * bs * bs;
  for (int e = threadIdx.x; e < bs * bs; e += blockDim.x) {
    const int i = e / bs, j = e % bs;  // w_s[i * bs + j] is the coefficient of x_j in y_i
    w_s[e] = static_cast<A>(transpose ? w_k[j * bs + i] : w_k[i * bs + j]);
  }
  for (int e = threadIdx.x; e < GSOFT_ROWS * bs; e += blockDim.x) {
    const int r = e / bs, j = e % bs;
    const long long row = row0 + r;
    x_s[r * bs + j] = row < n_rows ? to_acc<T>(x[row * stride_x + static_cast<long long>(k) * bs + j]) : A(0);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < bs; i += blockDim.x) {
    for (int r = 0; r < GSOFT_ROWS; ++r) {
      const long long row = row0 + r;
      if (row >= n_rows) break;
      A acc = A(0);
      for (int j = 0; j < bs; ++j) acc += w_s[i * bs + j] * x_s[r * bs + j];
      out[row * stride_out + static_cast<long long>(k) * bs + i] = from_acc<T>(acc);
    }
  }
}

// grid: (splits, nb); block: (GSOFT_MAX_GROUP) threads; thread t accumulates row i = t of dW_k (all columns j) over
// the split's rows, staging GSOFT_ROWS rows of g and x at a time in shared memory.
template <typename T>
__global__ void grouped_weight_grad_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                           typename Acc<T>::type* __restrict__ partial, long long n_rows,
                                           long long rows_per_split, long long stride_g, long long stride_x, int nb,
                                           int bs, bool transpose) {
  using A = typename Acc<T>::type;
  __shared__ A g_s[GSOFT_ROWS * GSOFT_MAX_GROUP];
  __shared__ A x_s[GSOFT_ROWS * GSOFT_MAX_GROUP];
  const int split = blockIdx.x, k = blockIdx.y;
  const long long start = static_cast<long long>(split) * rows_per_split;
  const long long end = start + rows_per_split < n_rows ? start + rows_per_split : n_rows;
  A acc[GSOFT_MAX_GROUP];  // fully unrolled loops below keep it in registers
#pragma unroll
  for (int j = 0; j < GSOFT_MAX_GROUP; ++j) acc[j] = A(0);
  const int i = threadIdx.x;
  for (long long row0 = start; row0 < end; row0 += GSOFT_ROWS) {
    __syncthreads();
    for (int e = threadIdx.x; e < GSOFT_ROWS * bs; e += blockDim.x) {
      const int r = e / bs, c = e % bs;
      const long long row = row0 + r;
      const bool ok = row < end;
      const long long col = static_cast<long long>(k) * bs + c;
      g_s[e] = ok ? to_acc<T>(g[row * stride_g + col]) : A(0);
      x_s[e] = ok ? to_acc<T>(x[row * stride_x + col]) : A(0);
    }
    __syncthreads();
    if (i < bs) {
      for (int r = 0; r < GSOFT_ROWS; ++r) {
        const A gi = g_s[r * bs + i];
#pragma unroll
        for (int j = 0; j < GSOFT_MAX_GROUP; ++j) {
          if (j < bs) acc[j] += gi * x_s[r * bs + j];
        }
      }
    }
  }
  if (i < bs) {
    A* out = partial + (static_cast<long long>(split) * nb + k) * bs * bs;
#pragma unroll
    for (int j = 0; j < GSOFT_MAX_GROUP; ++j) {
      if (j < bs) {
        if (transpose) out[j * bs + i] = acc[j];
        else out[i * bs + j] = acc[j];
      }
    }
  }
}

#ifdef GSOFT_KERNELS_ONLY
// Instantiate every kernel the extension launches, so that a torch-free compile check compiles them all.
#define GSOFT_INSTANTIATE(T, WT)                                                                                   \
  template __global__ void grouped_forward_kernel<T, WT>(const T*, const WT*, T*, long long, long long, long long, \
                                                         int, bool);                                               \
  template __global__ void grouped_weight_grad_kernel<T>(const T*, const T*, typename Acc<T>::type*, long long,  \
                                                         long long, long long, long long, int, int, bool);
GSOFT_INSTANTIATE(float, float)
GSOFT_INSTANTIATE(double, double)
GSOFT_INSTANTIATE(__half, float)
GSOFT_INSTANTIATE(__nv_bfloat16, float)
#endif

}  // namespace gsoft

#ifndef GSOFT_KERNELS_ONLY
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

namespace {

void check_inputs(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda(), "gsoft CUDA extension: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.size(1) == w.size(2), "gsoft CUDA extension: bad shapes");
  TORCH_CHECK(x.size(1) == w.size(0) * w.size(1), "gsoft CUDA extension: x does not match the blocks");
  TORCH_CHECK(w.size(1) <= GSOFT_MAX_GROUP, "gsoft CUDA extension: blocks larger than ", GSOFT_MAX_GROUP);
  TORCH_CHECK(x.stride(1) == 1, "gsoft CUDA extension: x needs unit column stride");
}

}  // namespace

torch::Tensor gs_grouped_forward(torch::Tensor x, torch::Tensor w, bool transpose) {
  check_inputs(x, w);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto w_acc = w.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  const long long n_rows = x.size(0);
  const int nb = static_cast<int>(w.size(0)), bs = static_cast<int>(w.size(1));
  if (n_rows == 0) return out;
  const dim3 grid(static_cast<unsigned>((n_rows + GSOFT_ROWS - 1) / GSOFT_ROWS), nb);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gs_grouped_forward", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half,
              std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16, scalar_t>>;
    using WT = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    gsoft::grouped_forward_kernel<T, WT><<<grid, GSOFT_MAX_GROUP, 0, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), w_acc.data_ptr<WT>(),
        reinterpret_cast<T*>(out.data_ptr<scalar_t>()), n_rows, x.stride(0), out.stride(0), bs, transpose);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor gs_grouped_weight_grad(torch::Tensor g, torch::Tensor x, int64_t nb, bool transpose, int64_t splits) {
  TORCH_CHECK(g.is_cuda() && x.is_cuda() && g.sizes() == x.sizes() && g.dim() == 2, "gsoft CUDA extension: bad grad");
  TORCH_CHECK(g.stride(1) == 1 && x.stride(1) == 1, "gsoft CUDA extension: inputs need unit column stride");
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), "gsoft CUDA extension: grad and input dtypes differ");
  const c10::cuda::CUDAGuard guard(x.device());
  const long long n_rows = x.size(0);
  const int bs = static_cast<int>(x.size(1) / nb);
  TORCH_CHECK(bs <= GSOFT_MAX_GROUP, "gsoft CUDA extension: blocks larger than ", GSOFT_MAX_GROUP);
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, std::max<long long>(1, n_rows)));
  const long long rows_per_split = (n_rows + splits - 1) / splits;
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto partial = torch::zeros({splits, nb, bs, bs}, x.options().dtype(acc_type));
  if (n_rows == 0) return partial;
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(nb));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gs_grouped_weight_grad", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half,
              std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16, scalar_t>>;
    using A = typename gsoft::Acc<T>::type;
    gsoft::grouped_weight_grad_kernel<T><<<grid, GSOFT_MAX_GROUP, 0, stream>>>(
        reinterpret_cast<const T*>(g.data_ptr<scalar_t>()), reinterpret_cast<const T*>(x.data_ptr<scalar_t>()),
        partial.data_ptr<A>(), n_rows, rows_per_split, g.stride(0), x.stride(0), static_cast<int>(nb), bs, transpose);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &gs_grouped_forward, "y = W x per row (block-diagonal W, one pass)");
  m.def("weight_grad", &gs_grouped_weight_grad, "partial sums of dW over row chunks");
}
#endif
