// Codec: the byte format of argument and result streams. A stream is a count of positional
// and keyword items, then tagged items: scalars inline, str/bytes/pickles as length + bytes,
// arrays as a small header (dtype, shape) and their raw data at a 64-byte aligned offset.
// Plain C++ over byte spans; the bindings map Python objects to and from these items.
//
// Large data need not be copied into the writer's buffer: external() records a piece the
// caller keeps alive until gather() copies the whole stream to its destination (a pool
// block or a slot), so an array is copied once on its way.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <vector>

namespace mpop {

enum class Tag : uint8_t {
  kNone = 0,
  kTrue = 1,
  kFalse = 2,
  kInt = 3,     // int64
  kFloat = 4,   // double
  kStr = 5,     // utf-8
  kBytes = 6,
  kPickle = 7,  // a pickle of anything else (protocol 5)
  kArray = 8,   // u32 data length, u8 dtype length, dtype, u8 ndim, u64 shape[ndim], padding
                // to a 64-byte stream offset, data (C order)
  kList = 9,    // u32 count, then that many items
  kTuple = 10,  // u32 count, then that many items
};

constexpr size_t kArrayAlign = 64;

// A piece of a stream that stays where the caller has it until gather().
struct ExternalPiece {
  size_t at;  // offset in the writer's own buffer where the piece goes
  const uint8_t* data;
  size_t len;
};

// Copies a stream made of `buf` with `pieces` spliced in, to `dst` (buf.size() + the
// pieces' lengths bytes).
inline void gather(const uint8_t* buf, size_t buf_len, const std::vector<ExternalPiece>& pieces,
                   uint8_t* dst) {
  size_t from = 0;
  for (const ExternalPiece& x : pieces) {
    std::memcpy(dst, buf + from, x.at - from);
    dst += x.at - from;
    from = x.at;
    if (x.len) std::memcpy(dst, x.data, x.len);
    dst += x.len;
  }
  if (buf_len > from) std::memcpy(dst, buf + from, buf_len - from);
}

// Appends items to a growable buffer that is reused between tasks (no allocation once it
// has grown to the largest stream seen).
class StreamWriter {
 public:
  // Without `pieces`, external data is copied into `buf` like everything else.
  explicit StreamWriter(std::vector<uint8_t>& buf, std::vector<ExternalPiece>* pieces = nullptr)
      : buf_(buf), pieces_(pieces) {
    buf_.clear();
    if (pieces_) pieces_->clear();
  }

  void counts(uint8_t npos, uint8_t nkw) {
    put(&npos, 1);
    put(&nkw, 1);
  }
  void none() { tag(Tag::kNone); }
  void boolean(bool v) { tag(v ? Tag::kTrue : Tag::kFalse); }
  void integer(int64_t v) { tagged8(Tag::kInt, &v); }
  void real(double v) { tagged8(Tag::kFloat, &v); }
  // Room for `n` more bytes, so that a container's items do not regrow the buffer item by
  // item (a hint: writing past it is fine).
  void reserve(size_t n) {
    if (buf_.capacity() - buf_.size() < n) buf_.reserve(std::max(buf_.size() + n, 2 * buf_.capacity()));
  }
  void blob(Tag t, const void* data, size_t n) {
    if (n > UINT32_MAX) throw std::length_error("mpop: a single argument is larger than 4 GiB");
    tag(t);
    uint32_t len = static_cast<uint32_t>(n);
    put(&len, 4);
    put(data, n);
  }
  void keyword(std::string_view name) {
    if (name.size() > 255) throw std::length_error("mpop: keyword name longer than 255 bytes");
    uint8_t len = static_cast<uint8_t>(name.size());
    put(&len, 1);
    put(name.data(), name.size());
  }
  // An array: `dtype` is numpy's dtype.str, `data` its `len` bytes in C order.
  // `in_place`: the data stays where it is until gather() (if the writer takes pieces).
  void array(std::string_view dtype, const int64_t* shape, uint8_t ndim, const void* data, size_t len,
             bool in_place = true) {
    if (len > UINT32_MAX) throw std::length_error("mpop: a single argument is larger than 4 GiB");
    if (dtype.size() > 255) throw std::length_error("mpop: dtype string longer than 255 bytes");
    tag(Tag::kArray);
    uint32_t n = static_cast<uint32_t>(len);
    put(&n, 4);
    uint8_t dl = static_cast<uint8_t>(dtype.size());
    put(&dl, 1);
    put(dtype.data(), dtype.size());
    put(&ndim, 1);
    put(shape, 8 * size_t{ndim});
    static const uint8_t zeros[kArrayAlign] = {};
    put(zeros, (kArrayAlign - size() % kArrayAlign) % kArrayAlign);
    if (in_place) external(data, len);
    else put(data, len);
  }
  // A list or tuple of `count` items, which the caller appends next.
  void container(Tag t, uint32_t count) {
    tag(t);
    put(&count, 4);
  }
  // A point to rewind() to: everything written after it, external pieces included, is
  // taken back.
  struct Mark {
    size_t buf, pieces, external;
  };
  Mark mark() const { return {buf_.size(), pieces_ ? pieces_->size() : 0, external_bytes_}; }
  void rewind(const Mark& m) {
    buf_.resize(m.buf);
    if (pieces_) pieces_->resize(m.pieces);
    external_bytes_ = m.external;
  }

