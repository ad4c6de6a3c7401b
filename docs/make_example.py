"""Builds the README's example: four layers of hand-made heads over a repeated token sequence
(previous-token, first-token "sink", local window, induction), saved as an attention-map file,
and draws the README's figure from it with the command a reader would type:

    python docs/make_example.py [MAPS.npz] [FIGURE.png]   # default: a temporary file, docs/metrics.png

which runs

    refattn rollout MAPS.npz --row -1 --layer 1,3 --tokens the,cat,sat,on,a,red,mat,.,the,... --plot docs/metrics.png
"""

import sys
import tempfile
from pathlib import Path

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
words = ["the", "cat", "sat", "on", "a", "red", "mat", "."] * 2  # labels of the ids above, repeat included
COMMAND = ["rollout", "MAPS", "--row", "-1", "--layer", "1,3", "--tokens", ",".join(words), "--plot", "FIGURE"]

if __name__ == "__main__":
    from refattn.cli import main

    with tempfile.TemporaryDirectory() as scratch:
        maps = sys.argv[1] if len(sys.argv) > 1 else str(Path(scratch) / "example_maps.npz")
        figure = sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).with_name("metrics.png"))
        io.save_attentions(maps, layers, tokens=tokens)
        sys.exit(main([{"MAPS": maps, "FIGURE": figure}.get(a, a) for a in COMMAND]))
