// Gather-sum of the CPU Memory Layer and its backward (docs/model.md, "The Memory Layer").
//
// The work is one weighted row read per token and table, so speed is decided by where the rows come from.
// The forward walks the tables in column blocks of kBlock floats, from a contiguous float copy laid out
// [block][table][row][kBlock] (the tables' own rows sit 4 D bytes apart, a power of two that maps a column
// slice onto a few cache sets). It makes that copy on every call, unless the caller kept one (pack_tables):
// the copy reads every row of every table, so at a few thousand tokens it costs more than the gather itself.
//   forward: a thread owns a range of tokens; per tile of them and column block, tokens stream over a group of
//            up to four tables whose block fits in L2, reading and writing the tile's partial sums once per
//            group. A tile is the thread's whole range up to 16k tokens: the tables then come from memory once
//            per thread, which outweighs the partial sums' spilling from L2 at large tiles. Software prefetches
//            hide what the hardware cannot predict: a token's rows (L2 -> L1, a few tokens ahead) and the next
//            group's block (memory -> L2, a slice per token).
//   backward: per tile of tokens and table, tokens are bucketed by code; a row and its gradient stay in
//            registers while the tokens that chose it stream past, so each token and table costs one read of
//            dy instead of a row read plus a read and a write of its gradient. Each row block is read once, so
//            it is read where it is, not copied. A thread owns whole tables; the last tile writes the gradient
//            straight into the tables' layout with stores that bypass the caches, and with one tile (up to 16k
//            tokens) that is the only write: no blocked gradient is written and then copied out.
// No atomics: every value has one writer, and every sum runs in a fixed order (tables ascending, tokens
// ascending, column blocks ascending) whatever the thread count, so results are bit-identical run to run and
// across thread counts.
#include "memory_layer.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

namespace megamem {
namespace {

constexpr int kVecs = 4;                          // vectors per column block
constexpr int64_t kBlock = kVecs * kLanes;        // floats per column block: two 64-byte cache lines
constexpr int64_t kRowBytes = kBlock * sizeof(float);
constexpr int64_t kGroupTables = 4;               // tables summed per pass over a tile's partial sums,
constexpr int64_t kGroupBytes = 512 * 1024;       // fewer where four tables' block would outgrow a 512 KB L2
constexpr int64_t kTileBytes = 2048 * 1024;       // a tile's partial sums (or block of dy): 16k tokens
constexpr int64_t kAhead = 8;                     // tokens between fetching a token's rows (forward) or dy
                                                  // (backward) into L1 and using them

struct Layout {
  int64_t tokens, chunks, rows, width, blocks, group, tile;

  int64_t valid(int64_t block) const { return std::min(kBlock, width - block * kBlock); }
  int64_t block_vecs() const { return chunks * rows * kVecs; }
};

Layout layout_of(int64_t tokens, const at::Tensor& tables) {
  const int64_t chunks = tables.size(0), rows = tables.size(1), width = tables.size(2);
  const int64_t group = std::clamp<int64_t>(kGroupBytes / (rows * kRowBytes), 1, std::min(kGroupTables, chunks));
  return {tokens, chunks, rows, width, (width + kBlock - 1) / kBlock, group, kTileBytes / kRowBytes};
}

// What each kept buffer holds; forward and backward share the slots of the same role.
enum Slot { kBlocked, kIndex, kWeight, kGradient, kSortedDp, kBucketStarts, kTile, kSlots };

// Buffers kept between calls, one set per thread (the calling thread's for whole-call buffers, each worker's for
// its tile): allocating (and page-faulting) tens of megabytes per call would cost as much as the gather itself.
// A buffer grows to the largest layer it has served.
template <typename T>
T* scratch(Slot slot, int64_t count) {
  thread_local std::vector<std::unique_ptr<char[]>> buffers(kSlots);
  thread_local std::vector<int64_t> sizes(kSlots, 0);
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T)) + 64;
  if (sizes[slot] < bytes) {
    buffers[slot].reset(new char[bytes]);
    sizes[slot] = bytes;
  }
  const auto address = reinterpret_cast<uintptr_t>(buffers[slot].get());
  return reinterpret_cast<T*>((address + 63) & ~uintptr_t{63});
}

// Contiguous ranges of [0, count) for the threads, the first ones one larger; every range is worked by one thread.
template <typename Work>
void for_each_share(int64_t count, Work work) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t part = first; part < last; ++part) {
      const int64_t base = count / parts, extra = count % parts;
      const int64_t begin = part * base + std::min(part, extra);
      work(begin, begin + base + (part < extra));
    }
  });
}

