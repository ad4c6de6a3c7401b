"""Builds the README's example: four layers of hand-made heads over a repeated token sequence
(previous-token, first-token "sink", local window, induction), saved as an attention-map file.

    python docs/make_example.py /tmp/example_maps.npz
    refattn metrics /tmp/example_maps.npz --plot docs/metrics.png
"""

import sys

import numpy as np

import refattn
from refattn import io, masks

n = 16
tokens = np.array([5, 9, 2, 7, 3, 8, 1, 4] * 2)[None]  # the second half repeats the first


def head(logits):
    return refattn.softmax(np.where(masks.causal(n, n), logits, -np.inf))


i, j = np.arange(n)[:, None], np.arange(n)[None, :]
rng = np.random.default_rng(0)
previous = 6.0 * (j == i - 1)
sink = 6.0 * (j == 0)
local = -0.8 * np.abs(i - j)
induction = 6.0 * ((j == i - 7) & (i >= 8))  # attend to the token after the earlier copy of the current one
layers = []
for layer in range(4):
    noise = 0.5 * rng.standard_normal((4, n, n))
    layers.append(
        np.stack(
            [
                head(previous + noise[0]),
                head(sink + noise[1]),
                head(local + noise[2]),
                head((induction if layer >= 2 else previous) + noise[3]),
            ]
        )[None]
    )
io.save_attentions(sys.argv[1] if len(sys.argv) > 1 else "example_maps.npz", layers, tokens=tokens)
