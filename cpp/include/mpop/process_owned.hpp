// ProcessOwned: remembers the process that made an object, so that a copy a fork() child
// inherits never acts on what belongs to its parent: threads the child does not have, the
// segment's attachment count and name, the parent's workers.
#pragma once

#include <unistd.h>

#include <thread>

namespace mpop {

class ProcessOwned {
 public:
  ProcessOwned() : pid_(getpid()) {}
  // True in a fork() child of the process that made the object.
  bool inherited() const { return getpid() != pid_; }

 private:
  pid_t pid_;
};

// A fork() child has none of its parent's threads: joining a std::thread copied from the
// parent would wait for ever, and destroying a joinable one calls std::terminate. The child
// lets go of the handle instead (a few bytes, deliberately never freed).
inline void abandon_inherited_thread(std::thread& t) {
  if (t.joinable()) new std::thread(std::move(t));
}

}  // namespace mpop
