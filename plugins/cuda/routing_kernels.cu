// CUDA build of the routing C ABI (routing_kernels.h). Per-element rules come from routing_math.h,
// which the host reference build (routing_host.cpp) shares; plugins/ops.py is the spec.
//
// Shapes are small (n_vis ~ 576-2880 visual tokens, seq_len ~ 1-4k), so the kernels favour
// simple, deterministic work over clever scans: selection ranks each token against all others
// (O(n_vis^2) comparisons, cheap at these sizes), and every reduction has a fixed order.
#include "routing_math.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

namespace
{
constexpr int kThreads = 256;
thread_local char g_last_error[256] = "";

int32_t fail(int32_t code, char const* why)
{
    snprintf(g_last_error, sizeof(g_last_error), "%s", why);
    return code;
}

int32_t check(cudaError_t status, char const* what)
{
    if (status == cudaSuccess)
        return MLLM_OK;
    snprintf(g_last_error, sizeof(g_last_error), "%s: %s", what, cudaGetErrorString(status));
    return MLLM_ERR_CUDA;
}

unsigned blocks_for(int64_t items)
{
    int64_t const blocks = (items + kThreads - 1) / kThreads;
    return (unsigned) (blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks));
}

// ---- TokenSelect ------------------------------------------------------------------------------------
__global__ void select_flags(float const* __restrict__ scores, int64_t n_vis, int64_t k, int32_t* selected)
{
    int64_t const i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x;
    if (i >= n_vis)
        return;
    float const score = scores[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < n_vis && rank < k; ++j)
        rank += mllm::ranks_before(scores[j], j, score, i) ? 1 : 0;
    selected[i] = rank < k ? 1 : 0;
}

__global__ void select_visual_rows(int32_t const* __restrict__ selected, int64_t const* vis_start, int64_t n_vis,
    int64_t seq_len, int64_t* rows_out)
{
    int64_t const i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x;
    if (i >= n_vis || !selected[i])
        return;
    int64_t const start = mllm::clamp_vis_start(vis_start[0], n_vis, seq_len);
    int64_t slot = 0;
    for (int64_t j = 0; j < i; ++j)
        slot += selected[j];
    rows_out[start + slot] = start + i;
}

template <typename Element>
__global__ void gather_rows(Element const* __restrict__ data, int64_t const* __restrict__ positions,
    int64_t const* vis_start, Element* __restrict__ data_out, int64_t* positions_out, int64_t* rows_out,
    int64_t seq_len, int64_t hidden, int64_t n_vis, int64_t k)
{
    int64_t const kept = seq_len - n_vis + k;
    int64_t const start = mllm::clamp_vis_start(vis_start[0], n_vis, seq_len);
    for (int64_t r = blockIdx.x; r < kept; r += gridDim.x)
    {
        bool const visual = r >= start && r < start + k;
        int64_t const source = mllm::select_source_row(r, start, n_vis, k, visual ? rows_out[r] : 0);
        if (threadIdx.x == 0)
        {
            if (!visual) // visual slots already hold their row (select_visual_rows)
                rows_out[r] = source;
            positions_out[r] = positions[source];
        }
        Element const* from = data + source * hidden;
        Element* to = data_out + r * hidden;
        for (int64_t d = threadIdx.x; d < hidden; d += blockDim.x)
            to[d] = from[d];
    }
}

// ---- TokenScatter -----------------------------------------------------------------------------------
__global__ void scatter_scale(void const* __restrict__ base, void const* __restrict__ skip_scale, void* out,
    int64_t seq_len, int64_t hidden, int32_t dtype)
{
    int64_t const total = seq_len * hidden;
    for (int64_t index = blockIdx.x * (int64_t) blockDim.x + threadIdx.x; index < total;
         index += (int64_t) gridDim.x * blockDim.x)
    {
        float const value
            = mllm::scaled(mllm::load_float(base, index, dtype), mllm::load_float(skip_scale, index / hidden, dtype));
        if (dtype == MLLM_DTYPE_FLOAT16)
            static_cast<uint16_t*>(out)[index] = mllm::float_to_half(value);
        else
            static_cast<float*>(out)[index] = value;
    }
}

