// Host-side helpers of the attention launchers: input checks, tensor views, block tables.
#pragma once

#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../common/torch_glue.h"
#include "attention.cuh"

namespace MBT_NS {
namespace attn_host {

using mbt::attn::TensorRef;

inline void check_qkv(const at::Tensor& t, const char* name, const at::Tensor& q) {
    check_device(t, name);
    TORCH_CHECK(t.dim() == 4, name, ": expected [N, B, H, D], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
                ": the CUDA attention kernel runs on tensor cores in float16 or bfloat16, got ", t.scalar_type(),
                " (use backend 'torch' or 'triton' for float32)");
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.size(1) == q.size(1) && t.size(2) == q.size(2) && t.size(3) == q.size(3), name,
                ": expected batch, heads, head dim of q ", q.sizes(), ", got ", t.sizes());
    const int64_t d = t.size(3);
    TORCH_CHECK(d == 32 || d == 64 || d == 128, name, ": head dim must be 32, 64 or 128, got ", d);
    TORCH_CHECK(t.stride(3) == 1, name, ": last dim must be contiguous, got strides ", t.strides());
    // 16-byte row loads: every row start must be 16-byte aligned
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, ": data pointer must be 16-byte aligned");
    for (int i = 0; i < 3; ++i)
        TORCH_CHECK(t.size(i) == 1 || t.stride(i) % 8 == 0, name, ": strides of dims 0-2 must be multiples of 8, got ",
                    t.strides());
}

// the key mask's bytes (bool [B, Nk], contiguous, on q's device), or nullptr for an empty tensor (no mask)
inline const uint8_t* key_mask_ptr(const at::Tensor& m, const at::Tensor& q, int64_t B, int64_t nk) {
    if (m.numel() == 0) return nullptr;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == nk && m.is_contiguous(),
                "key_mask: expected a contiguous bool tensor [B, Nk] = [", B, ", ", nk, "], got ", m.scalar_type(), " ",
                m.sizes());
    TORCH_CHECK(m.device() == q.device(), "key_mask: expected device ", q.device(), " (q's), got ", m.device());
    return reinterpret_cast<const uint8_t*>(m.data_ptr());
}

inline TensorRef ref(const at::Tensor& t) {
    // strides of size-1 dims are irrelevant (index 0) and may be anything; zero them
    return TensorRef{t.data_ptr(), t.size(0) == 1 ? 0 : t.stride(0), t.size(1) == 1 ? 0 : t.stride(1),
                     t.size(2) == 1 ? 0 : t.stride(2)};
}

using Segment = std::array<int, 4>;

inline std::vector<Segment> segments(const at::Tensor& seg, int64_t nq, int64_t nk) {
    TORCH_CHECK(seg.device().is_cpu() && seg.scalar_type() == at::kInt && seg.dim() == 2 && seg.size(1) == 4,
                "seg: expected a CPU int32 tensor [S, 4], got ", seg.scalar_type(), " ", seg.sizes(), " on ", seg.device());
    TORCH_CHECK(seg.size(0) >= 1, "seg: expected at least one (q_start, q_end, k_start, k_end) row, got none");
    auto s = seg.contiguous();
    const int32_t* p = s.data_ptr<int32_t>();
    std::vector<Segment> out;
    for (int64_t i = 0; i < s.size(0); ++i) {
        Segment g{p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]};
        TORCH_CHECK(0 <= g[0] && g[0] < g[1] && g[1] <= nq && 0 <= g[2] && g[2] < g[3] && g[3] <= nk,
                    "seg: row ", i, " = (", g[0], ", ", g[1], ", ", g[2], ", ", g[3], ") is empty or out of range");
        out.push_back(g);
    }
    return out;
}

// The row ranges of [0, n) that no segment covers (query rows: columns 0-1; key rows: columns 2-3).
inline std::vector<std::pair<int64_t, int64_t>> gaps(std::vector<Segment> segs, int64_t n, bool by_keys) {
    const int c = by_keys ? 2 : 0;
    std::sort(segs.begin(), segs.end(), [c](const Segment& a, const Segment& b) { return a[c] < b[c]; });
    std::vector<std::pair<int64_t, int64_t>> out;
    int64_t reached = 0;
    for (const auto& g : segs) {
        if (g[c] > reached) out.emplace_back(reached, g[c]);
        reached = std::max<int64_t>(reached, g[c + 1]);
    }
    if (reached < n) out.emplace_back(reached, n);
    return out;
}

// `t` uninitialised but for the rows (along `dim`) no segment covers, which are zero: the kernels write
// every covered row, so zero-filling the whole buffer (a unimodal layer's) would be wasted traffic.
inline at::Tensor empty_but_gaps(at::Tensor t, const std::vector<std::pair<int64_t, int64_t>>& rows, int64_t dim = 0) {
    for (const auto& r : rows) t.narrow(dim, r.first, r.second - r.first).zero_();
    return t;
}

// One entry per tile of `rows` (tile size `tile`), each with the segment's `other` range; the longest
// `other` ranges (most work) first, so the last wave of blocks is short.
inline std::vector<Segment> tile_table(const std::vector<Segment>& segs, int tile, bool by_keys) {
    std::vector<Segment> table;
    for (const auto& g : segs) {
        const int r0 = by_keys ? g[2] : g[0], r1 = by_keys ? g[3] : g[1];
        const int o0 = by_keys ? g[0] : g[2], o1 = by_keys ? g[1] : g[3];
        for (int r = r0; r < r1; r += tile) table.push_back({r, std::min(r + tile, r1), o0, o1});
    }
    std::stable_sort(table.begin(), table.end(), [](const Segment& a, const Segment& b) { return a[3] - a[2] > b[3] - b[2]; });
    return table;
}

// The table as an int32 [n, 4] tensor on `device` (read by the kernel as int4). Built and copied once
// per (contents, device) and kept: a layer's tables repeat every step, so no call after the first
// copies to the device or waits for the copy (CUDA graphs can capture the launch). Keyed by contents,
// a cached table is always the right one; the cache is leaked on purpose (no device frees at exit).
inline at::Tensor table_tensor(const std::vector<Segment>& table, const at::Device& device) {
    using Key = std::pair<std::vector<Segment>, std::string>;
    static std::mutex mutex;
    static auto* cache = new std::map<Key, at::Tensor>();
    Key key{table, device.str()};
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = cache->find(key); it != cache->end()) return it->second;
    if (cache->size() >= 1024) cache->clear();  // bounded: only a sweep over many layouts gets here
    auto t = at::empty({static_cast<int64_t>(table.size()), 4}, at::TensorOptions().dtype(at::kInt));
    std::copy(&table[0][0], &table[0][0] + 4 * table.size(), t.data_ptr<int32_t>());
    if (!device.is_cpu()) t = t.to(device, /*non_blocking=*/false);
    cache->emplace(std::move(key), t);
    return t;
}

}  // namespace attn_host
}  // namespace MBT_NS
