// Codec: the byte format of argument and result streams. A stream is a count of positional
// and keyword items, then tagged items: scalars inline, str/bytes/pickles as length + bytes.
// Plain C++ over byte spans; the bindings map Python objects to and from these items.
#pragma once

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
};

// Appends items to a growable buffer that is reused between tasks (no allocation once it
// has grown to the largest stream seen).
class StreamWriter {
 public:
  explicit StreamWriter(std::vector<uint8_t>& buf) : buf_(buf) { buf_.clear(); }

  void counts(uint8_t npos, uint8_t nkw) {
    put(&npos, 1);
    put(&nkw, 1);
  }
  void none() { tag(Tag::kNone); }
  void boolean(bool v) { tag(v ? Tag::kTrue : Tag::kFalse); }
  void integer(int64_t v) {
    tag(Tag::kInt);
    put(&v, 8);
  }
  void real(double v) {
    tag(Tag::kFloat);
    put(&v, 8);
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
  size_t size() const { return buf_.size(); }

 private:
  void tag(Tag t) { put(&t, 1); }
  void put(const void* p, size_t n) {
    size_t at = buf_.size();
    buf_.resize(at + n);
    if (n) std::memcpy(buf_.data() + at, p, n);
  }
  std::vector<uint8_t>& buf_;
};

struct Item {
  Tag tag = Tag::kNone;
  int64_t i = 0;
  double f = 0;
  const uint8_t* data = nullptr;
  uint32_t len = 0;
};

// Reads a stream written by StreamWriter; throws std::runtime_error on a malformed stream.
class StreamReader {
 public:
  StreamReader(const uint8_t* p, size_t n) : p_(p), end_(p + n) {}

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
      default:
        throw std::runtime_error("mpop: corrupt argument stream (unknown tag)");
    }
    return it;
  }
  bool done() const { return p_ == end_; }

 private:
  void need(size_t n) const {
    if (static_cast<size_t>(end_ - p_) < n)
      throw std::runtime_error("mpop: corrupt argument stream (truncated)");
  }
  const uint8_t* p_;
  const uint8_t* end_;
};

}  // namespace mpop