template <typename Element>
__global__ void scatter_rows(Element const* __restrict__ updates, int64_t const* __restrict__ rows, Element* out,
    int64_t seq_len, int64_t hidden, int64_t n_rows)
{
    for (int64_t j = blockIdx.x; j < n_rows; j += gridDim.x)
    {
        int64_t const row = rows[j];
        if (row < 0 || row >= seq_len)
            continue;
        for (int64_t d = threadIdx.x; d < hidden; d += blockDim.x)
            out[row * hidden + d] = updates[j * hidden + d];
    }
}

// ---- VisualScore ------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float value)
{
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

__device__ __forceinline__ float warp_max(float value)
{
    for (int offset = 16; offset > 0; offset >>= 1)
        value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

// Fixed-order block reduction (deterministic); every thread gets the result. scratch: 32 floats.
template <bool IsMax>
__device__ float block_reduce(float value, float* scratch)
{
    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    int const warps = blockDim.x >> 5;
    value = IsMax ? warp_max(value) : warp_sum(value);
    __syncthreads(); // scratch may still be read by the previous reduction
    if (lane == 0)
        scratch[warp] = value;
    __syncthreads();
    value = threadIdx.x < warps ? scratch[threadIdx.x] : (IsMax ? -INFINITY : 0.0f);
    if (warp == 0)
        value = IsMax ? warp_max(value) : warp_sum(value);
    if (threadIdx.x == 0)
        scratch[0] = value;
    __syncthreads();
    return scratch[0];
}

// One block per row of q: for each head in order, logits over all keys (one warp per key),
// softmax, and the visual columns folded into reduced[r, :] by the head reduction.
__global__ void visual_rows(void const* __restrict__ q, void const* __restrict__ k,
    int64_t const* __restrict__ positions, int64_t const* vis_start, float* reduced, int64_t heads, int64_t kv_heads,
    int64_t q_len, int64_t seq_len, int64_t head_dim, int64_t n_vis, int32_t query_rows, int32_t head_reduction,
    float scale, int32_t dtype)
{
    extern __shared__ float shared[];
    float* logits = shared;             // [seq_len]
    float* q_row = logits + seq_len;    // [head_dim]
    float* scratch = q_row + head_dim;  // [32]
    int64_t const start = mllm::clamp_vis_start(vis_start[0], n_vis, seq_len);
    int64_t const first = mllm::first_scored_row(query_rows, start, n_vis, seq_len, q_len);
    int64_t const row = (seq_len - q_len) + blockIdx.x;
    if (row < first)
        return; // the whole block leaves together: not a query row
    int64_t const r = row - first;
    int64_t const groups = heads / kv_heads;
    int64_t const row_position = positions[row];
    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    int const warps = blockDim.x >> 5;
    float* out_row = reduced + r * n_vis;
    for (int64_t h = 0; h < heads; ++h)
    {
        int64_t const kv_head = h / groups;
        for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x)
            q_row[d] = mllm::load_float(q, (h * q_len + blockIdx.x) * head_dim + d, dtype);
        __syncthreads();
        for (int64_t t = warp; t < seq_len; t += warps)
        {
            int64_t const k_base = (kv_head * seq_len + t) * head_dim;
            float dot = 0.0f;
            for (int64_t d = lane; d < head_dim; d += 32)
                dot += q_row[d] * mllm::load_float(k, k_base + d, dtype);
            dot = warp_sum(dot);
            if (lane == 0)
                logits[t] = mllm::is_future(positions[t], row_position) ? -INFINITY : dot * scale;
        }
        __syncthreads();
        float row_max = -INFINITY;
        for (int64_t t = threadIdx.x; t < seq_len; t += blockDim.x)
            row_max = fmaxf(row_max, logits[t]);
        row_max = block_reduce<true>(row_max, scratch);
        float total = 0.0f;
        for (int64_t t = threadIdx.x; t < seq_len; t += blockDim.x)
            total += expf(logits[t] - row_max);
        total = block_reduce<false>(total, scratch);
        for (int64_t i = threadIdx.x; i < n_vis; i += blockDim.x)
        {
            float const probability = expf(logits[start + i] - row_max) / total;
            out_row[i] = mllm::reduce_heads(out_row[i], probability, (int32_t) h, head_reduction);
        }
        __syncthreads(); // logits and q_row are rewritten by the next head
    }
    for (int64_t i = threadIdx.x; i < n_vis; i += blockDim.x)
        out_row[i] = mllm::finish_heads(out_row[i], heads, head_reduction);
}

// One thread per visual token: head-reduced rows summed in row order, then combined.
__global__ void visual_combine(float const* __restrict__ reduced, int64_t const* vis_start, float* scores,
    int64_t q_len, int64_t seq_len, int64_t n_vis, int32_t query_rows, int32_t combine)
{
    int64_t const i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x;
    if (i >= n_vis)
        return;
    int64_t const start = mllm::clamp_vis_start(vis_start[0], n_vis, seq_len);
    int64_t const rows = seq_len - mllm::first_scored_row(query_rows, start, n_vis, seq_len, q_len);
    float all = 0.0f, self = 0.0f, cross = 0.0f;
    for (int64_t r = 0; r < rows; ++r)
    {
        float const value = reduced[r * n_vis + i];
        all += value;
        if (r < n_vis)
            self += value;
        else
            cross += value;
    }
    scores[i] = mllm::combine_rows(all, self, cross, rows, n_vis, combine);
}
} // namespace

