// Per-element logic of the routing kernels, shared by the CUDA build (routing_kernels.cu) and the
// host reference build (routing_host.cpp) of the same C ABI. Everything here is a pure inline
// function usable on both sides, so the host build checks the very rules the GPU kernels apply.
// The spec both are tested against is plugins/ops.py (NumPy).
#ifndef MLLM_ROUTING_MATH_H
#define MLLM_ROUTING_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define MLLM_HD __host__ __device__ __forceinline__
#else
#define MLLM_HD static inline
#endif

#include "routing_kernels.h"

namespace mllm
{

// ---- float16 <-> float32 (bit patterns, round to nearest even) ------------------------------------
MLLM_HD float bits_to_float(uint32_t bits)
{
    float value;
    memcpy(&value, &bits, sizeof(value));
    return value;
}

MLLM_HD uint32_t float_to_bits(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    return bits;
}

MLLM_HD float half_to_float(uint16_t h)
{
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    uint32_t const sign = (uint32_t) (h & 0x8000u) << 16;
    uint32_t const exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) // inf / nan
        return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
    if (exponent != 0)
        return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    if (mantissa == 0)
        return bits_to_float(sign);
    int32_t e = -1; // subnormal: normalise
    do
    {
        ++e;
        mantissa <<= 1;
    } while ((mantissa & 0x400u) == 0);
    return bits_to_float(sign | ((uint32_t) (112 - e) << 23) | ((mantissa & 0x3FFu) << 13));
#endif
}

MLLM_HD uint16_t float_to_half(float value)
{
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(value));
#else
    uint32_t const bits = float_to_bits(value);
    uint32_t const sign = (bits >> 16) & 0x8000u;
    uint32_t const abs_bits = bits & 0x7FFFFFFFu;
    if (abs_bits >= 0x7F800000u) // inf or nan (nan stays a quiet nan)
        return (uint16_t) (sign | 0x7C00u | (abs_bits > 0x7F800000u ? 0x200u : 0u));
    if (abs_bits >= 0x477FF000u) // rounds to >= 65520: overflow to inf
        return (uint16_t) (sign | 0x7C00u);
    if (abs_bits < 0x38800000u) // below the smallest normal half: subnormal or zero
    {
        if (abs_bits < 0x33000000u) // below half of the smallest subnormal: rounds to zero
            return (uint16_t) sign;
        uint32_t const exponent = abs_bits >> 23;
        uint32_t const mantissa = (abs_bits & 0x7FFFFFu) | 0x800000u;
        uint32_t const shift = 126u - exponent; // 14..24
        uint32_t result = mantissa >> shift;
        uint32_t const rest = mantissa & ((1u << shift) - 1u);
        uint32_t const halfway = 1u << (shift - 1u);
        if (rest > halfway || (rest == halfway && (result & 1u)))
            ++result;
        return (uint16_t) (sign | result);
    }
    uint32_t result = ((abs_bits >> 13) - (112u << 10));
    uint32_t const rest = abs_bits & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (result & 1u)))
        ++result; // a carry into the exponent is the correct rounding
    return (uint16_t) (sign | result);
#endif
}

MLLM_HD float load_float(void const* base, int64_t index, int32_t dtype)
{
    return dtype == MLLM_DTYPE_FLOAT16 ? half_to_float(static_cast<uint16_t const*>(base)[index])
                                       : static_cast<float const*>(base)[index];
}

MLLM_HD int64_t dtype_size(int32_t dtype)
{
    return dtype == MLLM_DTYPE_FLOAT16 ? 2 : 4;
}

// ---- TokenSelect --------------------------------------------------------------------------------
// The first visual row; out-of-range starts are clamped (the NumPy reference raises) so that a bad
// value can never make a kernel read or write out of bounds.
MLLM_HD int64_t clamp_vis_start(int64_t vis_start, int64_t n_vis, int64_t seq_len)
{
    int64_t const last = seq_len - n_vis;
    return vis_start < 0 ? 0 : (vis_start > last ? (last < 0 ? 0 : last) : vis_start);
}

// Total order of TopK (largest first, ties to the lower index) that numpy's stable argsort of -score
// gives: NaN ranks below every number, -inf included.
MLLM_HD bool ranks_before(float a, int64_t i, float b, int64_t j)
{
    bool const a_nan = a != a;
    bool const b_nan = b != b;
    if (a_nan || b_nan)
        return !a_nan || (b_nan && i < j);
    return a > b || (a == b && i < j);
}

// Source row of output row r: text before the image, the kept visual rows (ascending, from
// kept_rows), then the text after the image.
MLLM_HD int64_t select_source_row(int64_t r, int64_t vis_start, int64_t n_vis, int64_t k, int64_t kept_row)
{
    if (r < vis_start)
        return r;
    if (r < vis_start + k)
        return kept_row;
    return r + (n_vis - k);
}

