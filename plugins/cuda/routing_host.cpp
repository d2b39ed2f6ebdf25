// Host (CPU) build of the routing C ABI: the same per-element rules as the CUDA kernels
// (routing_math.h), in plain loops. It lets CI test the kernels' algorithms against the NumPy
// references without a GPU, and gives the ctypes wrapper (plugins/kernels.py) one code path for
// both builds. "Device" memory is host memory here; `stream` is ignored.
#include "routing_math.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

namespace
{
thread_local char const* g_last_error = "";

int32_t fail(int32_t code, char const* why)
{
    g_last_error = why;
    return code;
}
} // namespace

extern "C" {

MLLM_API int32_t mllm_is_cuda_build(void)
{
    return 0;
}

MLLM_API int32_t mllm_device_count(int32_t* count)
{
    *count = 0;
    return MLLM_OK;
}

MLLM_API int32_t mllm_malloc(void** ptr, size_t bytes)
{
    *ptr = malloc(bytes > 0 ? bytes : 1);
    return *ptr ? MLLM_OK : fail(MLLM_ERR_CUDA, "malloc failed");
}

MLLM_API int32_t mllm_free(void* ptr)
{
    free(ptr);
    return MLLM_OK;
}

MLLM_API int32_t mllm_memcpy_to_device(void* dst, void const* src, size_t bytes)
{
    memcpy(dst, src, bytes);
    return MLLM_OK;
}

MLLM_API int32_t mllm_memcpy_to_host(void* dst, void const* src, size_t bytes)
{
    memcpy(dst, src, bytes);
    return MLLM_OK;
}

MLLM_API int32_t mllm_synchronize(void)
{
    return MLLM_OK;
}

MLLM_API char const* mllm_last_error(void)
{
    return g_last_error;
}

// ---- TokenSelect ------------------------------------------------------------------------------------
MLLM_API size_t mllm_token_select_workspace(int64_t n_vis)
{
    return (size_t) n_vis * sizeof(int32_t);
}

MLLM_API int32_t mllm_token_select(float const* scores, int64_t const* vis_start, void const* data,
    int64_t const* positions, void* data_out, int64_t* positions_out, int64_t* rows_out, int64_t seq_len,
    int64_t hidden, int64_t n_vis, int64_t k, int32_t dtype, void* workspace, void* /*stream*/)
{
    if (mllm::check_token_select(seq_len, hidden, n_vis, k, dtype) != MLLM_OK)
        return fail(MLLM_ERR_ARGUMENT, "token_select: bad sizes, k or dtype");
    int64_t const start = mllm::clamp_vis_start(vis_start[0], n_vis, seq_len);
    int32_t* selected = static_cast<int32_t*>(workspace);
    // pass 1 (one GPU thread per visual token): kept iff fewer than k tokens rank before it
    for (int64_t i = 0; i < n_vis; ++i)
    {
        int64_t rank = 0;
        for (int64_t j = 0; j < n_vis; ++j)
            rank += mllm::ranks_before(scores[j], j, scores[i], i) ? 1 : 0;
        selected[i] = rank < k ? 1 : 0;
    }
    // pass 2: a kept token's output slot is the number of kept tokens before it (ascending order)
    for (int64_t i = 0; i < n_vis; ++i)
    {
        if (!selected[i])
            continue;
        int64_t slot = 0;
        for (int64_t j = 0; j < i; ++j)
            slot += selected[j];
        rows_out[start + slot] = start + i;
    }
    // pass 3: gather rows and positions
    int64_t const kept = seq_len - n_vis + k;
    int64_t const row_bytes = hidden * mllm::dtype_size(dtype);
    for (int64_t r = 0; r < kept; ++r)
    {
        int64_t const kept_row = (r >= start && r < start + k) ? rows_out[r] : 0; // written by pass 2
        int64_t const source = mllm::select_source_row(r, start, n_vis, k, kept_row);
        rows_out[r] = source;
        positions_out[r] = positions[source];
        memcpy(static_cast<char*>(data_out) + r * row_bytes, static_cast<char const*>(data) + source * row_bytes,
            (size_t) row_bytes);
    }
    return MLLM_OK;
}

// ---- TokenScatter -----------------------------------------------------------------------------------
MLLM_API int32_t mllm_token_scatter(void const* base, void const* updates, int64_t const* rows,
    void const* skip_scale, void* out, int64_t seq_len, int64_t hidden, int64_t n_rows, int32_t dtype,
    void* /*stream*/)
{
    if (mllm::check_token_scatter(seq_len, hidden, n_rows, dtype) != MLLM_OK)
        return fail(MLLM_ERR_ARGUMENT, "token_scatter: bad sizes or dtype");
    bool const half = dtype == MLLM_DTYPE_FLOAT16;
    for (int64_t t = 0; t < seq_len; ++t)
    {
        for (int64_t d = 0; d < hidden; ++d)
        {
            int64_t const index = t * hidden + d;
            if (skip_scale == nullptr)
            {
                if (half)
                    static_cast<uint16_t*>(out)[index] = static_cast<uint16_t const*>(base)[index];
                else
                    static_cast<float*>(out)[index] = static_cast<float const*>(base)[index];
                continue;
            }
            float const value
                = mllm::scaled(mllm::load_float(base, index, dtype), mllm::load_float(skip_scale, t, dtype));
            if (half)
                static_cast<uint16_t*>(out)[index] = mllm::float_to_half(value);
            else
                static_cast<float*>(out)[index] = value;
        }
    }
    int64_t const row_bytes = hidden * mllm::dtype_size(dtype);
    for (int64_t j = 0; j < n_rows; ++j)
    {
        int64_t const row = rows[j];
        if (row < 0 || row >= seq_len)
            continue;
        memcpy(static_cast<char*>(out) + row * row_bytes, static_cast<char const*>(updates) + j * row_bytes,
            (size_t) row_bytes);
    }
    return MLLM_OK;
}

// ---- VisualScore ------------------------------------------------------------------------------------
MLLM_API size_t mllm_visual_score_workspace(int64_t q_len, int64_t n_vis)
{
    return (size_t) q_len * (size_t) n_vis * sizeof(float);
}

MLLM_API int32_t mllm_visual_score(void const* q, void const* k, int64_t const* positions,
    int64_t const* vis_start, float* scores, int64_t heads, int64_t kv_heads, int64_t q_len, int64_t seq_len,
    int64_t head_dim, int64_t n_vis, int32_t query_rows, int32_t head_reduction, int32_t combine, float scale,
    int32_t dtype, void* workspace, void* /*stream*/)
{
    if (mllm::check_visual_score(
            heads, kv_heads, q_len, seq_len, head_dim, n_vis, query_rows, head_reduction, combine, dtype)
        != MLLM_OK)
        return fail(MLLM_ERR_ARGUMENT, "visual_score: bad sizes, attributes or dtype");
    int64_t const start = mllm::clamp_vis_start(vis_start[0], n_vis, seq_len);
    int64_t const first = mllm::first_scored_row(query_rows, start, n_vis, seq_len, q_len);
    int64_t const first_in_q = seq_len - q_len;
    int64_t const rows = seq_len - first;
    int64_t const groups = heads / kv_heads;
    float* reduced = static_cast<float*>(workspace); // [rows, n_vis]
    std::vector<float> logits((size_t) seq_len);
    // kernel A: one block per query row; heads in order, softmax over all keys, visual columns kept
    for (int64_t r = 0; r < rows; ++r)
    {
        int64_t const row = first + r;
        int64_t const q_row = row - first_in_q;
        for (int64_t h = 0; h < heads; ++h)
        {
            int64_t const kv_head = h / groups;
            int64_t const q_base = (h * q_len + q_row) * head_dim;
            float row_max = -INFINITY;
            for (int64_t t = 0; t < seq_len; ++t)
            {
                int64_t const k_base = (kv_head * seq_len + t) * head_dim;
                float dot = 0.0f;
                for (int64_t d = 0; d < head_dim; ++d)
                    dot += mllm::load_float(q, q_base + d, dtype) * mllm::load_float(k, k_base + d, dtype);
                float const logit = mllm::is_future(positions[t], positions[row]) ? -INFINITY : dot * scale;
                logits[(size_t) t] = logit;
                row_max = logit > row_max ? logit : row_max;
            }
            float total = 0.0f;
            for (int64_t t = 0; t < seq_len; ++t)
                total += expf(logits[(size_t) t] - row_max);
            for (int64_t i = 0; i < n_vis; ++i)
            {
                float const probability = expf(logits[(size_t) (start + i)] - row_max) / total;
                float& slot = reduced[r * n_vis + i];
                slot = mllm::reduce_heads(slot, probability, (int32_t) h, head_reduction);
            }
        }
        for (int64_t i = 0; i < n_vis; ++i)
            reduced[r * n_vis + i] = mllm::finish_heads(reduced[r * n_vis + i], heads, head_reduction);
    }
    // kernel B: one thread per visual token, rows summed in order
    for (int64_t i = 0; i < n_vis; ++i)
    {
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
    return MLLM_OK;
}

} // extern "C"
