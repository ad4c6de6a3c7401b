"""Bridges to other implementations: array layouts (framework-free), PyTorch and Hugging Face.

``refattn.adapters.torch`` and ``refattn.adapters.transformers`` import their framework on use;
install the extras ``refattn[torch]`` / ``refattn[transformers]``.
"""

from refattn.adapters.layout import LAYOUTS, from_bhld, to_bhld

__all__ = ["LAYOUTS", "from_bhld", "to_bhld"]
