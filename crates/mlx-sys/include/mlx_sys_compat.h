/*
 * Force-included (`-include`) into every mlx-c translation unit and into the
 * bindgen run. It papers over two gaps between mlx-c 0.7.0 and Linux x86_64:
 *
 * 1. mlx-c's `half.h` only defines `float16_t` / `bfloat16_t` (and thereby the
 *    f16/bf16 item/data functions that mlx-rs calls) on aarch64. The C API
 *    passes these types by pointer only, so any 16-bit type with the right
 *    size works: `__fp16` for bindgen (it becomes the `__BindgenFloat16`
 *    newtype that mlx-rs expects) and `uint16_t` for the C++ compiler.
 * 2. GCC 12's libstdc++ has no `<format>`, which mlx-c's `private/io.h` uses
 *    for a few error messages. A tiny `{}`-substituting fallback suffices.
 */
#ifndef MLX_SYS_COMPAT_H
#define MLX_SYS_COMPAT_H

#if !defined(__aarch64__) && !defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC)
#include <stdint.h>
#define HAS_FLOAT16
#define HAS_BFLOAT16
#if defined(MLX_SYS_BINDGEN)
typedef __fp16 float16_t;
#else
typedef uint16_t float16_t;
#endif
typedef uint16_t bfloat16_t;
#endif

#if defined(__cplusplus) && defined(__has_include)
#if !__has_include(<format>)
#include <sstream>
#include <string>
#include <string_view>

namespace std {
/* Substitutes each `{}` in `fmt` with the next argument, as the few
 * std::format calls in mlx-c need; format specifications are not supported. */
template <typename... Args>
std::string format(std::string_view fmt, const Args&... args) {
  std::ostringstream out;
  std::string_view rest = fmt;
  auto put = [&](const auto& value) {
    auto at = rest.find("{}");
    if (at == std::string_view::npos) {
      return;
    }
    out << rest.substr(0, at) << value;
    rest = rest.substr(at + 2);
  };
  (put(args), ...);
  out << rest;
  return out.str();
}
} // namespace std
#endif
#endif

#endif /* MLX_SYS_COMPAT_H */
