// The device.cuh primitives on a real GPU, with the checks their emulated twins pass
// (primitives_common.h): the twins against the hardware. Skips (exit 77) without a GPU.
#include <cuda_runtime.h>

#include "primitives_common.h"

struct GpuRunner {
  std::vector<void*> allocations;
  ~GpuRunner() {
    for (void* p : allocations) cudaFree(p);
  }
  template <class T>
  T* upload(const std::vector<T>& values) {
    void* device = nullptr;
    cudaMalloc(&device, values.size() * sizeof(T) + 16);
    cudaMemcpy(device, values.data(), values.size() * sizeof(T), cudaMemcpyHostToDevice);
    allocations.push_back(device);
    return static_cast<T*>(device);
  }
  template <class T>
  std::vector<T> download(const T* pointer, size_t count) {
    std::vector<T> values(count);
    cudaMemcpy(values.data(), pointer, count * sizeof(T), cudaMemcpyDeviceToHost);
    return values;
  }
  template <class Kernel, class... Args>
  void launch(const char* name, Kernel kernel, unsigned grid, unsigned block, Args... args) {
    const cudaError_t status = adaptfuse::launch_kernel(
        __FILE__, __LINE__, name, kernel, dim3(grid), dim3(block), 0, nullptr, args...);
    const cudaError_t synced = cudaDeviceSynchronize();
    if (status != cudaSuccess || synced != cudaSuccess) {
      std::printf("FAIL: %s: %s\n", name,
                  cudaGetErrorString(status != cudaSuccess ? status : synced));
      ++primitives_test::failures();
    }
  }
};

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("primitives (GPU): no GPU, skipped\n");
    return 77;
  }
  GpuRunner runner;
  return primitives_test::run_all(runner, /*emulated=*/false);
}
