"""Triton kernels beside their torch references, and the dispatch that picks one: the kernels issue."""