// One column block of a row (tables, dy, bias) as kVecs vectors of float, zero past the last column. Whole
// blocks, all but the last, take a copy of constant size that compiles to a few vector moves instead of a call.
template <typename T>
void load_block(const T* row, const Layout& s, int64_t b, Vec* dst) {
  float* floats = reinterpret_cast<float*>(dst);
  if (s.valid(b) == kBlock) return load_floats(row + b * kBlock, kBlock, floats);
  load_floats(row + b * kBlock, s.valid(b), floats);
  std::fill(floats + s.valid(b), floats + kBlock, 0.0f);
}

// The inverse: the valid columns of one column block into a row, in the row's dtype.
template <typename T>
void store_block(const Vec* src, const Layout& s, int64_t b, T* row) {
  const float* floats = reinterpret_cast<const float*>(src);
  if (s.valid(b) == kBlock) return store_floats(floats, kBlock, row + b * kBlock);
  store_floats(floats, s.valid(b), row + b * kBlock);
}

// Asks for the kRowBytes at `row` in L1, for a row read a few tokens from now at an address no hardware
// prefetcher can predict.
inline void prefetch_row(const Vec* row) {
  for (int64_t line = 0; line < kRowBytes; line += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + line, 0, 3);
}

// blocked[b][k][r][:] = tables[k, r, column block b] as float, zero past the last column.
template <typename T>
const Vec* pack(const T* tables, const Layout& s, Vec* blocked) {
  at::parallel_for(0, s.chunks * s.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t b = 0; b < s.blocks; ++b) load_block(tables + row * s.width, s, b, blocked + (b * s.chunks * s.rows + row) * kVecs);
    }
  });
  return blocked;
}

// Each token's (row offset in a column block, p) for its tables, laid out group by group ([group][N][tables in it]),
// so that a pass over one group reads them in sequence.
struct Entries {
  int32_t* offset;
  float* p;

  int64_t at(const Layout& s, int64_t g0, int64_t n) const { return g0 * s.tokens + n * (std::min(g0 + s.group, s.chunks) - g0); }
};

Entries entries_of(const int16_t* codes, const float* p, const Layout& s) {
  Entries e{scratch<int32_t>(kIndex, s.tokens * s.chunks), scratch<float>(kWeight, s.tokens * s.chunks)};
  at::parallel_for(0, s.tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g0 = 0; g0 < s.chunks; g0 += s.group) {
        const int64_t at = e.at(s, g0, n), g1 = std::min(g0 + s.group, s.chunks);
        for (int64_t k = g0; k < g1; ++k) {
          e.offset[at + k - g0] = static_cast<int32_t>((k * s.rows + codes[n * s.chunks + k]) * kVecs);
          e.p[at + k - g0] = p[n * s.chunks + k];
        }
      }
    }
  });
  return e;
}

// Few tokens (decoding): reading their rows in place beats copying the tables, which reads all R rows of each. The
// rows come from memory at addresses only the codes tell, so each work item fetches the rows of the tables
// kTablesAhead on while it sums one, so that several rows are on their way at once, and a token's columns are
// cut into as many pieces as it takes to give every thread work, even for one token.
constexpr int64_t kSumFloats = 512;               // columns summed at a time: their partial sums stay in L1
constexpr int64_t kTablesAhead = 4;

template <typename T>
void gather_sum_in_place(const int16_t* codes, const float* p, const T* tables, const T* bias, const Layout& s,
                         T* y) {
  if (s.tokens == 0 || s.width == 0) return;
  const int64_t lines = (s.width + 15) / 16;                       // 64-byte lines of float columns
  const int64_t pieces = std::clamp<int64_t>((at::get_num_threads() + s.tokens - 1) / s.tokens, 1, lines);
  const int64_t piece = (lines + pieces - 1) / pieces * 16;        // columns per piece, whole lines
  at::parallel_for(0, s.tokens * pieces, 1, [&](int64_t begin, int64_t end) {
    float acc[kSumFloats], row[kSumFloats];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / pieces, first = (item % pieces) * piece, last = std::min(s.width, first + piece);
      const int16_t* code = codes + n * s.chunks;
      const auto row_of = [&](int64_t k) { return tables + (k * s.rows + code[k]) * s.width; };
      for (int64_t c0 = first; c0 < last; c0 += kSumFloats) {
        const int64_t width = std::min(kSumFloats, last - c0);
        if (bias) load_floats(bias + c0, width, acc); else std::fill(acc, acc + width, 0.0f);
        for (int64_t k = 0; k < s.chunks; ++k) {
          if (k + kTablesAhead < s.chunks) {
            const char* ahead = reinterpret_cast<const char*>(row_of(k + kTablesAhead) + c0);
            for (int64_t byte = 0; byte < width * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(ahead + byte, 0, 3);
          }
          const float pk = p[n * s.chunks + k];
          const float* values = row;
          if constexpr (std::is_same_v<T, float>) values = row_of(k) + c0; else load_floats(row_of(k) + c0, width, row);
          for (int64_t j = 0; j < width; ++j) acc[j] += pk * values[j];
        }
        store_floats(acc, width, y + n * s.width + c0);
      }
    }
  });
}

