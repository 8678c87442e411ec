"""Serving an export folder: a Triton server (through PyTriton), a Triton model repository, and a load test.

Nothing here imports PyTriton, tritonclient or a backend library at module level; `parser` is what deploy/cli.py
loads, and each handler imports its heavy module when it runs.
"""
