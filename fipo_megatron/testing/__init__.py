"""Helpers for tests and benchmarks (kept in the package so tools/ and tests/ share them)."""