// Brings `bytes` at `start` into L2 a slice per call over `steps` calls: the tables of the next step arrive in
// sequence while the current step is worked, instead of as random misses when its first tokens look up rows.
class StreamAhead {
 public:
  StreamAhead(const void* start, int64_t bytes, int64_t steps)
      : next_(static_cast<const char*>(start)), end_(next_ + bytes), stride_((bytes / steps / 64 + 1) * 64) {}

  void step() {
    for (const char* stop = std::min(next_ + stride_, end_); next_ < stop; next_ += 64) __builtin_prefetch(next_, 0, 2);
  }

 private:
  const char* next_;
  const char* end_;
  int64_t stride_;
};

// One step of the forward for tokens [t0, t1): acc = (first group ? bias : saved partial sums) + the group's
// weighted rows, written to y after the last group and to the partial sums before it. The group size is a
// template argument for the common sizes (the loops over tables unroll into straight-line code) and
// `runtime_size` otherwise.
template <int kSize, typename T>
void sum_group(const Vec* block, const int32_t* offset, const float* pk, int64_t runtime_size, int64_t t0, int64_t t1,
               const Vec* start, Vec* partial, StreamAhead& stream, const Layout& s, int64_t b, T* y) {
  const int64_t size = kSize > 0 ? kSize : runtime_size;
  for (int64_t n = t0; n < t1; ++n, offset += size, pk += size) {
    if (n + kAhead < t1) {
      for (int64_t k = 0; k < size; ++k) prefetch_row(block + offset[k + kAhead * size]);
    }
    stream.step();
    Vec acc[kVecs];
    Vec* saved = partial + (n - t0) * kVecs;
    for (int v = 0; v < kVecs; ++v) acc[v] = start ? start[v] : saved[v];
    for (int64_t k = 0; k < size; ++k) {
      const Vec* row = block + offset[k];
      for (int v = 0; v < kVecs; ++v) acc[v] += pk[k] * row[v];
    }
    if (y) {
      Vec out[kVecs];                               // a copy, so that acc stays in registers on the other path
      for (int v = 0; v < kVecs; ++v) out[v] = acc[v];
      store_block(out, s, b, y + n * s.width);
    } else {
      for (int v = 0; v < kVecs; ++v) saved[v] = acc[v];
    }
  }
}

// y[n, :] = bias + sum_k p[n, k] tables[k, codes[n, k], :]. A thread owns a range of tokens, so it alone writes
// (and page-faults) its rows of y. Per tile of its tokens it takes steps (column block, group of tables), column
// block outer: the tile's index entries stay in cache across the column blocks, and each step's tables are read
// from memory once per tile. While token n is summed, the rows of token n + kAhead are fetched from L2 into L1, and
// the next step's tables are streamed into L2.
template <typename T>
void gather_sum_blocked(const int16_t* codes, const float* p, const T* tables, const Vec* packed, const T* bias,
                        const Layout& s, T* y) {
  const Vec* blocked = packed ? packed : pack(tables, s, scratch<Vec>(kBlocked, s.blocks * s.block_vecs()));
  const Entries e = entries_of(codes, p, s);
  const int64_t groups = (s.chunks + s.group - 1) / s.group, steps = s.blocks * groups;
  const auto tables_of = [&](int64_t step) {
    return blocked + (step / groups) * s.block_vecs() + (step % groups) * s.group * s.rows * kVecs;
  };
  const auto size_of = [&](int64_t step) { return std::min(s.group, s.chunks - (step % groups) * s.group); };
  for_each_share(s.tokens, [&](int64_t first, int64_t last) {
    Vec* partial = scratch<Vec>(kTile, std::min(s.tile, last - first) * kVecs);
    for (int64_t t0 = first; t0 < last; t0 += s.tile) {
      const int64_t t1 = std::min(t0 + s.tile, last);
      for (int64_t step = 0; step < steps; ++step) {
        const int64_t b = step / groups, g0 = (step % groups) * s.group, size = size_of(step);
        const int64_t next = (step + 1) % steps;
        StreamAhead stream(tables_of(next), step + 1 < steps || t1 < last ? size_of(next) * s.rows * kRowBytes : 0, t1 - t0);
        Vec start[kVecs] = {};
        if (bias && g0 == 0) load_block(bias, s, b, start);
        const auto run = size == 4 ? sum_group<4, T> : size == 2 ? sum_group<2, T> : size == 1 ? sum_group<1, T> : sum_group<0, T>;
        run(blocked + b * s.block_vecs(), e.offset + e.at(s, g0, t0), e.p + e.at(s, g0, t0), size, t0, t1,
            g0 == 0 ? start : nullptr, partial, stream, s, b, g0 + size == s.chunks ? y : nullptr);
      }
    }
  });
}

