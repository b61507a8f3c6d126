// mpq_deploy: runs a model quantized by mpq from C++ (LibTorch + libmpq_ops.so), a TorchScript
// file (MODEL.pt) or an AOTInductor package (MODEL.pt2), prints the top-5 classes and the latency.
//
//   mpq_deploy MODEL.pt|MODEL.pt2 [--input INPUT.pt | --shape 1,3,224,224 --seed 0]
//              [--device cpu|cuda] [--warmup 5] [--runs 30] [--threads N]
//
// INPUT.pt is a TorchScript module holding the buffer `input` (and, optionally, Python's output on
// it, which the program compares with its own: `output` for a TorchScript model, `output_aoti` for
// a package), as export_model.py writes it. Without --input the input is seeded Gaussian noise of
// the given shape. An AOTInductor package calls the mpq ops through its proxy executor, i.e.
// through the dispatcher: linking mpq::ops (which registers them on load) is all it needs.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string model;
  std::string input;
  std::vector<int64_t> shape = {1, 3, 224, 224};
  uint64_t seed = 0;
  std::string device = "cpu";
  int warmup = 5;
  int runs = 30;
  int threads = 0;  // 0: LibTorch's default
};

[[noreturn]] void usage(const std::string& error) {
  std::cerr << "mpq_deploy: " << error << "\n"
            << "usage: mpq_deploy MODEL.pt|MODEL.pt2 [--input INPUT.pt | --shape 1,3,224,224 --seed 0]\n"
            << "                  [--device cpu|cuda] [--warmup 5] [--runs 30] [--threads N]\n";
  std::exit(2);
}

int to_int(const std::string& flag, const std::string& value, int min) {
  try {
    size_t used = 0;
    const int v = std::stoi(value, &used);
    if (used == value.size() && v >= min) return v;
  } catch (const std::exception&) {
  }
  usage("expected " + flag + " to be an integer >= " + std::to_string(min) + ", got '" + value + "'");
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value after " + arg);
      return argv[++i];
    };
    if (arg == "--input") {
      o.input = value();
    } else if (arg == "--shape") {
      o.shape.clear();
      std::stringstream in(value());
      for (std::string dim; std::getline(in, dim, ',');) o.shape.push_back(to_int("--shape", dim, 1));
      if (o.shape.empty()) usage("expected --shape like 1,3,224,224");
    } else if (arg == "--seed") {
      o.seed = static_cast<uint64_t>(to_int("--seed", value(), 0));
    } else if (arg == "--device") {
      o.device = value();
      if (o.device != "cpu" && o.device != "cuda") usage("expected --device cpu or cuda, got '" + o.device + "'");
    } else if (arg == "--warmup") {
      o.warmup = to_int("--warmup", value(), 0);
    } else if (arg == "--runs") {
      o.runs = to_int("--runs", value(), 1);
    } else if (arg == "--threads") {
      o.threads = to_int("--threads", value(), 1);
    } else if (arg == "-h" || arg == "--help") {
      usage("help");
    } else if (!arg.empty() && arg[0] == '-') {
      usage("unknown option " + arg);
    } else if (o.model.empty()) {
      o.model = arg;
    } else {
      usage("unexpected argument " + arg);
    }
  }
  if (o.model.empty()) usage("missing MODEL.pt or MODEL.pt2");
  return o;
}

// The file the dynamic loader mapped for `name`: the program must run the libmpq_ops.so it
// was linked with (and built against the same torch), not another one on the library path.
std::string loaded_library(const std::string& name) {
#ifdef __linux__
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    const auto pos = line.find('/');
    if (pos != std::string::npos && line.find(name, pos) != std::string::npos) return line.substr(pos);
  }
#endif
  return "(not found in /proc/self/maps)";
}

