// Stand-in for gloo/common/error.h (nothing from it is named by ProcessGroupGloo.hpp's declarations
// that our shim uses). See ../../README.md.
#pragma once
