// 2-D convolutions for XLA:CPU through oneDNN, as XLA FFI custom calls.
//
// Three handlers, one per pass of a float32 NHWC convolution with HWIO
// weights (the layouts of flax.linen.Conv): the forward pass, the input
// gradient and the weight gradient. Activations stay in XLA's NHWC layout
// (oneDNN reads and writes them in place); the weights, which are small, are
// reordered to and from the layout oneDNN's kernel prefers on each call.
//
// Primitives are created once per shape and cached. Each call brings its own
// scratchpad and reordered weights, so one primitive can run on several XLA
// devices' threads at once.

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum class Pass { kForward, kInputGrad, kWeightGrad };

// Geometry of one convolution: NHWC input, HWIO weights, NHWC output.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow;
  int64_t sh, sw, pt, pb, pl, pr;

  std::string Key(Pass pass) const {
    std::string key = std::to_string(static_cast<int>(pass));
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr}) {
      key += ',' + std::to_string(v);
    }
    return key;
  }
  memory::desc Src() const {
    return memory::desc({n, c, h, w}, memory::data_type::f32,
                        memory::format_tag::nhwc);
  }
  memory::desc Dst() const {
    return memory::desc({n, o, oh, ow}, memory::data_type::f32,
                        memory::format_tag::nhwc);
  }
  memory::desc Weights(memory::format_tag tag) const {
    return memory::desc({o, c, kh, kw}, memory::data_type::f32, tag);
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A primitive with the reorder between the user's HWIO weights and its own.
struct Entry {
  dnnl::primitive conv;
  memory::desc scratchpad;
  memory::desc weights;  // The primitive's (diff_)weights layout.
  bool reorder = false;
  dnnl::reorder weights_reorder;
};

std::shared_ptr<Entry> Create(const Geometry& g, Pass pass) {
  dnnl::engine& engine = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const memory::dims strides = {g.sh, g.sw};
  const memory::dims pad_l = {g.pt, g.pl};
  const memory::dims pad_r = {g.pb, g.pr};
  const auto any = g.Weights(memory::format_tag::any);
  const auto hwio = g.Weights(memory::format_tag::hwio);
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(
      engine, dnnl::prop_kind::forward_training, algo, g.Src(), any, g.Dst(),
      strides, pad_l, pad_r, attr);
  auto entry = std::make_shared<Entry>();
  if (pass == Pass::kForward) {
    entry->conv = dnnl::convolution_forward(fwd);
    entry->scratchpad = fwd.scratchpad_desc();
    entry->weights = fwd.weights_desc();
  } else if (pass == Pass::kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        engine, algo, g.Src(), any, g.Dst(), strides, pad_l, pad_r, fwd,
        attr);
    entry->conv = dnnl::convolution_backward_data(bwd);
    entry->scratchpad = bwd.scratchpad_desc();
    entry->weights = bwd.weights_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        engine, algo, g.Src(), any, g.Dst(), strides, pad_l, pad_r, fwd,
        attr);
    entry->conv = dnnl::convolution_backward_weights(bwd);
    entry->scratchpad = bwd.scratchpad_desc();
    entry->weights = bwd.diff_weights_desc();
  }
  entry->reorder = entry->weights != hwio;
  if (entry->reorder) {
    entry->weights_reorder =
        pass == Pass::kWeightGrad
            ? dnnl::reorder(dnnl::reorder::primitive_desc(
                  engine, entry->weights, engine, hwio))
            : dnnl::reorder(dnnl::reorder::primitive_desc(
                  engine, hwio, engine, entry->weights));
  }
  return entry;
}

std::shared_ptr<Entry> Get(const Geometry& g, Pass pass) {
  static std::mutex mutex;
  static auto* cache =
      new std::unordered_map<std::string, std::shared_ptr<Entry>>();
  const std::string key = g.Key(pass);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  auto entry = Create(g, pass);  // Outside the lock: creation JIT-compiles.
  std::lock_guard<std::mutex> lock(mutex);
  return cache->emplace(key, entry).first->second;
}

