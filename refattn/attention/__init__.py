"""Attention operators, one module per concept.

``sdpa`` (the core) and ``loops`` (its per-element twin), ``multihead``, ``position`` (RoPE,
ALiBi, sinusoidal), ``relative`` (Shaw), ``sparse`` (top-k), ``linear``, ``tiled`` (chunked,
online-softmax, split-KV merge), ``cache`` (KV-cache decode, paged gather), ``allocation``;
``options`` defines sdpa's keyword options once and gives them to every variant.
The main functions are re-exported at the top level (``refattn.sdpa``); the modules stay
addressable (``refattn.attention.tiled.sdpa_online``).

Axes, in every module: ``...`` batch dims (broadcast), ``Hq``/``Hk`` query/key-value heads
(``Hq % Hk == 0``: query head h reads kv head ``h // (Hq // Hk)``), ``Lq``/``Lk`` query/key
lengths, ``D`` the q/k head dim, ``Dv`` the value head dim: ``q (..., Hq, Lq, D)``,
``k (..., Hk, Lk, D)``, ``v (..., Hk, Lk, Dv)``, scores ``(..., Hq, Lq, Lk)``.  Each variant takes
:func:`refattn.sdpa`'s options (mask, bias, causal, window, align, scale, softcap, sinks,
dropout_p, dropout_mask, empty_rows) unless its docstring says it refuses one, and each
differentiable op ``name`` has ``name_backward(d_out, <same inputs>, <same options>)``.
"""

from refattn.attention import allocation, cache, linear, loops, multihead, position, relative, sdpa, sparse, tiled

__all__ = ["allocation", "cache", "linear", "loops", "multihead", "position", "relative", "sdpa", "sparse", "tiled"]
