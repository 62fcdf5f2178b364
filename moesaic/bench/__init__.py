"""Benchmarks shipped with the package so that ``moesaic bench`` works from any install.

The scripts in the repository's ``benchmarks/`` folder are thin entry points into these modules.
"""
