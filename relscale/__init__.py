"""relscale: train IsoFLOP sweeps of small decoders on custom kernels and fit relative scaling laws.

Rooms (see the README for the map): ``relscale.kernels`` (Triton), ``relscale._C`` (csrc/),
``relscale.ops`` (the one dispatch point), ``relscale.model``, ``relscale.data``,
``relscale.train``, ``relscale.sweep``, ``relscale.eval`` and ``relscale.fit`` (numpy/scipy only).
Importing ``relscale`` itself is cheap and imports no torch, so ``relscale.fit`` stays torch-free.
"""

__version__ = "0.1.0"
