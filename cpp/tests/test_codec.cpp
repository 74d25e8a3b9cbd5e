// Codec: every tag round-trips bit-exactly through StreamWriter and StreamReader, and a
// truncated or corrupt stream throws instead of reading past its end.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "mpop/codec.hpp"

namespace mpop {
namespace {

// A decoded stream: positional items, then (keyword, item) pairs, as the bindings read them.
struct Decoded {
  std::vector<Item> pos;
  std::vector<std::pair<std::string, Item>> kw;
};

Decoded decode(const std::vector<uint8_t>& buf, size_t len) {
  StreamReader r(buf.data(), len);
  uint8_t npos = 0, nkw = 0;
  r.counts(npos, nkw);
  Decoded d;
  for (int i = 0; i < npos; ++i) d.pos.push_back(r.item());
  for (int i = 0; i < nkw; ++i) {
    std::string name(r.keyword());
    d.kw.emplace_back(name, r.item());
  }
  if (!r.done()) throw std::runtime_error("trailing bytes");
  return d;
}
Decoded decode(const std::vector<uint8_t>& buf) { return decode(buf, buf.size()); }

std::string blob_of(const Item& it) {
  return std::string(reinterpret_cast<const char*>(it.data), it.len);
}

uint64_t bits(double v) {
  uint64_t b;
  std::memcpy(&b, &v, 8);
  return b;
}

TEST(Codec, ScalarsRoundTrip) {
  std::vector<uint8_t> buf;
  const std::vector<int64_t> ints = {
      0, 1, -1, 42, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()};
  const std::vector<double> reals = {0.0,
                                     -0.0,
                                     1.5,
                                     -3.25e300,
                                     std::numeric_limits<double>::denorm_min(),
                                     std::numeric_limits<double>::infinity(),
                                     -std::numeric_limits<double>::infinity(),
                                     std::numeric_limits<double>::quiet_NaN()};
  StreamWriter w(buf);
  w.counts(static_cast<uint8_t>(3 + ints.size() + reals.size()), 0);
  w.none();
  w.boolean(true);
  w.boolean(false);
  for (int64_t v : ints) w.integer(v);
  for (double v : reals) w.real(v);
  EXPECT_EQ(w.size(), buf.size());
  EXPECT_EQ(buf.size(), 2 + 3 + 9 * (ints.size() + reals.size()));

  Decoded d = decode(buf);
  ASSERT_EQ(d.pos.size(), 3 + ints.size() + reals.size());
  EXPECT_EQ(d.pos[0].tag, Tag::kNone);
  EXPECT_EQ(d.pos[1].tag, Tag::kTrue);
  EXPECT_EQ(d.pos[2].tag, Tag::kFalse);
  for (size_t i = 0; i < ints.size(); ++i) {
    EXPECT_EQ(d.pos[3 + i].tag, Tag::kInt);
    EXPECT_EQ(d.pos[3 + i].i, ints[i]);
  }
  for (size_t i = 0; i < reals.size(); ++i) {
    const Item& it = d.pos[3 + ints.size() + i];
    EXPECT_EQ(it.tag, Tag::kFloat);
    EXPECT_EQ(bits(it.f), bits(reals[i])) << i;  // -0.0 and NaN bit-exact too
  }
  EXPECT_TRUE(std::isnan(d.pos.back().f));
}

TEST(Codec, BlobsRoundTripWithEveryBlobTag) {
  std::string utf8 = "h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80";  // héllo € 😀
  std::string zeros("a\0b\0\0c", 6);
  std::string big(1 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131 + 7);
  std::vector<std::pair<Tag, std::string>> cases = {{Tag::kStr, ""},
                                                    {Tag::kStr, utf8},
                                                    {Tag::kBytes, ""},
                                                    {Tag::kBytes, "x"},
                                                    {Tag::kBytes, zeros},
                                                    {Tag::kBytes, big},
                                                    {Tag::kPickle, "\x80\x05N."},
                                                    {Tag::kPickle, big}};
  std::vector<uint8_t> buf;
  StreamWriter w(buf);
  w.counts(static_cast<uint8_t>(cases.size()), 0);
  for (auto& [tag, s] : cases) w.blob(tag, s.data(), s.size());
  Decoded d = decode(buf);
  ASSERT_EQ(d.pos.size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(d.pos[i].tag, cases[i].first) << i;
    EXPECT_EQ(d.pos[i].len, cases[i].second.size()) << i;
    EXPECT_EQ(blob_of(d.pos[i]), cases[i].second) << i;
  }
  // The items point into the stream itself: no copy.
  EXPECT_GE(d.pos[1].data, buf.data());
  EXPECT_LE(d.pos[1].data + d.pos[1].len, buf.data() + buf.size());
}

TEST(Codec, KeywordsRoundTripAfterPositionals) {
  std::vector<uint8_t> buf;
  StreamWriter w(buf);
  w.counts(1, 3);
  w.integer(7);
  w.keyword("alpha");
  w.real(2.5);
  w.keyword("");
  w.none();
  std::string longest(255, 'k');
  w.keyword(longest);
  w.blob(Tag::kStr, "v", 1);
  Decoded d = decode(buf);
  ASSERT_EQ(d.pos.size(), 1u);
  EXPECT_EQ(d.pos[0].i, 7);
  ASSERT_EQ(d.kw.size(), 3u);
  EXPECT_EQ(d.kw[0].first, "alpha");
  EXPECT_EQ(d.kw[0].second.f, 2.5);
  EXPECT_EQ(d.kw[1].first, "");
  EXPECT_EQ(d.kw[1].second.tag, Tag::kNone);
  EXPECT_EQ(d.kw[2].first, longest);
  EXPECT_EQ(blob_of(d.kw[2].second), "v");
}

TEST(Codec, CountsUpTo255AndEmptyStreams) {
  std::vector<uint8_t> buf;
  StreamWriter w(buf);
  w.counts(0, 0);
  Decoded empty = decode(buf);
  EXPECT_TRUE(empty.pos.empty());
  EXPECT_TRUE(empty.kw.empty());

  StreamWriter w2(buf);  // a writer clears the reused buffer
  w2.counts(255, 255);
  for (int i = 0; i < 255; ++i) w2.integer(i);
  for (int i = 0; i < 255; ++i) {
    std::string name = std::to_string(i);
    name.insert(name.begin(), 'k');
    w2.keyword(name);
    w2.boolean(i % 2 == 0);
  }
  Decoded d = decode(buf);
  ASSERT_EQ(d.pos.size(), 255u);
  ASSERT_EQ(d.kw.size(), 255u);
  EXPECT_EQ(d.pos[254].i, 254);
  EXPECT_EQ(d.kw[254].first, "k254");
  EXPECT_EQ(d.kw[254].second.tag, Tag::kTrue);
  EXPECT_EQ(d.kw[253].second.tag, Tag::kFalse);
}

TEST(Codec, WriterReusesItsBuffer) {
  std::vector<uint8_t> buf;
  {
    StreamWriter w(buf);
    w.counts(1, 0);
    w.blob(Tag::kBytes, std::string(5000, 'x').data(), 5000);
  }
  size_t cap = buf.capacity();
  const uint8_t* data = buf.data();
  StreamWriter w(buf);
  EXPECT_EQ(w.size(), 0u);
  w.counts(1, 0);
  w.integer(1);
  EXPECT_EQ(buf.capacity(), cap);
  EXPECT_EQ(buf.data(), data);
}

TEST(Codec, WriterRefusesOversizedItems) {
  std::vector<uint8_t> buf;
  StreamWriter w(buf);
  w.counts(1, 1);
  uint8_t byte = 0;
  // The size is checked before any byte is read.
  EXPECT_THROW(w.blob(Tag::kBytes, &byte, size_t{UINT32_MAX} + 1), std::length_error);
  EXPECT_THROW(w.keyword(std::string(256, 'k')), std::length_error);
  EXPECT_EQ(buf.size(), 2u);  // nothing half-written
}

// A stream with every tag and a keyword; every strict prefix of it must throw.
std::vector<uint8_t> every_tag_stream() {
  std::vector<uint8_t> buf;
  StreamWriter w(buf);
  w.counts(8, 1);
  w.none();
  w.boolean(true);
  w.boolean(false);
  w.integer(-5);
  w.real(0.5);
  w.blob(Tag::kStr, "text", 4);
  w.blob(Tag::kBytes, "\x00\x01", 2);
  w.blob(Tag::kPickle, "\x80\x05K\x01.", 5);
  w.keyword("name");
  w.blob(Tag::kBytes, "", 0);
  return buf;
}

TEST(Codec, EveryTruncationThrows) {
  std::vector<uint8_t> buf = every_tag_stream();
  EXPECT_NO_THROW(decode(buf));
  for (size_t len = 0; len < buf.size(); ++len) {
    std::vector<uint8_t> cut(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(len));
    EXPECT_THROW(decode(cut), std::runtime_error) << "prefix of " << len << " bytes";
  }
}

TEST(Codec, UnknownTagsThrow) {
  for (int tag = static_cast<int>(Tag::kTuple) + 1; tag < 256; ++tag) {
    std::vector<uint8_t> buf = {1, 0, static_cast<uint8_t>(tag), 0, 0, 0, 0, 0, 0, 0, 0};
    StreamReader r(buf.data(), buf.size());
    uint8_t npos, nkw;
    r.counts(npos, nkw);
    EXPECT_THROW(r.item(), std::runtime_error) << tag;
  }
}

TEST(Codec, CorruptLengthsThrowInsteadOfOverreading) {
  std::vector<uint8_t> buf;
  StreamWriter w(buf);
  w.counts(1, 1);
  w.blob(Tag::kStr, "abc", 3);
  w.keyword("kw");
  w.integer(1);
  EXPECT_NO_THROW(decode(buf));

  std::vector<uint8_t> huge = buf;
  uint32_t len = UINT32_MAX;
  std::memcpy(&huge[3], &len, 4);  // the blob's length field
  EXPECT_THROW(decode(huge), std::runtime_error);

  std::vector<uint8_t> one_more = buf;
  len = 4;  // one byte past the blob: swallows the keyword's length byte
  std::memcpy(&one_more[3], &len, 4);
  EXPECT_THROW(decode(one_more), std::runtime_error);

  std::vector<uint8_t> long_kw = buf;
  long_kw[2 + 1 + 4 + 3] = 200;  // the keyword's length byte
  EXPECT_THROW(decode(long_kw), std::runtime_error);

  std::vector<uint8_t> counts = buf;
  counts[0] = 2;  // claims one more positional than there is
  EXPECT_THROW(decode(counts), std::runtime_error);

  StreamReader empty(nullptr, 0);
  uint8_t npos, nkw;
  EXPECT_THROW(empty.counts(npos, nkw), std::runtime_error);
  EXPECT_THROW(empty.item(), std::runtime_error);
  EXPECT_THROW(empty.keyword(), std::runtime_error);
  EXPECT_TRUE(empty.done());
}

// An array's data lands at a 64-byte stream offset, and a writer that leaves it in place
// (external pieces) gathers exactly the bytes a copying writer produces.
TEST(Codec, ArraysAlignTheirDataAndGatherLikeACopy) {
  std::vector<double> data(1000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = 0.5 * static_cast<double>(i);
  const int64_t shape[2] = {20, 50};
  std::vector<uint8_t> copied, buf;
  std::vector<ExternalPiece> pieces;
  for (int with_pieces = 0; with_pieces < 2; ++with_pieces) {
    StreamWriter w(with_pieces ? buf : copied, with_pieces ? &pieces : nullptr);
    w.counts(3, 0);
    w.blob(Tag::kStr, "abc", 3);
    w.array("<f8", shape, 2, data.data(), data.size() * 8);
    w.integer(-7);
    if (with_pieces) {
      ASSERT_EQ(pieces.size(), 1u);
      EXPECT_EQ(w.size(), buf.size() + data.size() * 8);
    }
  }
  std::vector<uint8_t> gathered(buf.size() + data.size() * 8);
  gather(buf.data(), buf.size(), pieces, gathered.data());
  ASSERT_EQ(gathered, copied);

  StreamReader r(gathered.data(), gathered.size());
  uint8_t npos = 0, nkw = 0;
  r.counts(npos, nkw);
  EXPECT_EQ(r.item().tag, Tag::kStr);
  Item a = r.item();
  ASSERT_EQ(a.tag, Tag::kArray);
  EXPECT_EQ(a.dtype, "<f8");
  ASSERT_EQ(a.ndim, 2);
  int64_t d1;
  std::memcpy(&d1, a.shape + 8, 8);
  EXPECT_EQ(d1, 50);
  EXPECT_EQ(static_cast<size_t>(a.data - gathered.data()) % kArrayAlign, 0u);
  ASSERT_EQ(a.len, data.size() * 8);
  EXPECT_EQ(std::memcmp(a.data, data.data(), a.len), 0);
  EXPECT_EQ(r.item().i, -7);
  EXPECT_TRUE(r.done());
  // Every truncation of it is refused.
  for (size_t n = 0; n < gathered.size(); ++n) {
    StreamReader t(gathered.data(), n);
    EXPECT_THROW(
        {
          t.counts(npos, nkw);
          for (int k = 0; k < 3; ++k) t.item();
        },
        std::runtime_error)
        << n;
  }
}

// A list or tuple is its tag and item count, then the items; rewind() takes back a
// container the writer gave up on (an item that must be pickled).
TEST(Codec, ContainersCarryACountThenTheirItemsAndCanBeRewound) {
  std::vector<uint8_t> buf;
  StreamWriter w(buf);
  w.container(Tag::kTuple, 2);
  w.integer(5);
  w.container(Tag::kList, 1);
  w.blob(Tag::kStr, "x", 1);
  const size_t at = buf.size();
  StreamWriter::Mark m = w.mark();
  w.container(Tag::kList, 3);
  w.integer(1);
  w.rewind(m);
  EXPECT_EQ(buf.size(), at);
  StreamReader r(buf.data(), buf.size());
  Item t = r.item();
  EXPECT_EQ(t.tag, Tag::kTuple);
  EXPECT_EQ(t.len, 2u);
  EXPECT_EQ(r.item().i, 5);
  Item l = r.item();
  EXPECT_EQ(l.tag, Tag::kList);
  EXPECT_EQ(l.len, 1u);
  EXPECT_EQ(r.remaining(), 1u + 4u + 1u);
  EXPECT_EQ(r.item().tag, Tag::kStr);
  EXPECT_TRUE(r.done());
  StreamReader cut(buf.data(), 3);  // count truncated
  EXPECT_THROW(cut.item(), std::runtime_error);
}

TEST(Codec, NextIntReadsOnlyAWholeIntAndLeavesAnythingElse) {
  std::vector<uint8_t> buf;
  StreamWriter w(buf);
  w.reserve(64);
  const size_t cap = buf.capacity();
  w.integer(-7);
  w.real(1.5);
  w.integer(std::numeric_limits<int64_t>::max());
  w.blob(Tag::kStr, "ab", 2);
  EXPECT_EQ(buf.capacity(), cap);  // the reservation held everything
  StreamReader r(buf.data(), buf.size());
  int64_t v = 0;
  ASSERT_TRUE(r.next_int(v));
  EXPECT_EQ(v, -7);
  EXPECT_FALSE(r.next_int(v));  // a float: not read
  EXPECT_EQ(bits(r.item().f), bits(1.5));
  ASSERT_TRUE(r.next_int(v));
  EXPECT_EQ(v, std::numeric_limits<int64_t>::max());
  EXPECT_FALSE(r.next_int(v));  // a str: not read
  EXPECT_EQ(blob_of(r.item()), "ab");
  EXPECT_TRUE(r.done());
  EXPECT_FALSE(r.next_int(v));  // at the end
  // An int cut short is not read by next_int, and item() then reports the truncation.
  StreamReader cut(buf.data(), 5);
  EXPECT_FALSE(cut.next_int(v));
  EXPECT_THROW(cut.item(), std::runtime_error);
}

}  // namespace
}  // namespace mpop
