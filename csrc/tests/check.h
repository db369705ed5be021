// CHECK for the C++ tests: a failed condition prints where and exits non-zero.
#pragma once

#include <cstdio>
#include <cstdlib>

#define CHECK(cond)                                                         \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, \
                   #cond);                                                  \
      std::exit(1);                                                         \
    }                                                                       \
  } while (0)
