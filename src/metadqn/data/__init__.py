"""Trajectory schema and Parquet IO; atomic writes; DVC-compatible hashes."""
