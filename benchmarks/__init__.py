"""moesaic's benchmarks and fault drills (not installed): run one from the repository root as
``python benchmarks/<name>.py`` or ``python -m benchmarks.<name>``.

``harness`` holds what they share; the quick layer timing ``moesaic bench`` (``moesaic.cli.bench``
and its ``moesaic.cli.timing``) ships with the package, and ``moe_layer.py`` runs it from here.
Reports worth keeping: ``benchmarks/reports/<topic>_<hardware>_<yyyymm>.md``.
"""
