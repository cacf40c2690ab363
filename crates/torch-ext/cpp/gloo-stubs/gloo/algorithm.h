// Stand-in for gloo/algorithm.h. libtorch's wheel ships ProcessGroupGloo.hpp but not gloo's headers;
// the header names nothing from this one that our shim uses. See ../README.md.
#pragma once
