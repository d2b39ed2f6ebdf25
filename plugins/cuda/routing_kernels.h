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

/* VisualScore keeps one row of logits, one query row and a reduction scratch in shared memory:
 * (seq_len + head_dim + 32) floats must fit in 48 KiB, i.e. seq_len + head_dim <= 12256. */
#define MLLM_VISUAL_SCORE_SHARED_FLOATS 12288

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
 * positions [1, seq_len], vis_start [1] -> scores [n_vis] f32. seq_len + head_dim <= 12256. */
MLLM_API size_t mllm_visual_score_workspace(int64_t q_len, int64_t n_vis);
MLLM_API int32_t mllm_visual_score(void const* q, void const* k, int64_t const* positions,
    int64_t const* vis_start, float* scores, int64_t heads, int64_t kv_heads, int64_t q_len, int64_t seq_len,
    int64_t head_dim, int64_t n_vis, int32_t query_rows, int32_t head_reduction, int32_t combine, float scale,
    int32_t dtype, void* workspace, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* MLLM_ROUTING_KERNELS_H */
