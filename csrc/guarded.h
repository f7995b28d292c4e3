// The C boundary's error handling, shared by amthal's C++ libraries: run a body,
// turn any exception into status 1 and keep its message for *_last_error().
#pragma once

#include <exception>
#include <string>

namespace amthal {
inline thread_local std::string last_error;

template <typename F>
int guarded(F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return 1;
}
}  // namespace amthal
