"""Models built on refattn's attention, in float64 with hand-written backward (``specs/model.md``).

One module per concept: ``layers`` (embedding, linear, norms, activations, MLP, cross-entropy),
``config`` (frozen model configurations), ``params`` (deterministic initialisation, param trees),
``lm`` (the transformer language model), ``loops`` (the same LM as explicit loops), ``bengio``
(Bengio et al. 2003's neural probabilistic language model), ``train`` (optimisers, clipping,
schedules, the training loop) and ``data`` (a synthetic long-range task, the standard-library
docstring corpus, batching). Weights are ``(in, out)`` (``x @ W``) as in
:class:`refattn.attention.multihead.MHAParams`.

The modules are imported lazily (``refattn.model.layers`` on first use), so ``import refattn``
does not pay for the model code.
"""

import importlib

_MODULES = ("bengio", "config", "data", "layers", "lm", "loops", "params", "train")

__all__ = list(_MODULES)


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"refattn.model.{name}")
    raise AttributeError(f"module 'refattn.model' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MODULES))
