// Decode GEMVs on x86 CPUs with AVX512-VNNI: 4-bit and 8-bit weights times int8 activations,
// integer dot products (vpdpbusd), as llama.cpp's Q4_1 x Q8 does. Built by cpu_vnni.py.
//
// The activation row is quantized here, per 16 inputs (half a weight group): xq = round(x / d),
// d = max|x| / 127, and X = each group of 32's exact sum of x (for the weights' offsets). Scales
// per 16 rather than llama.cpp's 32: SmolLM2's few outlier channels then coarsen fewer inputs.
//
// 4-bit weight [N, K] (N % 16 == 0, K % 32 == 0), w = d * q + m (q in 0..15): tiles of 16 rows, and
// per tile and group of 32 inputs one 320-byte block: 256 bytes of nibbles, byte 64c + 4r + b =
// q[r, 8c + b] | q[r, 8c + 4 + b] << 4 (c < 4, r < 16, b < 4), then d[16] and m[16] in fp16.
//
// 8-bit weight [N, K], w = s[n] * q (q in -127..127): tiles of 16 rows, per group one 512-byte
// block, byte 64c + 4r + b = q[r, 4c + b] + 128 (c < 8), unsigned: vpdpbusd multiplies unsigned by
// signed bytes, so the sum is taken over q + 128 and 128 * sum(xq) taken off.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int GROUP = 32;
constexpr int TILE = 16;
constexpr int Q4_BLOCK = 320;
constexpr int Q8_BLOCK = 512;

constexpr int HALF = GROUP / 2;  // the inputs' scales are per 16 (two a weight group)

struct QuantRow {
  std::vector<int8_t> q;   // K
  std::vector<float> d;    // a scale per 16 inputs
  std::vector<float> sum;  // per 32 the sum of x (4-bit), or per 16 128 * sum(xq) (8-bit)
};

template <typename T>
float as_float(T v) { return static_cast<float>(v); }

template <typename T>
void quantize_row(const T* x, int64_t k, QuantRow& out, bool q_sum) {
  out.q.resize(k);
  out.d.resize(k / HALF);
  out.sum.resize(q_sum ? k / HALF : k / GROUP);
  for (int64_t h = 0; h < k / HALF; ++h) {
    float v[HALF];
    float amax = 0.f, s = 0.f;
    for (int i = 0; i < HALF; ++i) {
      v[i] = as_float(x[h * HALF + i]);
      amax = std::fmax(amax, std::fabs(v[i]));
      s += v[i];
    }
    const float d = amax / 127.f;
    const float id = d > 0.f ? 1.f / d : 0.f;
    int qs = 0;
    for (int i = 0; i < HALF; ++i) {
      const int q = static_cast<int>(std::nearbyint(v[i] * id));
      out.q[h * HALF + i] = static_cast<int8_t>(q);
      qs += q;
    }
    out.d[h] = d;
    if (q_sum)
      out.sum[h] = 128.f * qs;
    else if (h % 2)
      out.sum[h / 2] += s;
    else
      out.sum[h / 2] = s;
  }
}

template <typename T>
std::vector<QuantRow> quantize_rows(const torch::Tensor& x, bool q_sum) {
  const int64_t m = x.size(0), k = x.size(1);
  std::vector<QuantRow> rows(m);
  const T* p = x.data_ptr<T>();
  for (int64_t i = 0; i < m; ++i) quantize_row(p + i * k, k, rows[i], q_sum);
  return rows;
}

std::vector<QuantRow> quantize(const torch::Tensor& x, bool q_sum) {
  if (x.scalar_type() == torch::kBFloat16) return quantize_rows<c10::BFloat16>(x, q_sum);
  if (x.scalar_type() == torch::kHalf) return quantize_rows<c10::Half>(x, q_sum);
  return quantize_rows<float>(x, q_sum);
}

void store(const torch::Tensor& out, int64_t row, int64_t col, __m512 v) {
  const int64_t n = out.size(1);
  if (out.scalar_type() == torch::kFloat) {
    _mm512_storeu_ps(out.data_ptr<float>() + row * n + col, v);
    return;
  }
  alignas(64) float tmp[TILE];
  _mm512_store_ps(tmp, v);
  if (out.scalar_type() == torch::kBFloat16) {
    auto* o = out.data_ptr<c10::BFloat16>() + row * n + col;
    for (int i = 0; i < TILE; ++i) o[i] = c10::BFloat16(tmp[i]);
  } else {
    auto* o = out.data_ptr<c10::Half>() + row * n + col;
    for (int i = 0; i < TILE; ++i) o[i] = c10::Half(tmp[i]);
  }
}

