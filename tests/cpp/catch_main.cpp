// Catch2 v2 only: the test runner (v3 links Catch2::Catch2WithMain instead), with the exit codes
// ctest reads: 0 passed, 1 failed, MPQ_SKIP_EXIT_CODE (every test's SKIP_RETURN_CODE) when nothing
// failed and a test case skipped itself with MPQ_SKIP (catch_compat.h). Listing runs (used by
// catch_discover_tests, which expects the number of tests) keep Catch2's own exit code.
#define CATCH_CONFIG_RUNNER
#include "catch_compat.h"

int main(int argc, char* argv[]) {
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
  const auto& config = session.configData();
  const bool listing = config.listTests || config.listTags || config.listReporters || config.listTestNamesOnly ||
                       config.showHelp || config.libIdentify;
  const int rc = session.run();
  if (listing) return rc;
  if (rc != 0) return 1;
  return ::mpq_test::skipped ? MPQ_SKIP_EXIT_CODE : 0;
}
