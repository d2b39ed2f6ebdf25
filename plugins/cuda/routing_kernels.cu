// CUDA build of the routing C ABI (routing_kernels.h). Per-element rules come from routing_math.h,
// which the host reference build (routing_host.cpp) shares; plugins/ops.py is the spec.
//
// Shapes are small (n_vis ~ 576-2880 visual tokens, seq_len ~ 1-4k), so the kernels favour
// simple, deterministic work over clever scans: selection ranks each token against all others
// (O(n_vis^2) comparisons, cheap at these sizes), and every reduction has a fixed order.
// VisualScore is the heavy one (H x rows x seq_len dot products): it streams K through shared
// memory in tiles shared by a tile of query rows, with no length limit.
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
// Tiled two-pass kernel (the structure is described in routing_kernels.h and routing_math.h). Each
// thread owns a 4 x 4 register tile of (row, key) pairs of the block's tiles: rows rg + 8 i and keys
// kl + 16 c, with kl = thread % 16 and rg = thread / 16. The 16 threads of a row group are one half of
// a warp, so a row's tile max and tile sum take four xor shuffles and no shared memory.
namespace vs
{
constexpr int kRowTile = MLLM_VISUAL_SCORE_ROW_TILE;
constexpr int kKeyTile = MLLM_VISUAL_SCORE_KEY_TILE;
constexpr int kDimChunk = MLLM_VISUAL_SCORE_DIM_CHUNK;
constexpr int kHeadBatch = MLLM_VISUAL_SCORE_HEAD_BATCH;
constexpr int kRowsPerThread = 4;
constexpr int kKeysPerThread = 4;
constexpr int kKeyLanes = kKeyTile / kKeysPerThread;  // threads across a key tile
constexpr int kRowGroups = kRowTile / kRowsPerThread; // threads down a row tile
constexpr int kThreads = kKeyLanes * kRowGroups;
constexpr int kPitch = kDimChunk + 1; // padding: the 16 keys a half warp reads lie in distinct banks
static_assert(kKeyLanes == 16, "a row's reductions shuffle across the 16 lanes of a half warp");
static_assert(kRowTile % kRowsPerThread == 0 && kKeyTile % kKeysPerThread == 0, "tiles split evenly");
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");

struct Shared
{
    float q[kRowTile][kPitch];           // head_dim chunk of the block's query rows (one head)
    float k[kKeyTile][kPitch];           // the same chunk of one tile of keys
    float row_max[kHeadBatch][kRowTile]; // pass 1 results of the current batch of heads
    float row_sum[kHeadBatch][kRowTile];
};
static_assert(sizeof(Shared) <= 48 * 1024, "fits the default static shared memory");
} // namespace vs

