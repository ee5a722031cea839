// Shared by the kernel sources (build.py hashes every header with each source).
#pragma once

#include <cstdint>
#include <memory>

// A scratch array whose elements are all written before they are read, left uninitialized. std::vector zero-fills:
// a 16-stream decode step's MLA, MoE and int8-activation arrays were filled serially on the calling thread while the
// other thread waited (memset: 2.2% of a 2-thread step's samples, perf).
template <class T>
class Buf {
 public:
  explicit Buf(int64_t n) : p_(new T[n]), n_(n) {}  // new T[n] default-initializes: no fill for arithmetic T
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }
  T& operator[](int64_t i) { return p_[i]; }
  const T& operator[](int64_t i) const { return p_[i]; }
  int64_t size() const { return n_; }
  bool empty() const { return n_ == 0; }

 private:
  std::unique_ptr<T[]> p_;
  int64_t n_;
};
