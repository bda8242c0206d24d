"""Method code: pure torch functions (no I/O) for losses, selection rules, averaging and metrics."""
