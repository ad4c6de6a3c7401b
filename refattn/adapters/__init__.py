"""Bridges to other implementations: array layouts (framework-free), PyTorch, Hugging Face, JAX and
ONNX (ONNX Runtime and ONNX's reference).

``refattn.adapters.torch``, ``refattn.adapters.transformers``, ``refattn.adapters.jax`` and
``refattn.adapters.onnx`` import their framework on use; install the extras ``refattn[torch]`` /
``refattn[transformers]`` / ``refattn[jax]`` / ``refattn[onnx]``.  The JAX and ONNX adapters return a
:class:`refattn.adapters.peer.PeerVerdict`, which also says what the peer could not compute.
"""

from refattn.adapters.layout import LAYOUTS, from_bhld, to_bhld

__all__ = ["LAYOUTS", "from_bhld", "to_bhld"]
