// One include for Catch2 v2 (catch2/catch.hpp) and v3 (catch2/catch_test_macros.hpp):
// CMake passes MPQ_CATCH2_MAJOR; without it, whichever header exists is used.
#pragma once

#if !defined(MPQ_CATCH2_MAJOR)
#if __has_include(<catch2/catch_test_macros.hpp>)
#define MPQ_CATCH2_MAJOR 3
#else
#define MPQ_CATCH2_MAJOR 2
#endif
#endif

#if MPQ_CATCH2_MAJOR >= 3
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#else
#include <catch2/catch.hpp>
#endif

// MPQ_SKIP(reason): a test case that cannot run here (no GPU, a missing asset) returns, and ctest
// reports it as skipped, never as passed. The exit code MPQ_SKIP_EXIT_CODE is every test's
// SKIP_RETURN_CODE (tests/cpp/CMakeLists.txt).
// - Catch2 v3.3+: its SKIP; the runner exits with 4 when every test case it ran skipped.
// - Catch2 v2 has no skip: the reason is printed as a warning, the skip recorded, the test case
//   returns, and our runner (catch_main.cpp) exits with 4 when nothing failed and a test case
//   skipped, with 1 on any failure (v2's own main returns the number of failed assertions, and
//   four failures would read as a skip).
#define MPQ_SKIP_EXIT_CODE 4
#if MPQ_CATCH2_MAJOR >= 3 && defined(SKIP)
#define MPQ_SKIP(msg) SKIP(msg)
#else
#if MPQ_CATCH2_MAJOR >= 3
#pragma message("mpq: Catch2 v3 before 3.3 has no SKIP: ctest reports a test that skips itself as passed")
#endif
namespace mpq_test {
inline bool skipped = false;  // set by MPQ_SKIP, read by catch_main.cpp's runner
}  // namespace mpq_test
#define MPQ_SKIP(msg)           \
  do {                          \
    WARN("skipped: " << msg);   \
    ::mpq_test::skipped = true; \
    return;                     \
  } while (0)
#endif
