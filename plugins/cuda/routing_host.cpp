// Host (CPU) build of the routing C ABI: the same per-element rules as the CUDA kernels
// (routing_math.h), in plain loops. It lets CI test the kernels' algorithms against the NumPy
// references without a GPU, and gives the ctypes wrapper (plugins/kernels.py) one code path for
// both builds. "Device" memory is host memory here; `stream` is ignored.
#include "routing_math.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
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
    return (size_t) mllm::visual_workspace_floats(q_len, n_vis) * sizeof(float);
}

MLLM_API int32_t mllm_visual_score_host_tiled(void const* q, void const* k, int64_t const* positions,
    int64_t const* vis_start, float* scores, int64_t heads, int64_t kv_heads, int64_t q_len, int64_t seq_len,
    int64_t head_dim, int64_t n_vis, int32_t query_rows, int32_t head_reduction, int32_t combine, float scale,
    int32_t dtype, void* workspace, void* /*stream*/, int64_t row_tile, int64_t key_tile, int64_t dim_chunk,
    int64_t head_batch, int64_t target_blocks)
{
    if (mllm::check_visual_score(
            heads, kv_heads, q_len, seq_len, head_dim, n_vis, query_rows, head_reduction, combine, dtype)
        != MLLM_OK)
        return fail(MLLM_ERR_ARGUMENT, "visual_score: bad sizes, attributes or dtype");
    if (row_tile < 1 || key_tile < 1 || dim_chunk < 1 || head_batch < 1 || target_blocks < 1)
        return fail(MLLM_ERR_ARGUMENT, "visual_score: tile sizes must be positive");
    int64_t const start = mllm::clamp_vis_start(vis_start[0], n_vis, seq_len);
    int64_t const first = mllm::first_scored_row(query_rows, start, n_vis, seq_len, q_len);
    int64_t const rows = seq_len - first;
    int64_t const groups = heads / kv_heads;
    float* partial = static_cast<float*>(workspace); // [splits, rows, n_vis]
    int64_t const heads_per_split = mllm::visual_heads_per_split(heads, rows, q_len, row_tile, target_blocks);
    int64_t const row_tiles = rows > 0 ? mllm::ceil_div(rows, row_tile) : 0;
    int64_t const splits = mllm::ceil_div(heads, heads_per_split);

    // What one GPU block holds: staged chunks of q rows and keys ("shared memory"), its dot products
    // and the pass 1 statistics of a batch of heads.
    std::vector<float> q_stage((size_t) (row_tile * dim_chunk)), k_stage((size_t) (key_tile * dim_chunk));
    std::vector<float> dots((size_t) (row_tile * key_tile));
    std::vector<float> stat_max((size_t) (head_batch * row_tile)), stat_sum((size_t) (head_batch * row_tile));
    std::vector<char> visible((size_t) (row_tile * key_tile));
    std::vector<int64_t> row_position((size_t) row_tile);

    // dots[r, j] = q row (q_row0 + r) of head h . key (key0 + j) of kv head kv, chunk by chunk
    auto tile_dots = [&](int64_t h, int64_t q_row0, int64_t rows_here, int64_t kv, int64_t key0, int64_t keys_here) {
        std::fill(dots.begin(), dots.end(), 0.0f);
        for (int64_t d0 = 0; d0 < head_dim; d0 += dim_chunk)
        {
            int64_t const width = head_dim - d0 < dim_chunk ? head_dim - d0 : dim_chunk;
            for (int64_t r = 0; r < rows_here; ++r)
                for (int64_t d = 0; d < width; ++d)
                    q_stage[(size_t) (r * dim_chunk + d)]
                        = mllm::load_float(q, (h * q_len + q_row0 + r) * head_dim + d0 + d, dtype);
            for (int64_t j = 0; j < keys_here; ++j)
                for (int64_t d = 0; d < width; ++d)
                    k_stage[(size_t) (j * dim_chunk + d)]
                        = mllm::load_float(k, (kv * seq_len + key0 + j) * head_dim + d0 + d, dtype);
            for (int64_t r = 0; r < rows_here; ++r)
                for (int64_t j = 0; j < keys_here; ++j)
                {
                    float const* qr = &q_stage[(size_t) (r * dim_chunk)];
                    float const* kj = &k_stage[(size_t) (j * dim_chunk)];
                    float dot = dots[(size_t) (r * key_tile + j)];
                    for (int64_t d = 0; d < width; ++d)
                        dot += qr[d] * kj[d];
                    dots[(size_t) (r * key_tile + j)] = dot;
                }
        }
    };
    // marks the visible pairs of a tile of keys [key0, key0 + keys_here); true if there is one
    auto mark_visible = [&](int64_t rows_here, int64_t key0, int64_t keys_here) {
        bool live = false;
        for (int64_t r = 0; r < row_tile; ++r)
            for (int64_t j = 0; j < key_tile; ++j)
            {
                bool const row_valid = r < rows_here, key_valid = j < keys_here;
                int64_t const key_position = key_valid ? positions[key0 + j] : 0;
                bool const v = mllm::pair_visible(
                    row_valid, key_valid, key_position, row_valid ? row_position[(size_t) r] : 0);
                visible[(size_t) (r * key_tile + j)] = v;
                live = live || v;
            }
        return live;
    };

    // the blocks of the GPU grid, in the same decoding (mllm::visual_grid_blocks)
    int64_t const blocks = mllm::visual_grid_blocks(q_len, row_tile, target_blocks);
    for (int64_t block = 0; block < blocks; ++block)
    {
        if (block >= row_tiles * splits)
            break;
        int64_t const split = block / row_tiles;
        int64_t const tile_row0 = (block % row_tiles) * row_tile;
        int64_t const head_begin = split * heads_per_split;
        int64_t const head_end = head_begin + heads_per_split < heads ? head_begin + heads_per_split : heads;
        int64_t const rows_here = rows - tile_row0 < row_tile ? rows - tile_row0 : row_tile;
        int64_t const q_row0 = first + tile_row0 - (seq_len - q_len);
        for (int64_t r = 0; r < row_tile; ++r)
            row_position[(size_t) r] = r < rows_here ? positions[first + tile_row0 + r] : 0;
        for (int64_t batch = head_begin; batch < head_end; batch += head_batch)
        {
            int64_t const batch_end = batch + head_batch < head_end ? batch + head_batch : head_end;
            // pass 1: online softmax max and sum over all key tiles
            for (int64_t h = batch; h < batch_end; ++h)
            {
                float* run_max = &stat_max[(size_t) ((h - batch) * row_tile)];
                float* run_sum = &stat_sum[(size_t) ((h - batch) * row_tile)];
                std::fill(run_max, run_max + row_tile, -INFINITY);
                std::fill(run_sum, run_sum + row_tile, 0.0f);
                for (int64_t key0 = 0; key0 < seq_len; key0 += key_tile)
                {
                    int64_t const keys_here = seq_len - key0 < key_tile ? seq_len - key0 : key_tile;
                    if (!mark_visible(rows_here, key0, keys_here))
                        continue; // every pair masked
                    tile_dots(h, q_row0, rows_here, h / groups, key0, keys_here);
                    for (int64_t r = 0; r < rows_here; ++r)
                    {
                        float tile_max = -INFINITY;
                        for (int64_t j = 0; j < keys_here; ++j)
                            tile_max = mllm::larger(tile_max, mllm::visual_logit(dots[(size_t) (r * key_tile + j)],
                                scale, visible[(size_t) (r * key_tile + j)]));
                        float tile_sum = 0.0f;
                        for (int64_t j = 0; j < keys_here; ++j)
                            tile_sum += mllm::tile_exp(mllm::visual_logit(dots[(size_t) (r * key_tile + j)], scale,
                                visible[(size_t) (r * key_tile + j)]), tile_max);
                        mllm::softmax_merge(run_max[r], run_sum[r], tile_max, tile_sum);
                    }
                }
            }
            // pass 2: the visual keys' logits again, normalised, folded over the batch's heads
            for (int64_t v0 = 0; v0 < n_vis; v0 += key_tile)
            {
                int64_t const keys_here = n_vis - v0 < key_tile ? n_vis - v0 : key_tile;
                bool const live = mark_visible(rows_here, start + v0, keys_here);
                for (int64_t h = batch; h < batch_end; ++h)
                {
                    if (live)
                        tile_dots(h, q_row0, rows_here, h / groups, start + v0, keys_here);
                    for (int64_t r = 0; r < rows_here; ++r)
                    {
                        float const row_max = stat_max[(size_t) ((h - batch) * row_tile + r)];
                        float const row_sum = stat_sum[(size_t) ((h - batch) * row_tile + r)];
                        for (int64_t j = 0; j < keys_here; ++j)
                        {
                            bool const v = visible[(size_t) (r * key_tile + j)];
                            float const dot = v ? dots[(size_t) (r * key_tile + j)] : 0.0f;
                            float const logit = mllm::visual_logit(dot, scale, v);
                            float& slot = partial[mllm::partial_index(split, tile_row0 + r, v0 + j, rows, n_vis)];
                            slot = mllm::reduce_heads(slot, mllm::softmax_probability(logit, row_max, row_sum),
                                (int32_t) (h - head_begin), head_reduction);
                        }
                    }
                }
            }
        }
    }
    // combine: one GPU thread per visual token; splits folded in order, rows summed in order
    for (int64_t i = 0; i < n_vis; ++i)
    {
        float all = 0.0f, self = 0.0f, cross = 0.0f;
        for (int64_t r = 0; r < rows; ++r)
        {
            float value = 0.0f;
            for (int64_t split = 0; split < splits; ++split)
                value = mllm::reduce_heads(
                    value, partial[mllm::partial_index(split, r, i, rows, n_vis)], (int32_t) split, head_reduction);
            value = mllm::finish_heads(value, heads, head_reduction);
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

MLLM_API int32_t mllm_visual_score(void const* q, void const* k, int64_t const* positions,
    int64_t const* vis_start, float* scores, int64_t heads, int64_t kv_heads, int64_t q_len, int64_t seq_len,
    int64_t head_dim, int64_t n_vis, int32_t query_rows, int32_t head_reduction, int32_t combine, float scale,
    int32_t dtype, void* workspace, void* stream)
{
    mllm::VisualTiling const t = mllm::kernel_tiling();
    return mllm_visual_score_host_tiled(q, k, positions, vis_start, scores, heads, kv_heads, q_len, seq_len, head_dim,
        n_vis, query_rows, head_reduction, combine, scale, dtype, workspace, stream, t.row_tile, t.key_tile,
        t.dim_chunk, t.head_batch, t.target_blocks);
}

} // extern "C"
