"""Benchmarks, one module each: the data reader, the official metric and the scorer glue."""