// mpq::_build_info through the dispatcher: the ops are there, and whether CUDA kernels are.
std::string mpq_build_info() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mpq::_build_info", "").typed<std::string()>();
  return op.call();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  try {
    const std::string info = mpq_build_info();
    std::cout << "mpq ops: " << loaded_library("libmpq_ops") << "\n  " << info << "\n";

    c10::Device device(c10::kCPU);
    if (opt.device == "cuda") {
      if (!torch::cuda::is_available()) {
        std::cerr << "mpq_deploy: --device cuda, but LibTorch sees no CUDA GPU\n";
        return 3;
      }
      if (info.find("\"cuda_kernels\": true") == std::string::npos) {
        std::cerr << "mpq_deploy: --device cuda, but libmpq_ops.so was built without CUDA kernels "
                     "(build mpq with nvcc and MPQ_ENABLE_CUDA=ON)\n";
        return 3;
      }
      device = c10::Device(c10::kCUDA);
    }
    if (opt.threads > 0) at::set_num_threads(opt.threads);

    const bool package = opt.model.size() > 4 && opt.model.compare(opt.model.size() - 4, 4, ".pt2") == 0;
    std::optional<torch::jit::Module> scripted;
    std::optional<torch::inductor::AOTIModelPackageLoader> aoti;
    if (package) {
      aoti.emplace(opt.model);
    } else {
      scripted = torch::jit::load(opt.model, device);
      scripted->eval();
    }

    at::Tensor input;
    std::optional<at::Tensor> python_output;
    const char* expected = package ? "output_aoti" : "output";
    if (!opt.input.empty()) {
      torch::jit::Module io = torch::jit::load(opt.input);
      if (!io.hasattr("input")) throw std::runtime_error(opt.input + " has no buffer named 'input'");
      input = io.attr("input").toTensor();
      if (io.hasattr(expected)) python_output = io.attr(expected).toTensor();
    } else {
      at::manual_seed(opt.seed);
      input = at::randn(opt.shape);
    }
    input = input.to(device);
    std::cout << "model: " << opt.model << (package ? " (AOTInductor package)" : " (TorchScript)") << " on " << device
              << ", " << at::get_num_threads() << " CPU threads\n"
              << "input: " << input.sizes() << " "
              << (opt.input.empty() ? "seeded noise (seed " + std::to_string(opt.seed) + ")" : "from " + opt.input)
              << "\n";

    c10::InferenceMode inference;
    auto run = [&]() {
      at::Tensor out = package ? aoti->run({input}).at(0) : scripted->forward({input}).toTensor();
      if (device.is_cuda()) torch::cuda::synchronize();
      return out;
    };
    // Warm-up: TorchScript's profiling executor optimises the graph during the first runs.
    at::Tensor out = run();
    for (int i = 1; i < opt.warmup; ++i) run();
    std::vector<double> ms;
    for (int i = 0; i < opt.runs; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      run();
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }

    out = out.to(at::kCPU, at::kFloat);
    if (out.dim() != 2) throw std::runtime_error("expected [N, classes] logits, got shape " + c10::str(out.sizes()));
    const auto prob = at::softmax(out, 1);
    const int64_t k = std::min<int64_t>(5, prob.size(1));
    const auto [top_p, top_i] = prob.topk(k, 1);
    for (int64_t n = 0; n < std::min<int64_t>(prob.size(0), 4); ++n) {
      std::cout << "top-" << k << (prob.size(0) > 1 ? " of image " + std::to_string(n) : "") << ":\n";
      for (int64_t j = 0; j < k; ++j) {
        std::cout << "  " << j + 1 << ". class " << std::setw(4) << top_i[n][j].item<int64_t>()
                  << "  p = " << std::fixed << std::setprecision(4) << top_p[n][j].item<float>() << "\n";
      }
    }
    std::cout << std::fixed << std::setprecision(2) << "latency: median " << median(ms) << " ms over " << opt.runs
              << " runs (min " << *std::min_element(ms.begin(), ms.end()) << ", max "
              << *std::max_element(ms.begin(), ms.end()) << ") after " << opt.warmup << " warm-up runs, batch "
              << input.size(0) << ", " << device << "\n";
    if (python_output) {
      const auto ref = python_output->to(at::kDouble);
      const double rel = (out.to(at::kDouble) - ref).abs().max().item<double>() / ref.abs().max().item<double>();
      std::cout << std::scientific << std::setprecision(2) << "Python's output (" << opt.input << ", " << expected
                << "): max |C++ - Python| / max |Python| = " << rel << "\n";
    }
  } catch (const c10::Error& e) {
    std::cerr << "mpq_deploy: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "mpq_deploy: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
