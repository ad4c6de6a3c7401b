"""Attention operators, one module per concept (``sdpa``: the core; ``loops``: its loop twin).

The public functions are re-exported at the top level (``refattn.sdpa``);
this package keeps its submodules addressable (``refattn.attention.sdpa``).
"""