// Per tile of tokens and per table, the tile's tokens sorted by code (a stable counting sort), with their p:
// laid out [tile][table][position], bucket r of (tile, table) spanning positions start[r] .. start[r + 1].
struct Buckets {
  int32_t* token;
  float* p;
  int32_t* start;                                   // [tiles][K][R + 1]

  int64_t base(const Layout& s, int64_t t0, int64_t k) const { return t0 * s.chunks + k * (std::min(t0 + s.tile, s.tokens) - t0); }
  int32_t* starts(const Layout& s, int64_t t0, int64_t k) const { return start + ((t0 / s.tile) * s.chunks + k) * (s.rows + 1); }
};

Buckets buckets_of(const int16_t* codes, const float* p, const Layout& s) {
  const int64_t tiles = (s.tokens + s.tile - 1) / s.tile;
  Buckets e{scratch<int32_t>(kIndex, s.tokens * s.chunks), scratch<float>(kWeight, s.tokens * s.chunks),
            scratch<int32_t>(kBucketStarts, tiles * s.chunks * (s.rows + 1))};
  at::parallel_for(0, tiles * s.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> next(s.rows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t0 = (item / s.chunks) * s.tile, k = item % s.chunks, t1 = std::min(t0 + s.tile, s.tokens);
      int32_t* start = e.starts(s, t0, k);
      std::fill(start, start + s.rows + 1, 0);
      for (int64_t n = t0; n < t1; ++n) ++start[codes[n * s.chunks + k] + 1];
      for (int64_t r = 0; r < s.rows; ++r) start[r + 1] += start[r];
      std::copy(start, start + s.rows, next.begin());
      const int64_t base = e.base(s, t0, k);
      for (int64_t n = t0; n < t1; ++n) {
        const int32_t at = next[codes[n * s.chunks + k]]++;
        e.token[base + at] = static_cast<int32_t>(n);
        e.p[base + at] = p[n * s.chunks + k];
      }
    }
  });
  return e;
}

