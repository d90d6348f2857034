"""The autocast rule shared by the kernels' public functions (an explicit cast at the op boundary).

``torch.autocast`` does not look inside custom ops, so each public entry point decides: ops whose
cost is matmuls (fused linear cross-entropy, attention) cast their floating inputs to the autocast
dtype, as autocast does for ``nn.Linear`` and ``scaled_dot_product_attention``; normalisation and
cross-entropy on given logits keep their input dtype (their math is fp32 inside anyway, as autocast
runs torch's own norms and softmax in fp32).
"""

from __future__ import annotations

import torch


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast to the autocast dtype of their device when autocast is on there (floating
    tensors only; integer ones pass through), else unchanged."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