void check(const torch::Tensor& x, const torch::Tensor& w, int64_t n, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x: a contiguous CPU [M, K]");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf ||
              x.scalar_type() == torch::kFloat, "x: bfloat16, float16 or float32");
  const int64_t k = x.size(1);
  TORCH_CHECK(k % GROUP == 0 && n % TILE == 0, "K ", k, " must be a multiple of 32 and N ", n,
              " of 16");
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous() &&
              w.numel() == n / TILE * (k / GROUP) * block, "packed weight of ", w.numel(),
              " bytes does not fit N ", n, " K ", k);
}

}  // namespace

namespace {

// out[r, :] = rows[r] @ w.T for the 4-bit weight w [n, groups * 32], in float32.
void q4_gemv(const std::vector<QuantRow>& rows, const uint8_t* base, int64_t n, int64_t groups,
             float* out) {
  const int64_t m = rows.size();
  at::parallel_for(0, n / TILE, 1, [&](int64_t begin, int64_t end) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t r = 0; r < m; ++r) {
        const QuantRow& row = rows[r];
        const int32_t* xq = reinterpret_cast<const int32_t*>(row.q.data());
        const uint8_t* p = base + t * groups * Q4_BLOCK;
        __m512 acc = _mm512_setzero_ps(), acc_m = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; ++g, p += Q4_BLOCK, xq += 8) {
          // chunks 0, 1 hold inputs 0..15 of the group, chunks 2, 3 inputs 16..31
          __m512i dot[2];
          for (int half = 0; half < 2; ++half) {
            const __m512i v0 = _mm512_loadu_si512(p + 128 * half);
            const __m512i v1 = _mm512_loadu_si512(p + 128 * half + 64);
            const int32_t* x4 = xq + 4 * half;
            __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v0, low),
                                            _mm512_set1_epi32(x4[0]));
            __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                            _mm512_and_si512(_mm512_srli_epi16(v0, 4), low),
                                            _mm512_set1_epi32(x4[1]));
            a = _mm512_dpbusd_epi32(a, _mm512_and_si512(v1, low), _mm512_set1_epi32(x4[2]));
            b = _mm512_dpbusd_epi32(b, _mm512_and_si512(_mm512_srli_epi16(v1, 4), low),
                                    _mm512_set1_epi32(x4[3]));
            dot[half] = _mm512_add_epi32(a, b);
          }
          const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 256)));
          const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 288)));
          const __m512 xs = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[0]),
                                            _mm512_set1_ps(row.d[2 * g]),
                                            _mm512_mul_ps(_mm512_cvtepi32_ps(dot[1]),
                                                          _mm512_set1_ps(row.d[2 * g + 1])));
          acc = _mm512_fmadd_ps(d, xs, acc);
          acc_m = _mm512_fmadd_ps(mn, _mm512_set1_ps(row.sum[g]), acc_m);
        }
        _mm512_storeu_ps(out + r * n + t * TILE, _mm512_add_ps(acc, acc_m));
      }
    }
  });
}

void copy_out(const std::vector<float>& src, const torch::Tensor& out) {
  const int64_t n = out.size(1);
  for (int64_t r = 0; r < out.size(0); ++r)
    for (int64_t c = 0; c < n; c += TILE) store(out, r, c, _mm512_loadu_ps(src.data() + r * n + c));
}

}  // namespace

torch::Tensor int4_gemv(const torch::Tensor& x, const torch::Tensor& w, int64_t n) {
  check(x, w, n, Q4_BLOCK);
  const int64_t m = x.size(0), k = x.size(1);
  const auto rows = quantize(x, false);
  std::vector<float> out(m * n);
  q4_gemv(rows, w.data_ptr<uint8_t>(), n, k / GROUP, out.data());
  auto y = torch::empty({m, n}, x.options());
  copy_out(out, y);
  return y;
}

torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale) {
  const int64_t n = scale.numel();
  check(x, w, n, Q8_BLOCK);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous(), "scale: float32 [N]");
  const int64_t m = x.size(0), k = x.size(1), groups = k / GROUP;
  const auto rows = quantize(x, true);
  auto out = torch::empty({m, n}, x.options());
  const uint8_t* base = w.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  at::parallel_for(0, n / TILE, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const __m512 row_scale = _mm512_loadu_ps(s + t * TILE);
      for (int64_t r = 0; r < m; ++r) {
        const QuantRow& row = rows[r];
        const int32_t* xq = reinterpret_cast<const int32_t*>(row.q.data());
        const uint8_t* p = base + t * groups * Q8_BLOCK;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; ++g, p += Q8_BLOCK, xq += 8) {
          for (int half = 0; half < 2; ++half) {  // chunks 4 half .. 4 half + 3: 16 inputs
            const uint8_t* ph = p + 256 * half;
            const int32_t* x4 = xq + 4 * half;
            __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(ph),
                                            _mm512_set1_epi32(x4[0]));
            __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(ph + 64),
                                            _mm512_set1_epi32(x4[1]));
            a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(ph + 128), _mm512_set1_epi32(x4[2]));
            b = _mm512_dpbusd_epi32(b, _mm512_loadu_si512(ph + 192), _mm512_set1_epi32(x4[3]));
            const int64_t i = 2 * g + half;
            const __m512i dot = _mm512_sub_epi32(
                _mm512_add_epi32(a, b), _mm512_set1_epi32(static_cast<int32_t>(row.sum[i])));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(row.d[i]), acc);
          }
        }
        store(out, r, t * TILE, _mm512_mul_ps(acc, row_scale));
      }
    }
  });
  return out;
}

namespace {

// a = x * rsqrt(mean(x^2) + eps) * w, quantized for the next GEMV.
std::vector<QuantRow> normed(const float* x, const c10::BFloat16* w, int64_t h, double eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < h; ++i) ss += double(x[i]) * x[i];
  const float r = 1.f / std::sqrt(float(ss / h) + float(eps));
  std::vector<float> a(h);
  for (int64_t i = 0; i < h; ++i) a[i] = x[i] * r * float(w[i]);
  std::vector<QuantRow> rows(1);
  quantize_row(a.data(), h, rows[0], false);
  return rows;
}

float dot(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
  return _mm512_reduce_add_ps(acc);
}

}  // namespace

