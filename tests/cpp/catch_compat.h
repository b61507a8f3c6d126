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
