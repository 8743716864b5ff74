// The device.cuh primitives' emulated twins (see primitives_common.h).
#include <deque>
#include <memory>

#include "primitives_common.h"

struct EmulatedRunner {
  std::deque<std::vector<unsigned char>> buffers;  // stable addresses, 16-byte aligned data

  template <class T>
  T* upload(const std::vector<T>& values) {
    buffers.emplace_back(values.size() * sizeof(T) + 16);
    auto& storage = buffers.back();
    auto* aligned =
        reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(storage.data()) + 15) & ~uintptr_t{15});
    std::memcpy(aligned, values.data(), values.size() * sizeof(T));
    return aligned;
  }
  template <class T>
  std::vector<T> download(const T* pointer, size_t count) {
    return std::vector<T>(pointer, pointer + count);
  }
  template <class Kernel, class... Args>
  void launch(const char* name, Kernel kernel, unsigned grid, unsigned block, Args... args) {
    adaptfuse::launch_kernel(__FILE__, __LINE__, name, kernel, dim3(grid), dim3(block), 0, nullptr,
                             args...);
  }
};

int main() {
  int status = 0;
  for (unsigned seed : {0u, 99u}) {
    adaptfuse_emu::options().seed = seed;
    EmulatedRunner runner;
    status |= primitives_test::run_all(runner, /*emulated=*/true);
  }
  return status;
}