// Runs `pass`: `image` is the NHWC input (forward, weight gradient) or output
// gradient (input gradient); `other` the HWIO weights or the output gradient.
ffi::Error Run(Pass pass, const Geometry& g, float* image, float* other,
               float* result) {
  try {
    auto entry = Get(g, pass);
    dnnl::engine& engine = Engine();
    dnnl::stream stream(engine);
    const auto hwio = g.Weights(memory::format_tag::hwio);
    memory scratchpad(entry->scratchpad, engine);
    std::unordered_map<int, memory> args = {{DNNL_ARG_SCRATCHPAD, scratchpad}};
    float* weights_ptr = pass == Pass::kWeightGrad ? result : other;
    memory user_weights(hwio, engine, weights_ptr);
    memory weights = entry->reorder ? memory(entry->weights, engine)
                                    : user_weights;
    if (entry->reorder && pass != Pass::kWeightGrad) {
      entry->weights_reorder.execute(stream, user_weights, weights);
    }
    switch (pass) {
      case Pass::kForward:
        args[DNNL_ARG_SRC] = memory(g.Src(), engine, image);
        args[DNNL_ARG_WEIGHTS] = weights;
        args[DNNL_ARG_DST] = memory(g.Dst(), engine, result);
        break;
      case Pass::kInputGrad:
        args[DNNL_ARG_DIFF_DST] = memory(g.Dst(), engine, image);
        args[DNNL_ARG_WEIGHTS] = weights;
        args[DNNL_ARG_DIFF_SRC] = memory(g.Src(), engine, result);
        break;
      case Pass::kWeightGrad:
        args[DNNL_ARG_SRC] = memory(g.Src(), engine, image);
        args[DNNL_ARG_DIFF_DST] = memory(g.Dst(), engine, other);
        args[DNNL_ARG_DIFF_WEIGHTS] = weights;
        break;
    }
    entry->conv.execute(stream, args);
    if (entry->reorder && pass == Pass::kWeightGrad) {
      entry->weights_reorder.execute(stream, weights, user_weights);
    }
    stream.wait();
  } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc.
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

Geometry Make(ffi::Span<const int64_t> nhwc, ffi::Span<const int64_t> hwio,
              ffi::Span<const int64_t> out, int64_t sh, int64_t sw,
              int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Geometry{nhwc[0], nhwc[1], nhwc[2], nhwc[3], hwio[0],
                  hwio[1], hwio[3], out[1],  out[2],  sh,
                  sw,      pt,      pb,      pl,      pr};
}

using F32 = ffi::Buffer<ffi::F32>;
using ResultF32 = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(F32 x, F32 w, ResultF32 y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(Pass::kForward,
             Make(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt,
                  pb, pl, pr),
             x.typed_data(), w.typed_data(), y->typed_data());
}

ffi::Error InputGrad(F32 dy, F32 w, ResultF32 dx, int64_t sh, int64_t sw,
                     int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(Pass::kInputGrad,
             Make(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw,
                  pt, pb, pl, pr),
             dy.typed_data(), w.typed_data(), dx->typed_data());
}

ffi::Error WeightGrad(F32 x, F32 dy, ResultF32 dw, int64_t sh, int64_t sw,
                      int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Run(Pass::kWeightGrad,
             Make(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw,
                  pt, pb, pl, pr),
             x.typed_data(), dy.typed_data(), dw->typed_data());
}

auto Bind() {
  return ffi::Ffi::Bind()
      .Arg<F32>()
      .Arg<F32>()
      .Ret<F32>()
      .Attr<int64_t>("sh")
      .Attr<int64_t>("sw")
      .Attr<int64_t>("pt")
      .Attr<int64_t>("pb")
      .Attr<int64_t>("pl")
      .Attr<int64_t>("pr");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AllconvConvForward, Forward, Bind());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AllconvConvInputGrad, InputGrad, Bind());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AllconvConvWeightGrad, WeightGrad, Bind());