// ---- TokenScatter -------------------------------------------------------------------------------
// base * skip_scale rounded once to the element type (exact product in float32 for float16 inputs).
MLLM_HD float scaled(float base, float scale)
{
    return base * scale;
}

// ---- VisualScore --------------------------------------------------------------------------------
// The query rows are always the contiguous range [first, seq_len) of sequence rows.
MLLM_HD int64_t first_query_row(int32_t query_rows, int64_t vis_start, int64_t n_vis, int64_t seq_len)
{
    if (query_rows == MLLM_QUERY_LAST_TEXT)
        return seq_len - 1;
    if (query_rows == MLLM_QUERY_TEXT)
        return vis_start + n_vis;
    return vis_start; // visual_and_text
}

// First sequence row actually scored: rows before q's first row (q may hold only the last q_len
// tokens) are ignored, where the NumPy reference raises.
MLLM_HD int64_t first_scored_row(int32_t query_rows, int64_t vis_start, int64_t n_vis, int64_t seq_len, int64_t q_len)
{
    int64_t const first = first_query_row(query_rows, vis_start, n_vis, seq_len);
    int64_t const first_in_q = seq_len - q_len;
    return first < first_in_q ? first_in_q : first;
}

MLLM_HD bool is_future(int64_t key_position, int64_t row_position)
{
    return key_position > row_position;
}

// One head's visual probability folded into the per-row head reduction (mean: summed here and
// divided by the head count at the end, in the order h = 0, 1, ...). `head` counts from the first
// head folded into this value; the per-split values are folded together with it too (head = split).
MLLM_HD float reduce_heads(float accumulated, float probability, int32_t head, int32_t head_reduction)
{
    if (head == 0)
        return probability;
    if (head_reduction == MLLM_HEADS_MAX)
        return probability > accumulated ? probability : accumulated;
    return accumulated + probability;
}

MLLM_HD float finish_heads(float accumulated, int64_t heads, int32_t head_reduction)
{
    return head_reduction == MLLM_HEADS_MAX ? accumulated : accumulated / (float) heads;
}

// Final score of one visual token from its head-reduced rows, summed in row order:
// rows_sum = all rows (single), or self_sum = rows [0, n_vis) and cross_sum = rows [n_vis, R).
MLLM_HD float combine_rows(float rows_sum, float self_sum, float cross_sum, int64_t rows, int64_t n_vis,
    int32_t combine)
{
    if (rows <= 0)
        return 0.0f; // the reference raises: no query rows
    if (combine == MLLM_COMBINE_SELF_TIMES_CROSS)
    {
        int64_t const cross_rows = rows - n_vis > 1 ? rows - n_vis : 1;
        return (self_sum / (float) n_vis) * (cross_sum / (float) cross_rows);
    }
    return rows_sum / (float) rows;
}

// ---- VisualScore tiling ---------------------------------------------------------------------------
// Both builds walk the same structure: one block per (tile of `row_tile` query rows, split of the
// heads); in a block, heads in batches of `head_batch`; pass 1 streams all keys in tiles of
// `key_tile` and keeps an online (max, sum) per row and head; pass 2 streams the visual keys in
// tiles, recomputes their logits and folds exp(logit - max) / sum into the head reduction. Dot
// products run over head_dim in chunks of `dim_chunk` (the columns staged in shared memory at once).
struct VisualTiling
{
    int64_t row_tile, key_tile, dim_chunk, head_batch, target_blocks;
};

MLLM_HD VisualTiling kernel_tiling()
{
    return VisualTiling{MLLM_VISUAL_SCORE_ROW_TILE, MLLM_VISUAL_SCORE_KEY_TILE, MLLM_VISUAL_SCORE_DIM_CHUNK,
        MLLM_VISUAL_SCORE_HEAD_BATCH, MLLM_VISUAL_SCORE_TARGET_BLOCKS};
}

