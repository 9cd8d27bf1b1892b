// unet_infer: run a U-Net exported by unet-export from C++, with libtorch only.
//
//   unet_infer MODEL INPUT.tensor OUT_PREFIX [--device cpu|cuda] [--iters N]
//
// MODEL is a TorchScript module (.ts, torch::jit::load) or an AOTInductor package (.pt2,
// torch::inductor::AOTIModelPackageLoader). INPUT.tensor is a float32 NCHW batch in the simple
// format unet-export writes (unet_export/flows/cpp_check.py): 8 magic bytes "UNETTNS1", int32 dtype code,
// int32 ndim, int64 dims[ndim], then the data. Writes OUT_PREFIX.logits.tensor (float32),
// OUT_PREFIX.mask.tensor (uint8 class indices) and OUT_PREFIX.mask.pgm (the first image's mask,
// classes spread over 0..255), and prints the mean and minimum latency per batch.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

const char kMagic[8] = {'U', 'N', 'E', 'T', 'T', 'N', 'S', '1'};
enum DType : int32_t { kFloat32 = 0, kUInt8 = 1 };

torch::Tensor read_tensor(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[8];
  int32_t dtype = 0, ndim = 0;
  in.read(magic, 8).read(reinterpret_cast<char*>(&dtype), 4).read(reinterpret_cast<char*>(&ndim), 4);
  if (!in || std::memcmp(magic, kMagic, 8) != 0 || dtype != kFloat32 || ndim < 1 || ndim > 8)
    throw std::runtime_error(path + " is not a float32 tensor file written by unet-export");
  std::vector<int64_t> dims(ndim);
  in.read(reinterpret_cast<char*>(dims.data()), 8 * ndim);
  auto tensor = torch::empty(dims, torch::kFloat32);
  in.read(reinterpret_cast<char*>(tensor.data_ptr<float>()), tensor.numel() * sizeof(float));
  if (!in) throw std::runtime_error(path + " is truncated");
  return tensor;
}

void write_tensor(const std::string& path, const torch::Tensor& t) {
  auto cpu = t.contiguous().cpu();
  int32_t dtype = cpu.scalar_type() == torch::kUInt8 ? kUInt8 : kFloat32;
  int32_t ndim = static_cast<int32_t>(cpu.dim());
  std::ofstream out(path, std::ios::binary);
  out.write(kMagic, 8).write(reinterpret_cast<char*>(&dtype), 4).write(reinterpret_cast<char*>(&ndim), 4);
  for (auto d : cpu.sizes()) out.write(reinterpret_cast<const char*>(&d), 8);
  out.write(static_cast<const char*>(cpu.data_ptr()), cpu.nbytes());
}

void write_pgm(const std::string& path, const torch::Tensor& mask, int64_t classes) {
  // Binary greyscale PGM: viewable anywhere, no image library needed.
  auto scale = classes > 1 ? 255 / (classes - 1) : 255;
  auto img = (mask[0].to(torch::kInt32) * scale).clamp(0, 255).to(torch::kUInt8).contiguous();
  std::ofstream out(path, std::ios::binary);
  out << "P5\n" << img.size(1) << " " << img.size(0) << "\n255\n";
  out.write(static_cast<const char*>(img.data_ptr()), img.numel());
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: unet_infer MODEL INPUT.tensor OUT_PREFIX [--device cpu|cuda] [--iters N]\n";
    return 2;
  }
  std::string model_path = argv[1], input_path = argv[2], prefix = argv[3], device_name = "cpu";
  int iters = 10;
  for (int i = 4; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--device") device_name = argv[i + 1];
    else if (flag == "--iters") iters = std::max(1, std::stoi(argv[i + 1]));
  }
  try {
    torch::NoGradGuard no_grad;
    torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
    auto input = read_tensor(input_path).to(device);

    std::function<torch::Tensor(const torch::Tensor&)> run;
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
    torch::jit::Module module;
    if (ends_with(model_path, ".pt2")) {
      package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(model_path);
      run = [&](const torch::Tensor& x) { return package->run({x})[0]; };
    } else {
      module = torch::jit::load(model_path, device);
      module.eval();
      run = [&](const torch::Tensor& x) { return module.forward({x}).toTensor(); };
    }

    auto logits = run(input);  // warm-up, and the result written below
    auto sync = [&] { if (device.is_cuda()) torch::cuda::synchronize(); };
    sync();
    double total = 0, best = 1e30;
    for (int i = 0; i < iters; ++i) {
      auto start = std::chrono::steady_clock::now();
      run(input);
      sync();
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      total += ms;
      best = std::min(best, ms);
    }
    auto classes = logits.size(1);
    auto mask = classes == 1 ? (logits.select(1, 0) > 0).to(torch::kUInt8) : logits.argmax(1).to(torch::kUInt8);
    write_tensor(prefix + ".logits.tensor", logits.to(torch::kFloat32));
    write_tensor(prefix + ".mask.tensor", mask);
    write_pgm(prefix + ".mask.pgm", mask.cpu(), classes);
    std::cout << "model " << model_path << " on " << device_name << ": input " << input.sizes() << " -> logits "
              << logits.sizes() << "; latency mean " << total / iters << " ms, min " << best << " ms over "
              << iters << " runs\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