  // Appends `n` bytes the caller keeps alive until gather() (or copies them now).
  void external(const void* p, size_t n) {
    if (!pieces_) return put(p, n);
    pieces_->push_back({buf_.size(), static_cast<const uint8_t*>(p), n});
    external_bytes_ += n;
  }
  // The stream's length, external pieces included.
  size_t size() const { return buf_.size() + external_bytes_; }
  // Copies the whole stream to `dst` (size() bytes).
  void gather_to(uint8_t* dst) const {
    if (!pieces_ || pieces_->empty()) {
      if (!buf_.empty()) std::memcpy(dst, buf_.data(), buf_.size());
      return;
    }
    gather(buf_.data(), buf_.size(), *pieces_, dst);
  }

 private:
  void tag(Tag t) { put(&t, 1); }
  // A tag and 8 bytes in one step (the commonest items: ints and floats).
  void tagged8(Tag t, const void* v) {
    size_t at = buf_.size();
    buf_.resize(at + 9);
    buf_[at] = static_cast<uint8_t>(t);
    std::memcpy(buf_.data() + at + 1, v, 8);
  }
  void put(const void* p, size_t n) {
    size_t at = buf_.size();
    buf_.resize(at + n);
    if (n) std::memcpy(buf_.data() + at, p, n);
  }
  std::vector<uint8_t>& buf_;
  std::vector<ExternalPiece>* pieces_;
  size_t external_bytes_ = 0;
};

struct Item {
  Tag tag = Tag::kNone;
  int64_t i = 0;
  double f = 0;
  const uint8_t* data = nullptr;
  uint32_t len = 0;
  // kArray: numpy's dtype string and the shape (ndim u64s, unaligned).
  std::string_view dtype;
  uint8_t ndim = 0;
  const uint8_t* shape = nullptr;
};

// Reads a stream written by StreamWriter; throws std::runtime_error on a malformed stream.
class StreamReader {
 public:
  StreamReader(const uint8_t* p, size_t n) : begin_(p), p_(p), end_(p + n) {}

  void counts(uint8_t& npos, uint8_t& nkw) {
    need(2);
    npos = p_[0];
    nkw = p_[1];
    p_ += 2;
  }
  std::string_view keyword() {
    need(1);
    uint8_t len = *p_++;
    need(len);
    std::string_view s(reinterpret_cast<const char*>(p_), len);
    p_ += len;
    return s;
  }
  Item item() {
    need(1);
    Item it;
    it.tag = static_cast<Tag>(*p_++);
    switch (it.tag) {
      case Tag::kNone:
      case Tag::kTrue:
      case Tag::kFalse:
        break;
      case Tag::kInt:
        need(8);
        std::memcpy(&it.i, p_, 8);
        p_ += 8;
        break;
      case Tag::kFloat:
        need(8);
        std::memcpy(&it.f, p_, 8);
        p_ += 8;
        break;
      case Tag::kStr:
      case Tag::kBytes:
      case Tag::kPickle:
        need(4);
        std::memcpy(&it.len, p_, 4);
        p_ += 4;
        need(it.len);
        it.data = p_;
        p_ += it.len;
        break;
      case Tag::kList:
      case Tag::kTuple:
        need(4);
        std::memcpy(&it.len, p_, 4);  // the item count; the items follow
        p_ += 4;
        break;
      case Tag::kArray: {
        need(4 + 1);
        std::memcpy(&it.len, p_, 4);
        p_ += 4;
        uint8_t dl = *p_++;
        need(dl + 1);
        it.dtype = std::string_view(reinterpret_cast<const char*>(p_), dl);
        p_ += dl;
        it.ndim = *p_++;
        need(8 * size_t{it.ndim});
        it.shape = p_;
        p_ += 8 * size_t{it.ndim};
        size_t at = static_cast<size_t>(p_ - begin_);
        size_t pad = (kArrayAlign - at % kArrayAlign) % kArrayAlign;
        need(pad + it.len);
        p_ += pad;
        it.data = p_;
        p_ += it.len;
        break;
      }
      default:
        throw std::runtime_error("mpop: corrupt argument stream (unknown tag)");
    }
    return it;
  }
  // The next item if it is an int (the commonest item of a map() chunk's values): true
  // with `v` set and the item read, or false with nothing read.
  bool next_int(int64_t& v) {
    if (end_ - p_ < 9 || *p_ != static_cast<uint8_t>(Tag::kInt)) return false;
    std::memcpy(&v, p_ + 1, 8);
    p_ += 9;
    return true;
  }
  bool done() const { return p_ == end_; }
  size_t remaining() const { return static_cast<size_t>(end_ - p_); }

 private:
  void need(size_t n) const {
    if (static_cast<size_t>(end_ - p_) < n)
      throw std::runtime_error("mpop: corrupt argument stream (truncated)");
  }
  const uint8_t* begin_;
  const uint8_t* p_;
  const uint8_t* end_;
};

}  // namespace mpop