MLLM_HD int64_t ceil_div(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

MLLM_HD float larger(float a, float b)
{
    return a > b ? a : b;
}

// Floats the workspace holds: one [rows, n_vis] slab per head split, rows <= q_len.
MLLM_HD int64_t visual_workspace_floats(int64_t q_len, int64_t n_vis)
{
    return (q_len + MLLM_VISUAL_SCORE_SPARE_ROWS) * n_vis;
}

// Heads per block. Few row tiles (last_text: one) would leave most of the GPU idle, so the heads are
// shared out over up to target_blocks / row_tiles blocks, as many as the workspace has slabs for.
// The split count is then ceil_div(heads, heads_per_split). `rows` depends on vis_start, which only
// the device reads, so both kernels work this out themselves (the launcher cannot).
MLLM_HD int64_t visual_heads_per_split(int64_t heads, int64_t rows, int64_t q_len, int64_t row_tile,
    int64_t target_blocks)
{
    if (rows <= 0)
        return heads;
    int64_t splits = ceil_div(target_blocks, ceil_div(rows, row_tile));
    int64_t const slabs = (q_len + MLLM_VISUAL_SCORE_SPARE_ROWS) / rows;
    splits = splits < slabs ? splits : slabs;
    splits = splits < heads ? splits : heads;
    splits = splits < 1 ? 1 : splits;
    return ceil_div(heads, splits); // ceil_div(heads, result) <= splits, so the slabs suffice
}

// Blocks to launch (1-D grid) without knowing `rows`: row_tiles * splits <= row_tiles *
// ceil(target / row_tiles) < row_tiles + target, and row_tiles <= ceil(q_len / row_tile). Block b
// scores row tile b % row_tiles for head split b / row_tiles; blocks past row_tiles * splits leave.
MLLM_HD int64_t visual_grid_blocks(int64_t q_len, int64_t row_tile, int64_t target_blocks)
{
    return ceil_div(q_len, row_tile) + target_blocks;
}

// A (query row, key) pair takes part in the softmax: both exist and the key is not in the row's future.
MLLM_HD bool pair_visible(bool row_valid, bool key_valid, int64_t key_position, int64_t row_position)
{
    return row_valid && key_valid && !is_future(key_position, row_position);
}

MLLM_HD float visual_logit(float dot, float scale, bool visible)
{
    return visible ? dot * scale : -INFINITY;
}

// One term of a tile's sum of exponentials, taken relative to the tile's max (0 for an all-masked tile).
MLLM_HD float tile_exp(float logit, float tile_max)
{
    return tile_max == -INFINITY ? 0.0f : expf(logit - tile_max);
}

// Online softmax: fold a tile's (max, sum of exp(logit - max)) into the row's running (max, sum),
// rescaling whichever sum was taken relative to the smaller max.
MLLM_HD void softmax_merge(float& row_max, float& row_sum, float tile_max, float tile_sum)
{
    if (tile_max == -INFINITY)
        return; // nothing visible in the tile
    float const new_max = larger(row_max, tile_max);
    row_sum = row_sum * expf(row_max - new_max) + tile_sum * expf(tile_max - new_max);
    row_max = new_max;
}

// Pass 2: the softmax probability of one logit from its row's final (max, sum).
MLLM_HD float softmax_probability(float logit, float row_max, float row_sum)
{
    return expf(logit - row_max) / row_sum;
}

// Where pass 2 keeps a head-reduced probability: slab `split`, scored row r, visual token v.
MLLM_HD int64_t partial_index(int64_t split, int64_t r, int64_t v, int64_t rows, int64_t n_vis)
{
    return (split * rows + r) * n_vis + v;
}

// ---- argument checks (both builds refuse the same calls) ------------------------------------------
static inline bool valid_dtype(int32_t dtype)
{
    return dtype == MLLM_DTYPE_FLOAT32 || dtype == MLLM_DTYPE_FLOAT16;
}

static inline int32_t check_token_select(int64_t seq_len, int64_t hidden, int64_t n_vis, int64_t k, int32_t dtype)
{
    bool const ok = seq_len > 0 && hidden > 0 && n_vis > 0 && n_vis <= seq_len && k > 0 && k <= n_vis
        && valid_dtype(dtype);
    return ok ? MLLM_OK : MLLM_ERR_ARGUMENT;
}

static inline int32_t check_token_scatter(int64_t seq_len, int64_t hidden, int64_t n_rows, int32_t dtype)
{
    return seq_len > 0 && hidden > 0 && n_rows >= 0 && valid_dtype(dtype) ? MLLM_OK : MLLM_ERR_ARGUMENT;
}

static inline int32_t check_visual_score(int64_t heads, int64_t kv_heads, int64_t q_len, int64_t seq_len,
    int64_t head_dim, int64_t n_vis, int32_t query_rows, int32_t head_reduction, int32_t combine, int32_t dtype)
{
    bool const ok = heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && q_len > 0 && q_len <= seq_len
        && head_dim > 0 && n_vis > 0 && n_vis <= seq_len
        && query_rows >= MLLM_QUERY_LAST_TEXT && query_rows <= MLLM_QUERY_VISUAL_AND_TEXT
        && (head_reduction == MLLM_HEADS_MEAN || head_reduction == MLLM_HEADS_MAX)
        && (combine == MLLM_COMBINE_SINGLE || combine == MLLM_COMBINE_SELF_TIMES_CROSS) && valid_dtype(dtype);
    return ok ? MLLM_OK : MLLM_ERR_ARGUMENT;
}

} // namespace mllm

#endif // MLLM_ROUTING_MATH_H
