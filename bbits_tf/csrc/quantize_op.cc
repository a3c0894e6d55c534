// Fused CPU kernels of the gated residual quantizer (bbits_tf.ops.quantize), built on first use by
// bbits_tf/kernels.py against the installed TensorFlow. Forward and backward each make one pass over the tensor.
//
// BbitsQuantize(x, x_max, coefs, alive) -> y
//   y = sum_n coefs[n] * s_n * R_n, R_n = clip(round(x_c / s_n), code limits of level n), x_c = clip(x, lo, hi),
//   summed as term(0) + (term(1) + (... + term(L-1))) in float32 like the TensorFlow graph it replaces, so that
//   both give the same bits. Levels above a truncated gate (alive[n] false) are not computed.
// BbitsQuantizeGrad(g, x, x_max, alive, total) -> (dx, sums)
//   dx = g * total where lo <= x <= hi, else 0;
//   sums = [sum(g R_0), ..., sum(g R_{L-1}), sum(g x_c), sum(g [x > hi]), sum(g [x < lo])] (float64 partial sums
//   per block, added in block order: the result does not depend on the number of threads).
//
// Float semantics follow bbits_tf/ops.py: hi = float32(1 - 1e-7) * x_max, lo = -hi (signed) or 0,
// s_0 = width / (2^b0 - 1), s_k = s_{k-1} / (2^b_{k-1} + 1), width = 2 x_max (signed) or x_max; rounding half to
// even. Compile with -ffp-contract=off (no fused multiply-add: TensorFlow's separate ops round every product).
#include <cmath>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

using namespace tensorflow;  // NOLINT

namespace {

constexpr int kBlock = 2048;
constexpr int kMaxLevels = 8;

struct Grid {
  int levels = 0;       // levels computed (1 + leading alive gates)
  float hi = 0, lo = 0;
  float step[kMaxLevels];
  float code_lo[kMaxLevels], code_hi[kMaxLevels];
};

Status MakeGrid(float x_max, const Tensor& alive, bool is_signed, const std::vector<int32>& bits, Grid* grid) {
  const int n = static_cast<int>(bits.size());
  if (n < 1 || n > kMaxLevels) return errors::InvalidArgument("bit_widths must have 1 to 8 entries, got ", n);
  if (alive.NumElements() != n - 1)
    return errors::InvalidArgument("alive must have len(bit_widths) - 1 = ", n - 1, " entries, got ",
                                   alive.NumElements());
  const float shrink = static_cast<float>(1.0 - 1e-7);
  grid->hi = shrink * x_max;
  grid->lo = is_signed ? -grid->hi : 0.0f;
  const float width = is_signed ? 2.0f * x_max : x_max;
  grid->step[0] = width / static_cast<float>(std::ldexp(1.0, bits[0]) - 1.0);
  for (int k = 1; k < n; ++k) grid->step[k] = grid->step[k - 1] / static_cast<float>(std::ldexp(1.0, bits[k - 1]) + 1.0);
  for (int k = 0; k < n; ++k) {
    if (is_signed) {
      grid->code_hi[k] = static_cast<float>(std::ldexp(1.0, bits[k] - 1) - 1.0);
      grid->code_lo[k] = -grid->code_hi[k];
    } else {
      grid->code_lo[k] = 0.0f;
      grid->code_hi[k] = static_cast<float>(std::ldexp(1.0, bits[k]) - 1.0);
    }
  }
  auto on = alive.flat<bool>();
  int levels = 1;
  while (levels < n && on(levels - 1)) ++levels;
  grid->levels = levels;
  return OkStatus();
}

inline float Code(float xc, float step, float lo, float hi) {
  float r = std::nearbyint(xc / step);
  r = r < lo ? lo : r;
  return r > hi ? hi : r;
}

inline float Clip(float x, float lo, float hi) {  // tf.maximum(tf.minimum(x, hi), lo); NaN stays NaN
  const float v = x > hi ? hi : x;
  return v < lo ? lo : v;
}

constexpr int kLanes = 16;

// sum(a * b) over n floats: kLanes float accumulators (a vector register), then float64.
double Dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  double total = 0;
  for (; i < n; ++i) total += static_cast<double>(a[i]) * b[i];
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

double Sum(const float* a, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l];
  double total = 0;
  for (; i < n; ++i) total += a[i];
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

void ForEachBlock(OpKernelContext* ctx, int64_t size, int64_t cost_per_block,
                  const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t blocks = (size + kBlock - 1) / kBlock;
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(blocks, cost_per_block, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) fn(b * kBlock, std::min<int64_t>(size, (b + 1) * kBlock));
  });
}

// Both kernels: the "signed" and "bit_widths" attributes and the grid they give for an x_max and alive input.
class GridKernel : public OpKernel {
 public:
  explicit GridKernel(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed", &signed_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bit_widths", &bits_));
  }

 protected:
  Status GridFrom(OpKernelContext* ctx, int x_max_input, int alive_input, Grid* grid) const {
    return MakeGrid(ctx->input(x_max_input).scalar<float>()(), ctx->input(alive_input), signed_, bits_, grid);
  }

  bool signed_;
  std::vector<int32> bits_;
};