extern "C" {

MLLM_API int32_t mllm_is_cuda_build(void)
{
    return 1;
}

MLLM_API int32_t mllm_device_count(int32_t* count)
{
    int devices = 0;
    cudaError_t const status = cudaGetDeviceCount(&devices);
    *count = status == cudaSuccess ? devices : 0;
    if (status != cudaSuccess)
        cudaGetLastError(); // "no device" is an answer here, not a sticky error
    return MLLM_OK;
}

MLLM_API int32_t mllm_malloc(void** ptr, size_t bytes)
{
    return check(cudaMalloc(ptr, bytes > 0 ? bytes : 1), "cudaMalloc");
}

MLLM_API int32_t mllm_free(void* ptr)
{
    return check(cudaFree(ptr), "cudaFree");
}

MLLM_API int32_t mllm_memcpy_to_device(void* dst, void const* src, size_t bytes)
{
    return check(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
}

MLLM_API int32_t mllm_memcpy_to_host(void* dst, void const* src, size_t bytes)
{
    return check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}

MLLM_API int32_t mllm_synchronize(void)
{
    return check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

MLLM_API char const* mllm_last_error(void)
{
    return g_last_error;
}

MLLM_API size_t mllm_token_select_workspace(int64_t n_vis)
{
    return (size_t) n_vis * sizeof(int32_t);
}

MLLM_API int32_t mllm_token_select(float const* scores, int64_t const* vis_start, void const* data,
    int64_t const* positions, void* data_out, int64_t* positions_out, int64_t* rows_out, int64_t seq_len,
    int64_t hidden, int64_t n_vis, int64_t k, int32_t dtype, void* workspace, void* stream)
{
    if (mllm::check_token_select(seq_len, hidden, n_vis, k, dtype) != MLLM_OK)
        return fail(MLLM_ERR_ARGUMENT, "token_select: bad sizes, k or dtype");
    cudaStream_t const s = static_cast<cudaStream_t>(stream);
    int32_t* selected = static_cast<int32_t*>(workspace);
    unsigned const vis_blocks = blocks_for(n_vis);
    select_flags<<<vis_blocks, kThreads, 0, s>>>(scores, n_vis, k, selected);
    select_visual_rows<<<vis_blocks, kThreads, 0, s>>>(selected, vis_start, n_vis, seq_len, rows_out);
    int64_t const kept = seq_len - n_vis + k;
    unsigned const row_blocks = (unsigned) (kept < 65535 * 16 ? kept : 65535 * 16);
    if (dtype == MLLM_DTYPE_FLOAT16)
        gather_rows<uint16_t><<<row_blocks, kThreads, 0, s>>>(static_cast<uint16_t const*>(data), positions,
            vis_start, static_cast<uint16_t*>(data_out), positions_out, rows_out, seq_len, hidden, n_vis, k);
    else
        gather_rows<uint32_t><<<row_blocks, kThreads, 0, s>>>(static_cast<uint32_t const*>(data), positions,
            vis_start, static_cast<uint32_t*>(data_out), positions_out, rows_out, seq_len, hidden, n_vis, k);
    return check(cudaGetLastError(), "token_select launch");
}

MLLM_API int32_t mllm_token_scatter(void const* base, void const* updates, int64_t const* rows,
    void const* skip_scale, void* out, int64_t seq_len, int64_t hidden, int64_t n_rows, int32_t dtype,
    void* stream)
{
    if (mllm::check_token_scatter(seq_len, hidden, n_rows, dtype) != MLLM_OK)
        return fail(MLLM_ERR_ARGUMENT, "token_scatter: bad sizes or dtype");
    cudaStream_t const s = static_cast<cudaStream_t>(stream);
    size_t const bytes = (size_t) (seq_len * hidden * mllm::dtype_size(dtype));
    if (skip_scale == nullptr)
    {
        int32_t const status = check(cudaMemcpyAsync(out, base, bytes, cudaMemcpyDeviceToDevice, s), "copy base");
        if (status != MLLM_OK)
            return status;
    }
    else
    {
        scatter_scale<<<blocks_for(seq_len * hidden), kThreads, 0, s>>>(base, skip_scale, out, seq_len, hidden, dtype);
    }
    if (n_rows > 0)
    {
        unsigned const blocks = (unsigned) (n_rows < 65535 * 16 ? n_rows : 65535 * 16);
        if (dtype == MLLM_DTYPE_FLOAT16)
            scatter_rows<uint16_t><<<blocks, kThreads, 0, s>>>(
                static_cast<uint16_t const*>(updates), rows, static_cast<uint16_t*>(out), seq_len, hidden, n_rows);
        else
            scatter_rows<uint32_t><<<blocks, kThreads, 0, s>>>(
                static_cast<uint32_t const*>(updates), rows, static_cast<uint32_t*>(out), seq_len, hidden, n_rows);
    }
    return check(cudaGetLastError(), "token_scatter launch");
}

MLLM_API size_t mllm_visual_score_workspace(int64_t q_len, int64_t n_vis)
{
    return (size_t) q_len * (size_t) n_vis * sizeof(float);
}

MLLM_API int32_t mllm_visual_score(void const* q, void const* k, int64_t const* positions,
    int64_t const* vis_start, float* scores, int64_t heads, int64_t kv_heads, int64_t q_len, int64_t seq_len,
    int64_t head_dim, int64_t n_vis, int32_t query_rows, int32_t head_reduction, int32_t combine, float scale,
    int32_t dtype, void* workspace, void* stream)
{
    if (mllm::check_visual_score(
            heads, kv_heads, q_len, seq_len, head_dim, n_vis, query_rows, head_reduction, combine, dtype)
        != MLLM_OK)
        return fail(MLLM_ERR_ARGUMENT, "visual_score: bad sizes, attributes or dtype");
    cudaStream_t const s = static_cast<cudaStream_t>(stream);
    float* reduced = static_cast<float*>(workspace);
    size_t const shared_bytes = (size_t) (seq_len + head_dim + 32) * sizeof(float);
    visual_rows<<<(unsigned) q_len, kThreads, shared_bytes, s>>>(q, k, positions, vis_start, reduced, heads,
        kv_heads, q_len, seq_len, head_dim, n_vis, query_rows, head_reduction, scale, dtype);
    visual_combine<<<blocks_for(n_vis), kThreads, 0, s>>>(
        reduced, vis_start, scores, q_len, seq_len, n_vis, query_rows, combine);
    return check(cudaGetLastError(), "visual_score launch");
}

} // extern "C"
