// Just enough Metal to compile the kernel bodies of pmod_mlx/kernels.py as C++
// (tests/test_kernels.py generates the signatures and a driver around them).
//
// Address-space qualifiers vanish and thread_position_in_grid becomes a parameter the
// driver sets while it loops over the grid. That is a faithful emulation only of kernels
// whose threads never share memory: no threadgroup memory, barriers, SIMD-group
// operations or atomics, none of which is defined here (a kernel using them fails to
// compile rather than be emulated wrongly).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#define device
#define constant

using uint = unsigned int;

struct uint3 {
    uint x, y, z;
};

using float16_t = _Float16;

namespace metal {
namespace precise {
inline float tanh(float x) { return std::tanh(x); }
inline float exp(float x) { return std::exp(x); }
}  // namespace precise
}  // namespace metal
