"""The ``moesaic`` command."""