// dtables[k, r, :] = sum_{n: codes[n, k] = r} p[n, k] dy[n, :] and dp[n, k] = <dy[n, :], tables[k, codes[n, k], :]>.
// Tokens are visited bucket by bucket, so a table row and its gradient stay in registers while the tokens that
// chose it stream past: one read of dy per token and table, instead of reading the row and reading and writing
// its gradient. A thread owns whole tables: whole rows of the table gradient and whole columns of dp. The dy tile
// outgrows L2 (1 MB at 8k tokens), and the buckets visit its rows out of order, so the dy of the visit kAhead on
// is fetched into L1 ahead of its use.
template <typename T>
void gather_sum_backward_blocked(const T* dy, const int16_t* codes, const float* p, const T* tables, const Layout& s,
                                 T* dtables, float* dp) {
  const Buckets e = buckets_of(codes, p, s);
  Vec* grad = scratch<Vec>(kGradient, s.blocks * s.block_vecs());         // the gradient between tiles, blocked
  float* dp_sorted = scratch<float>(kSortedDp, s.tokens * s.chunks);      // dp laid out as the buckets
  std::fill(dp_sorted, dp_sorted + s.tokens * s.chunks, 0.0f);
  for_each_share(s.chunks, [&](int64_t k0, int64_t k1) {
    Vec* dy_tile = scratch<Vec>(kTile, std::min(s.tile, s.tokens) * kVecs);
    for (int64_t b = 0; b < s.blocks; ++b) {
      for (int64_t t0 = 0; t0 < s.tokens; t0 += s.tile) {
        const int64_t t1 = std::min(t0 + s.tile, s.tokens);
        const bool first = t0 == 0, last = t1 == s.tokens;
        for (int64_t n = t0; n < t1; ++n) load_block(dy + n * s.width, s, b, dy_tile + (n - t0) * kVecs);
        for (int64_t k = k0; k < k1; ++k) {
          const int32_t* start = e.starts(s, t0, k);
          const int64_t base = e.base(s, t0, k), end = base + (t1 - t0);
          for (int64_t r = 0; r < s.rows; ++r) {
            const int64_t at = b * s.block_vecs() + (k * s.rows + r) * kVecs;
            if (start[r] == start[r + 1] && !first && !last) continue;
            Vec row[kVecs], acc[kVecs];
            load_block(tables + (k * s.rows + r) * s.width, s, b, row);
            for (int v = 0; v < kVecs; ++v) acc[v] = first ? Vec{} : grad[at + v];
            for (int64_t i = base + start[r]; i < base + start[r + 1]; ++i) {
              if (i + kAhead < end) prefetch_row(dy_tile + (e.token[i + kAhead] - t0) * kVecs);
              const Vec* d = dy_tile + (e.token[i] - t0) * kVecs;
              Vec dot = row[0] * d[0];
              for (int v = 1; v < kVecs; ++v) dot += row[v] * d[v];
              dp_sorted[i] += sum(dot);
              for (int v = 0; v < kVecs; ++v) acc[v] += e.p[i] * d[v];
            }
            if (last) {
              T* out = dtables + (k * s.rows + r) * s.width;
              if (!(s.valid(b) == kBlock && stream_floats(acc, kVecs, out + b * kBlock))) store_block(acc, s, b, out);
            } else {
              for (int v = 0; v < kVecs; ++v) grad[at + v] = acc[v];
            }
          }
        }
      }
    }
    stream_fence();
  });
  const int64_t tiles = (s.tokens + s.tile - 1) / s.tile;
  at::parallel_for(0, tiles * s.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t0 = (item / s.chunks) * s.tile, k = item % s.chunks, base = e.base(s, t0, k);
      for (int64_t i = base; i < base + std::min(s.tile, s.tokens - t0); ++i) dp[e.token[i] * s.chunks + k] = dp_sorted[i];
    }
  });
}

}  // namespace

bool reads_in_place(int64_t tokens, int64_t rows) { return tokens < rows; }

at::Tensor pack_tables(const at::Tensor& tables) {
  const Layout s = layout_of(0, tables);
  auto packed = at::empty({s.blocks, s.chunks, s.rows, kBlock}, tables.options().dtype(at::kFloat));
  dispatch(tables.scalar_type(), "pack_tables", [&](auto element) {
    using T = decltype(element);
    pack(tables.data_ptr<T>(), s, reinterpret_cast<Vec*>(packed.data_ptr<float>()));
  });
  return packed;
}

at::Tensor gather_sum(const at::Tensor& codes, const at::Tensor& p, const at::Tensor& tables,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& packed) {
  const Layout s = layout_of(codes.size(0), tables);
  auto y = at::empty({s.tokens, s.width}, tables.options());
  dispatch(tables.scalar_type(), "gather_sum", [&](auto element) {
    using T = decltype(element);
    const T* b = bias ? bias->data_ptr<T>() : nullptr;
    if (reads_in_place(s.tokens, s.rows)) {
      gather_sum_in_place<T>(codes.data_ptr<int16_t>(), p.data_ptr<float>(), tables.data_ptr<T>(), b, s, y.data_ptr<T>());
    } else {
      const Vec* blocked = packed ? reinterpret_cast<const Vec*>(packed->data_ptr<float>()) : nullptr;
      gather_sum_blocked<T>(codes.data_ptr<int16_t>(), p.data_ptr<float>(), tables.data_ptr<T>(), blocked, b, s,
                            y.data_ptr<T>());
    }
  });
  return y;
}

std::vector<at::Tensor> gather_sum_backward(const at::Tensor& dy, const at::Tensor& codes, const at::Tensor& p,
                                            const at::Tensor& tables) {
  const Layout s = layout_of(codes.size(0), tables);
  auto dp = at::empty({s.tokens, s.chunks}, p.options());
  if (s.tokens == 0) return {at::zeros_like(tables), dp};     // the kernel writes table gradients on its last tile
  auto dtables = at::empty_like(tables);
  dispatch(tables.scalar_type(), "gather_sum_backward", [&](auto element) {
    using T = decltype(element);
    gather_sum_backward_blocked<T>(dy.data_ptr<T>(), codes.data_ptr<int16_t>(), p.data_ptr<float>(),
                                   tables.data_ptr<T>(), s, dtables.data_ptr<T>(), dp.data_ptr<float>());
  });
  return {dtables, dp};
}

}  // namespace megamem