class BbitsQuantizeOp : public GridKernel {
 public:
  explicit BbitsQuantizeOp(OpKernelConstruction* ctx) : GridKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& coefs = ctx->input(2);
    OP_REQUIRES(ctx, coefs.NumElements() == static_cast<int64_t>(bits_.size()),
                errors::InvalidArgument("coefs must have one entry per bit width"));
    Grid grid;
    OP_REQUIRES_OK(ctx, GridFrom(ctx, 1, 3, &grid));
    float scale[kMaxLevels];
    auto c = coefs.flat<float>();
    for (int k = 0; k < grid.levels; ++k) scale[k] = c(k) * grid.step[k];
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    const float* in = x.flat<float>().data();
    float* out = y->flat<float>().data();
    const int levels = grid.levels;
    ForEachBlock(ctx, x.NumElements(), kBlock * 8 * levels, [&](int64_t begin, int64_t end) {
      float xc[kBlock];
      const int64_t n = end - begin;
      const float* __restrict xb = in + begin;
      float* __restrict o = out + begin;
      const float clip_lo = grid.lo, clip_hi = grid.hi;
      for (int64_t i = 0; i < n; ++i) xc[i] = Clip(xb[i], clip_lo, clip_hi);
      {
        const int k = levels - 1;
        const float s = grid.step[k], lo = grid.code_lo[k], hi = grid.code_hi[k], m = scale[k];
        for (int64_t i = 0; i < n; ++i) o[i] = m * Code(xc[i], s, lo, hi);
      }
      for (int k = levels - 2; k >= 0; --k) {
        const float s = grid.step[k], lo = grid.code_lo[k], hi = grid.code_hi[k], m = scale[k];
        for (int64_t i = 0; i < n; ++i) o[i] = m * Code(xc[i], s, lo, hi) + o[i];
      }
    });
  }
};

class BbitsQuantizeGradOp : public GridKernel {
 public:
  explicit BbitsQuantizeGradOp(OpKernelConstruction* ctx) : GridKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& g = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES(ctx, g.shape() == x.shape(), errors::InvalidArgument("g and x must have the same shape"));
    Grid grid;
    OP_REQUIRES_OK(ctx, GridFrom(ctx, 2, 3, &grid));
    const float total = ctx->input(4).scalar<float>()();
    const int n_levels = static_cast<int>(bits_.size());
    const int n_sums = n_levels + 3;
    Tensor* dx = nullptr;
    Tensor* sums = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n_sums}), &sums));
    const int64_t size = x.NumElements();
    const int64_t blocks = (size + kBlock - 1) / kBlock;
    std::vector<double> partial(blocks * n_sums, 0.0);
    const float* gin = g.flat<float>().data();
    const float* xin = x.flat<float>().data();
    float* dout = dx->flat<float>().data();
    const int levels = grid.levels;
    ForEachBlock(ctx, size, kBlock * 10 * levels, [&](int64_t begin, int64_t end) {
      // Simple loops over one block (in L1 cache), each of which the compiler vectorizes.
      float xc[kBlock], tmp[kBlock];
      const int64_t n = end - begin;
      const float* __restrict gb = gin + begin;
      const float* __restrict xb = xin + begin;
      float* __restrict db = dout + begin;
      double* part = partial.data() + (begin / kBlock) * n_sums;
      const float hi = grid.hi, lo = grid.lo, scale = total;
      for (int64_t i = 0; i < n; ++i) xc[i] = Clip(xb[i], lo, hi);
      for (int64_t i = 0; i < n; ++i) {
        const float v = gb[i] * scale;
        db[i] = ((xb[i] <= hi) & (xb[i] >= lo)) ? v : 0.0f;
      }
      part[n_levels] = Dot(gb, xc, n);
      for (int64_t i = 0; i < n; ++i) tmp[i] = xb[i] > hi ? gb[i] : 0.0f;
      part[n_levels + 1] = Sum(tmp, n);
      for (int64_t i = 0; i < n; ++i) tmp[i] = xb[i] < lo ? gb[i] : 0.0f;
      part[n_levels + 2] = Sum(tmp, n);
      for (int k = 0; k < levels; ++k) {
        const float s = grid.step[k], clo = grid.code_lo[k], chi = grid.code_hi[k];
        for (int64_t i = 0; i < n; ++i) tmp[i] = Code(xc[i], s, clo, chi);
        part[k] = Dot(gb, tmp, n);
      }
    });
    auto out = sums->flat<float>();
    for (int k = 0; k < n_sums; ++k) {
      double s = 0;
      for (int64_t b = 0; b < blocks; ++b) s += partial[b * n_sums + k];
      out(k) = static_cast<float>(s);
    }
  }
};

}  // namespace

REGISTER_OP("BbitsQuantize")
    .Input("x: float")
    .Input("x_max: float")
    .Input("coefs: float")
    .Input("alive: bool")
    .Output("y: float")
    .Attr("signed: bool")
    .Attr("bit_widths: list(int)")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return OkStatus();
    });

REGISTER_OP("BbitsQuantizeGrad")
    .Input("g: float")
    .Input("x: float")
    .Input("x_max: float")
    .Input("alive: bool")
    .Input("total: float")
    .Output("dx: float")
    .Output("sums: float")
    .Attr("signed: bool")
    .Attr("bit_widths: list(int)")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(1));
      std::vector<int32> bits;
      TF_RETURN_IF_ERROR(c->GetAttr("bit_widths", &bits));
      c->set_output(1, c->Vector(static_cast<int64_t>(bits.size()) + 3));
      return OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("BbitsQuantize").Device(DEVICE_CPU), BbitsQuantizeOp);
REGISTER_KERNEL_BUILDER(Name("BbitsQuantizeGrad").Device(DEVICE_CPU), BbitsQuantizeGradOp);
