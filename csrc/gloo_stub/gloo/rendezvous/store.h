#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>
#define GLOO_STORE_HAS_STORE_V2 1
namespace gloo { namespace rendezvous {
// Mirrors torch 2.11's vendored gloo Store (v2 API) so the declared vtable order matches.
class Store {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout = std::chrono::seconds(30);
  virtual ~Store();
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds&) { wait(keys); }
  virtual bool has_v2_support() { return false; }
  virtual std::vector<std::vector<char>> multi_get(const std::vector<std::string>&) { return {}; }
  virtual void multi_set(const std::vector<std::string>&, const std::vector<std::vector<char>>&) {}
  virtual void append(const std::string&, const std::vector<char>&) {}
  virtual int64_t add(const std::string&, int64_t) { return 0; }
};
}}  // namespace gloo::rendezvous
