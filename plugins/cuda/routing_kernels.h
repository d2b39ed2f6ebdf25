/* C ABI of the routing kernels (TokenSelect, TokenScatter, VisualScore).
 *
 * Two builds implement it: routing_kernels.cu (CUDA; pointers are device pointers, `stream` is a
 * cudaStream_t, launches are asynchronous) and routing_host.cpp (host reference; pointers are host
 * pointers, `stream` is ignored, calls are synchronous). The memory helpers let one caller (the
 * ctypes tests and benchmarks in plugins/kernels.py, the TensorRT plugins) drive either build.
 *
 * Semantics: plugins/ops.py (the NumPy references). Index tensors are int64. Activations are
 * float32 or float16 (dtype below); TokenSelect's scores and VisualScore's output are float32.
 * Bad index values are clamped, never dereferenced (the references raise instead).
 */
#ifndef MLLM_ROUTING_KERNELS_H
#define MLLM_ROUTING_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define MLLM_API __declspec(dllexport)
#else
#define MLLM_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum
{
    MLLM_OK = 0,
    MLLM_ERR_ARGUMENT = 1, /* a size or attribute is out of range; nothing was launched */
    MLLM_ERR_CUDA = 2      /* a CUDA call failed; mllm_last_error() says which */
};

enum
{
    MLLM_DTYPE_FLOAT32 = 0,
    MLLM_DTYPE_FLOAT16 = 1
};

enum /* VisualScore.query_rows */
{
    MLLM_QUERY_LAST_TEXT = 0,
    MLLM_QUERY_TEXT = 1,
    MLLM_QUERY_VISUAL_AND_TEXT = 2
};

enum /* VisualScore.head_reduction */
{
    MLLM_HEADS_MEAN = 0,
    MLLM_HEADS_MAX = 1
};

enum /* VisualScore.combine */
{
    MLLM_COMBINE_SINGLE = 0,
    MLLM_COMBINE_SELF_TIMES_CROSS = 1
};

/* VisualScore tiling. A block scores ROW_TILE query rows: K is streamed through shared memory in
 * tiles of KEY_TILE keys x DIM_CHUNK head dimensions, each tile reused by all the block's rows. Pass 1
 * keeps a running (max, sum) per row and head (online softmax) over all keys; pass 2 recomputes the
 * logits of the visual keys only and normalises them with the final (max, sum). The (max, sum) of
 * HEAD_BATCH heads live in shared memory at a time. No row of logits is ever stored, so the sequence
 * length is not limited by shared memory. When there are fewer than TARGET_BLOCKS row tiles, the
 * heads are also split over blocks, as far as the workspace allows (SPARE_ROWS below).
 * The CUDA build's thread layout assumes these values (static_asserts in routing_kernels.cu);
 * benchmarks/visual_score_cost.py reads them to estimate the kernel's traffic. */
#define MLLM_VISUAL_SCORE_ROW_TILE 32
#define MLLM_VISUAL_SCORE_KEY_TILE 64
#define MLLM_VISUAL_SCORE_DIM_CHUNK 32
#define MLLM_VISUAL_SCORE_HEAD_BATCH 32
#define MLLM_VISUAL_SCORE_TARGET_BLOCKS 128
/* The workspace holds (q_len + SPARE_ROWS) x n_vis floats: one [rows, n_vis] slab of head-reduced
 * probabilities per head split, so a call with few query rows (last_text) can split its heads. */
#define MLLM_VISUAL_SCORE_SPARE_ROWS 64

/* ---- build and memory helpers ------------------------------------------------------------------ */
MLLM_API int32_t mllm_is_cuda_build(void);
MLLM_API int32_t mllm_device_count(int32_t* count);
MLLM_API int32_t mllm_malloc(void** ptr, size_t bytes);
MLLM_API int32_t mllm_free(void* ptr);
MLLM_API int32_t mllm_memcpy_to_device(void* dst, void const* src, size_t bytes);
MLLM_API int32_t mllm_memcpy_to_host(void* dst, void const* src, size_t bytes);
MLLM_API int32_t mllm_synchronize(void);
MLLM_API char const* mllm_last_error(void);

/* ---- TokenSelect ---------------------------------------------------------------------------------
 * scores [n_vis] f32, vis_start [1], data [1, seq_len, hidden], positions [1, seq_len]
 * -> data_out [1, kept, hidden], positions_out [1, kept], rows_out [kept], kept = seq_len - n_vis + k.
 * The k best visual rows (ties to the lower index, NaN last) in ascending order. 0 < k <= n_vis. */
MLLM_API size_t mllm_token_select_workspace(int64_t n_vis);
MLLM_API int32_t mllm_token_select(float const* scores, int64_t const* vis_start, void const* data,
    int64_t const* positions, void* data_out, int64_t* positions_out, int64_t* rows_out, int64_t seq_len,
    int64_t hidden, int64_t n_vis, int64_t k, int32_t dtype, void* workspace, void* stream);

/* ---- TokenScatter --------------------------------------------------------------------------------
 * base [1, seq_len, hidden], updates [1, n_rows, hidden], rows [n_rows] distinct,
 * skip_scale [1, seq_len, 1] or NULL -> out [1, seq_len, hidden]. Rows outside [0, seq_len) are skipped. */
MLLM_API int32_t mllm_token_scatter(void const* base, void const* updates, int64_t const* rows,
    void const* skip_scale, void* out, int64_t seq_len, int64_t hidden, int64_t n_rows, int32_t dtype,
    void* stream);

/* ---- VisualScore ---------------------------------------------------------------------------------
 * q [1, heads, q_len, head_dim] (the last q_len tokens), k [1, kv_heads, seq_len, head_dim],
 * positions [1, seq_len], vis_start [1] -> scores [n_vis] f32. Any seq_len; FP32 accumulation.
 * workspace: mllm_visual_score_workspace(q_len, n_vis) bytes, (q_len + SPARE_ROWS) * n_vis floats. */
MLLM_API size_t mllm_visual_score_workspace(int64_t q_len, int64_t n_vis);
MLLM_API int32_t mllm_visual_score(void const* q, void const* k, int64_t const* positions,
    int64_t const* vis_start, float* scores, int64_t heads, int64_t kv_heads, int64_t q_len, int64_t seq_len,
    int64_t head_dim, int64_t n_vis, int32_t query_rows, int32_t head_reduction, int32_t combine, float scale,
    int32_t dtype, void* workspace, void* stream);

/* Host reference build only (routing_host.cpp; the CUDA build does not export it): VisualScore with
 * the tiling given here instead of the MLLM_VISUAL_SCORE_* values, so tests can make tiles small
 * enough for their boundaries, head batches and head splits to show on small inputs. Same
 * workspace as mllm_visual_score. */
MLLM_API int32_t mllm_visual_score_host_tiled(void const* q, void const* k, int64_t const* positions,
    int64_t const* vis_start, float* scores, int64_t heads, int64_t kv_heads, int64_t q_len, int64_t seq_len,
    int64_t head_dim, int64_t n_vis, int32_t query_rows, int32_t head_reduction, int32_t combine, float scale,
    int32_t dtype, void* workspace, void* stream, int64_t row_tile, int64_t key_tile, int64_t dim_chunk,
    int64_t head_batch, int64_t target_blocks);

#ifdef __cplusplus
}
#endif

#endif /* MLLM_ROUTING_KERNELS_H */
