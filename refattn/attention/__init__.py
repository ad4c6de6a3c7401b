"""Attention operators, one module per concept.

``sdpa`` (the core) and ``loops`` (its per-element twin), ``multihead``, ``position`` (RoPE,
ALiBi, sinusoidal), ``relative`` (Shaw), ``sparse`` (top-k), ``linear``, ``tiled`` (chunked,
online-softmax, split-KV merge), ``cache`` (KV-cache decode, paged gather), ``allocation``.
The main functions are re-exported at the top level (``refattn.sdpa``); the modules stay
addressable (``refattn.attention.tiled.sdpa_online``).
"""

from refattn.attention import allocation, cache, linear, loops, multihead, position, relative, sdpa, sparse, tiled

__all__ = ["allocation", "cache", "linear", "loops", "multihead", "position", "relative", "sdpa", "sparse", "tiled"]
