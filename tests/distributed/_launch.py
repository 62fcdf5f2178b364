"""Tests launch their gloo processes with the package's own local launcher."""

from moesaic.parallel.launch import free_port, run_local

run_distributed = run_local
_free_port = free_port