// One decode token through one Llama layer, in place on the residual stream x (float32 [H]):
// x += o(attention(rope(qkv(norm(x))))), then x += down(silu(gate) * up) of norm(x). The new
// key and value go to the 16-bit caches at `slot` and, widened from their 16-bit values (as a
// gather from the cache would give them), to row n - 1 of the float32 histories k_all / v_all
// [rows, kv_heads, d], whose rows 0..n-2 hold the sequence's earlier keys and values.
void decode_layer(torch::Tensor x, const torch::Tensor& in_w, const torch::Tensor& post_w,
                  double eps, const torch::Tensor& qkv_w, const torch::Tensor& o_w,
                  const torch::Tensor& gu_w, const torch::Tensor& down_w,
                  const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor k_cache,
                  torch::Tensor v_cache, int64_t slot, torch::Tensor k_all, torch::Tensor v_all,
                  int64_t n, double scale, int64_t nh, int64_t nkv, int64_t d, int64_t inter) {
  const int64_t h = x.numel(), width = (nh + 2 * nkv) * d, group = nh / nkv;
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: float32 [H]");
  TORCH_CHECK(in_w.scalar_type() == torch::kBFloat16 && post_w.scalar_type() == torch::kBFloat16,
              "norm weights: bfloat16");
  TORCH_CHECK(k_cache.scalar_type() == torch::kBFloat16 && v_cache.scalar_type() == torch::kBFloat16
              && k_cache.is_contiguous() && v_cache.is_contiguous(), "caches: contiguous bfloat16");
  TORCH_CHECK(k_all.scalar_type() == torch::kFloat && k_all.is_contiguous() && v_all.is_contiguous()
              && n >= 1 && n <= k_all.size(0), "histories: float32 of at least n rows");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat &&
              cos.numel() == d && sin.numel() == d && d % 16 == 0, "cos, sin: float32 [d]");
  TORCH_CHECK(qkv_w.numel() == width / TILE * (h / GROUP) * Q4_BLOCK &&
              o_w.numel() == h / TILE * (nh * d / GROUP) * Q4_BLOCK &&
              gu_w.numel() == 2 * inter / TILE * (h / GROUP) * Q4_BLOCK &&
              down_w.numel() == h / TILE * (inter / GROUP) * Q4_BLOCK, "packed weights' sizes");
  float* xp = x.data_ptr<float>();
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();

  std::vector<float> qkv(width);
  q4_gemv(normed(xp, in_w.data_ptr<c10::BFloat16>(), h, eps), qkv_w.data_ptr<uint8_t>(), width,
          h / GROUP, qkv.data());
  // Rotary with sin folded (its sign per half): out[j] = x[j] cos[j] + x[(j + d/2) % d] sin[j].
  float rolled[1024];
  TORCH_CHECK(d <= 1024, "head_dim ", d, " over 1024");
  for (int64_t head = 0; head < nh + nkv; ++head) {
    float* v = qkv.data() + head * d;
    for (int64_t j = 0; j < d; ++j) rolled[j] = v[(j + d / 2) % d];
    for (int64_t j = 0; j < d; ++j) v[j] = v[j] * cs[j] + rolled[j] * sn[j];
  }
  const int64_t row = nkv * d;
  auto* kc = k_cache.data_ptr<c10::BFloat16>() + slot * row;
  auto* vc = v_cache.data_ptr<c10::BFloat16>() + slot * row;
  float* kh = k_all.data_ptr<float>();
  float* vh = v_all.data_ptr<float>();
  for (int64_t j = 0; j < row; ++j) {
    kc[j] = c10::BFloat16(qkv[nh * d + j]);
    vc[j] = c10::BFloat16(qkv[nh * d + row + j]);
    kh[(n - 1) * row + j] = float(kc[j]);
    vh[(n - 1) * row + j] = float(vc[j]);
  }
  // One query per head over the n keys of its kv head: softmax(q k^T * scale) v, the heads
  // spread over the threads where the keys are many (a few us of work each at ~100 keys).
  std::vector<float> att(nh * d, 0.f);
  at::parallel_for(0, nh, n >= 256 ? 1 : nh, [&](int64_t begin, int64_t end) {
    std::vector<float> p(n);
    for (int64_t head = begin; head < end; ++head) {
      const float* q = qkv.data() + head * d;
      const int64_t kv = head / group;
      float top = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = dot(q, kh + j * row + kv * d, d) * float(scale);
        top = std::fmax(top, p[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) total += (p[j] = std::exp(p[j] - top));
      float* o = att.data() + head * d;
      for (int64_t j = 0; j < n; ++j) {
        const float w = p[j] / total;
        const float* vj = vh + j * row + kv * d;
        for (int64_t e = 0; e < d; ++e) o[e] += w * vj[e];
      }
    }
  });
  std::vector<QuantRow> rows(1);
  quantize_row(att.data(), nh * d, rows[0], false);
  std::vector<float> y(h);
  q4_gemv(rows, o_w.data_ptr<uint8_t>(), h, nh * d / GROUP, y.data());
  for (int64_t i = 0; i < h; ++i) xp[i] += y[i];

  std::vector<float> gu(2 * inter);
  q4_gemv(normed(xp, post_w.data_ptr<c10::BFloat16>(), h, eps), gu_w.data_ptr<uint8_t>(),
          2 * inter, h / GROUP, gu.data());
  for (int64_t i = 0; i < inter; ++i) gu[i] = gu[i] / (1.f + std::exp(-gu[i])) * gu[inter + i];
  quantize_row(gu.data(), inter, rows[0], false);
  q4_gemv(rows, down_w.data_ptr<uint8_t>(), h, inter / GROUP, y.data());
  for (int64_t i = 0; i < h; ++i) xp[i] += y[i];
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_gemv", &int4_gemv, "x [M, K] @ a packed 4-bit weight [N, K]^T");
  m.def("int8_gemv", &int8_gemv, "x [M, K] @ a packed 8-bit weight [N, K]^T, a scale per row");
  m.def("decode_layer", &decode_layer, "one decode token through one Llama layer, in place");
}
