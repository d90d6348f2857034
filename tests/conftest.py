"""Shared test set-up.

Triton kernels run on the CPU through Triton's interpreter when no GPU is present; the variable
must be set before any kernel module is imported, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: the suite's tensors are tiny, and on a 2-core machine a second thread
# costs more in synchronisation than it saves (measured ~50x slower small matmuls under load).
torch.set_num_threads(1)
