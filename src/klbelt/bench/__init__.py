"""Benchmarks run by ``klbelt bench NAME`` (one module per benchmark)."""