// Butterfly reductions over the 16 lanes of a half warp: every lane ends with the same value.
__device__ __forceinline__ float half_warp_max(float value)
{
    for (int offset = vs::kKeyLanes / 2; offset > 0; offset >>= 1)
        value = mllm::larger(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

__device__ __forceinline__ float half_warp_sum(float value)
{
    for (int offset = vs::kKeyLanes / 2; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

// dot[i][c] = q row (rg + 8 i) . key (kl + 16 c) over all of head_dim, FP32. q_first and k_first are
// the element offsets of the tile's first query row and first key (rows head_dim apart). Both are
// staged through shared memory, converted to float, one chunk of head_dim at a time; missing rows and
// keys are staged as zeros. Every thread of the block must call it (it synchronises).
__device__ __forceinline__ void tile_dots(void const* __restrict__ q, int64_t q_first, void const* __restrict__ k,
    int64_t k_first, int rows_here, int keys_here, int64_t head_dim, int32_t dtype, vs::Shared& sh,
    float (&dot)[vs::kRowsPerThread][vs::kKeysPerThread])
{
    int const kl = threadIdx.x % vs::kKeyLanes;
    int const rg = threadIdx.x / vs::kKeyLanes;
#pragma unroll
    for (int i = 0; i < vs::kRowsPerThread; ++i)
#pragma unroll
        for (int c = 0; c < vs::kKeysPerThread; ++c)
            dot[i][c] = 0.0f;
    for (int64_t d0 = 0; d0 < head_dim; d0 += vs::kDimChunk)
    {
        int const width = head_dim - d0 < vs::kDimChunk ? (int) (head_dim - d0) : vs::kDimChunk;
        __syncthreads(); // everyone is done with the previous chunk (or tile)
        for (int e = threadIdx.x; e < vs::kRowTile * vs::kDimChunk; e += vs::kThreads)
        {
            int const r = e / vs::kDimChunk;
            int const d = e % vs::kDimChunk;
            bool const inside = r < rows_here && d < width;
            sh.q[r][d] = inside ? mllm::load_float(q, q_first + r * head_dim + d0 + d, dtype) : 0.0f;
        }
        for (int e = threadIdx.x; e < vs::kKeyTile * vs::kDimChunk; e += vs::kThreads)
        {
            int const j = e / vs::kDimChunk;
            int const d = e % vs::kDimChunk;
            bool const inside = j < keys_here && d < width;
            sh.k[j][d] = inside ? mllm::load_float(k, k_first + j * head_dim + d0 + d, dtype) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int d = 0; d < width; ++d)
        {
            float qv[vs::kRowsPerThread], kv[vs::kKeysPerThread];
#pragma unroll
            for (int i = 0; i < vs::kRowsPerThread; ++i)
                qv[i] = sh.q[rg + vs::kRowGroups * i][d];
#pragma unroll
            for (int c = 0; c < vs::kKeysPerThread; ++c)
                kv[c] = sh.k[kl + vs::kKeyLanes * c][d];
#pragma unroll
            for (int i = 0; i < vs::kRowsPerThread; ++i)
#pragma unroll
                for (int c = 0; c < vs::kKeysPerThread; ++c)
                    dot[i][c] += qv[i] * kv[c];
        }
    }
}

// One block per (row tile, head split), see mllm::visual_grid_blocks. For each batch of its heads:
// pass 1 streams every key tile and keeps each (row, head)'s running max and sum in registers (online
// softmax), then parks them in shared memory; pass 2 streams the visual key tiles, recomputes their
// logits for each head in order and folds the probabilities into the head reduction in registers,
// which go to the block's own rows of its split's slab of `partial` (read back for later batches).
// Tiles whose pairs are all masked (future keys) are skipped: they add nothing to a row's softmax.
__global__ void __launch_bounds__(vs::kThreads) visual_tiles(void const* __restrict__ q, void const* __restrict__ k,
    int64_t const* __restrict__ positions, int64_t const* vis_start, float* __restrict__ partial, int64_t heads,
    int64_t kv_heads, int64_t q_len, int64_t seq_len, int64_t head_dim, int64_t n_vis, int32_t query_rows,
    int32_t head_reduction, float scale, int32_t dtype)
{
    __shared__ vs::Shared sh;
    int const kl = threadIdx.x % vs::kKeyLanes;
    int const rg = threadIdx.x / vs::kKeyLanes;
    int64_t const start = mllm::clamp_vis_start(vis_start[0], n_vis, seq_len);
    int64_t const first = mllm::first_scored_row(query_rows, start, n_vis, seq_len, q_len);
    int64_t const rows = seq_len - first;
    int64_t const heads_per_split
        = mllm::visual_heads_per_split(heads, rows, q_len, vs::kRowTile, MLLM_VISUAL_SCORE_TARGET_BLOCKS);
    int64_t const row_tiles = mllm::ceil_div(rows, vs::kRowTile);
    if ((int64_t) blockIdx.x >= row_tiles * mllm::ceil_div(heads, heads_per_split))
        return; // the whole block leaves together (rows <= 0 included)
    int64_t const tile = blockIdx.x % row_tiles;
    int64_t const head_begin = (blockIdx.x / row_tiles) * heads_per_split;
    int64_t const head_end = head_begin + heads_per_split < heads ? head_begin + heads_per_split : heads;
    int64_t const tile_row0 = tile * vs::kRowTile; // scored-row index of the tile's first row
    int const rows_here = rows - tile_row0 < vs::kRowTile ? (int) (rows - tile_row0) : vs::kRowTile;
    int64_t const q_row0 = first + tile_row0 - (seq_len - q_len); // its row in q
    int64_t const groups = heads / kv_heads;

    bool row_valid[vs::kRowsPerThread];
    int64_t row_position[vs::kRowsPerThread];
#pragma unroll
    for (int i = 0; i < vs::kRowsPerThread; ++i)
    {
        int const r = rg + vs::kRowGroups * i;
        row_valid[i] = r < rows_here;
        row_position[i] = row_valid[i] ? positions[first + tile_row0 + r] : 0;
    }
    float dot[vs::kRowsPerThread][vs::kKeysPerThread];
    uint32_t visible = 0; // bit i * kKeysPerThread + c: pair (row i, key c) takes part (a mask saves registers)
    static_assert(vs::kRowsPerThread * vs::kKeysPerThread <= 32, "one bit per pair");

    for (int64_t batch = head_begin; batch < head_end; batch += vs::kHeadBatch)
    {
        int64_t const batch_end = batch + vs::kHeadBatch < head_end ? batch + vs::kHeadBatch : head_end;
        __syncthreads(); // pass 2 of the previous batch is done with row_max / row_sum
        // ---- pass 1: softmax max and sum of every (row, head) over all keys
        for (int64_t h = batch; h < batch_end; ++h)
        {
            int64_t const q_first = (h * q_len + q_row0) * head_dim;
            int64_t const k_head = (h / groups) * seq_len * head_dim;
            float run_max[vs::kRowsPerThread], run_sum[vs::kRowsPerThread];
#pragma unroll
            for (int i = 0; i < vs::kRowsPerThread; ++i)
            {
                run_max[i] = -INFINITY;
                run_sum[i] = 0.0f;
            }
            for (int64_t key0 = 0; key0 < seq_len; key0 += vs::kKeyTile)
            {
                int const keys_here = seq_len - key0 < vs::kKeyTile ? (int) (seq_len - key0) : vs::kKeyTile;
                visible = 0;
#pragma unroll
                for (int c = 0; c < vs::kKeysPerThread; ++c)
                {
                    int const j = kl + vs::kKeyLanes * c;
                    bool const key_valid = j < keys_here;
                    int64_t const key_position = key_valid ? positions[key0 + j] : 0;
#pragma unroll
                    for (int i = 0; i < vs::kRowsPerThread; ++i)
                        if (mllm::pair_visible(row_valid[i], key_valid, key_position, row_position[i]))
                            visible |= 1u << (i * vs::kKeysPerThread + c);
                }
                if (!__syncthreads_or(visible != 0))
                    continue; // the block agrees: nothing visible in this tile
                tile_dots(q, q_first, k, k_head + key0 * head_dim, rows_here, keys_here, head_dim, dtype, sh, dot);
#pragma unroll
                for (int i = 0; i < vs::kRowsPerThread; ++i)
                {
                    float logit[vs::kKeysPerThread];
                    float tile_max = -INFINITY;
#pragma unroll
                    for (int c = 0; c < vs::kKeysPerThread; ++c)
                    {
                        logit[c] = mllm::visual_logit(dot[i][c], scale, (visible >> (i * vs::kKeysPerThread + c)) & 1u);
                        tile_max = mllm::larger(tile_max, logit[c]);
                    }
                    tile_max = half_warp_max(tile_max);
                    float tile_sum = 0.0f;
#pragma unroll
                    for (int c = 0; c < vs::kKeysPerThread; ++c)
                        tile_sum += mllm::tile_exp(logit[c], tile_max);
                    tile_sum = half_warp_sum(tile_sum);
                    mllm::softmax_merge(run_max[i], run_sum[i], tile_max, tile_sum);
                }
            }
            if (kl == 0) // the 16 lanes of a row group hold the same values
            {
#pragma unroll
                for (int i = 0; i < vs::kRowsPerThread; ++i)
                {
                    sh.row_max[h - batch][rg + vs::kRowGroups * i] = run_max[i];
                    sh.row_sum[h - batch][rg + vs::kRowGroups * i] = run_sum[i];
                }
            }
        }
        __syncthreads(); // row_max / row_sum of the batch are complete
        // ---- pass 2: visual keys only, normalised by pass 1, reduced over heads in order
        for (int64_t v0 = 0; v0 < n_vis; v0 += vs::kKeyTile)
        {
            int const keys_here = n_vis - v0 < vs::kKeyTile ? (int) (n_vis - v0) : vs::kKeyTile;
            bool key_valid[vs::kKeysPerThread];
            visible = 0;
#pragma unroll
            for (int c = 0; c < vs::kKeysPerThread; ++c)
            {
                int const j = kl + vs::kKeyLanes * c;
                key_valid[c] = j < keys_here;
                int64_t const key_position = key_valid[c] ? positions[start + v0 + j] : 0;
#pragma unroll
                for (int i = 0; i < vs::kRowsPerThread; ++i)
                    if (mllm::pair_visible(row_valid[i], key_valid[c], key_position, row_position[i]))
                        visible |= 1u << (i * vs::kKeysPerThread + c);
            }
            bool const live = __syncthreads_or(visible != 0) != 0;
            float acc[vs::kRowsPerThread][vs::kKeysPerThread];
#pragma unroll
            for (int i = 0; i < vs::kRowsPerThread; ++i)
#pragma unroll
                for (int c = 0; c < vs::kKeysPerThread; ++c)
                {
                    int64_t const index = mllm::partial_index(blockIdx.x / row_tiles,
                        tile_row0 + rg + vs::kRowGroups * i, v0 + kl + vs::kKeyLanes * c, rows, n_vis);
                    // a later batch continues the fold it left in the slab (only this thread wrote it)
                    acc[i][c] = batch > head_begin && row_valid[i] && key_valid[c] ? partial[index] : 0.0f;
                }
            for (int64_t h = batch; h < batch_end; ++h)
            {
                if (live) // else every logit below is -inf and dot is not read
                    tile_dots(q, (h * q_len + q_row0) * head_dim, k, ((h / groups) * seq_len + start + v0) * head_dim,
                        rows_here, keys_here, head_dim, dtype, sh, dot);
#pragma unroll
                for (int i = 0; i < vs::kRowsPerThread; ++i)
                {
                    int const r = rg + vs::kRowGroups * i;
                    float const row_max = sh.row_max[h - batch][r];
                    float const row_sum = sh.row_sum[h - batch][r];
#pragma unroll
                    for (int c = 0; c < vs::kKeysPerThread; ++c)
                    {
                        bool const seen = (visible >> (i * vs::kKeysPerThread + c)) & 1u;
                        float const logit = mllm::visual_logit(seen ? dot[i][c] : 0.0f, scale, seen);
                        acc[i][c] = mllm::reduce_heads(acc[i][c], mllm::softmax_probability(logit, row_max, row_sum),
                            (int32_t) (h - head_begin), head_reduction);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < vs::kRowsPerThread; ++i)
#pragma unroll
                for (int c = 0; c < vs::kKeysPerThread; ++c)
                    if (row_valid[i] && key_valid[c])
                        partial[mllm::partial_index(blockIdx.x / row_tiles, tile_row0 + rg + vs::kRowGroups * i,
                            v0 + kl + vs::kKeyLanes * c, rows, n_vis)]
                            = acc[i][c];
        }
    }
}

// One thread per visual token: each row's per-split values folded (in split order) and finished,
// then the rows summed in order and combined.
__global__ void visual_combine(float const* __restrict__ partial, int64_t const* vis_start, float* scores,
    int64_t heads, int64_t q_len, int64_t seq_len, int64_t n_vis, int32_t query_rows, int32_t head_reduction,
    int32_t combine)
{
    int64_t const i = blockIdx.x * (int64_t) blockDim.x + threadIdx.x;
    if (i >= n_vis)
        return;
    int64_t const start = mllm::clamp_vis_start(vis_start[0], n_vis, seq_len);
    int64_t const rows = seq_len - mllm::first_scored_row(query_rows, start, n_vis, seq_len, q_len);
    int64_t const splits = mllm::ceil_div(heads,
        mllm::visual_heads_per_split(heads, rows, q_len, vs::kRowTile, MLLM_VISUAL_SCORE_TARGET_BLOCKS));
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
    return (size_t) mllm::visual_workspace_floats(q_len, n_vis) * sizeof(float);
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
    int64_t const blocks = mllm::visual_grid_blocks(q_len, vs::kRowTile, MLLM_VISUAL_SCORE_TARGET_BLOCKS);
    if (blocks > 0x7FFFFFFF)
        return fail(MLLM_ERR_ARGUMENT, "visual_score: q_len beyond the grid");
    cudaStream_t const s = static_cast<cudaStream_t>(stream);
    float* partial = static_cast<float*>(workspace);
    visual_tiles<<<(unsigned) blocks, vs::kThreads, 0, s>>>(q, k, positions, vis_start, partial, heads, kv_heads,
        q_len, seq_len, head_dim, n_vis, query_rows, head_reduction, scale, dtype);
    visual_combine<<<blocks_for(n_vis), kThreads, 0, s>>>(
        partial, vis_start, scores, heads, q_len, seq_len, n_vis, query_rows, head_reduction, combine);
    return check(cudaGetLastError(), "visual_score launch");
}

} // extern "C"
