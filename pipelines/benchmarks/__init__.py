"""Benchmarks that the ``raymoe bench`` subcommands run; each prints a table and writes JSON, never asserts a time."""
