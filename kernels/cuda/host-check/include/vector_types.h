// Host stand-in for CUDA's <vector_types.h>, for the host check only: the 16-byte vector
// type group_norm.cu stores through.
#pragma once

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
