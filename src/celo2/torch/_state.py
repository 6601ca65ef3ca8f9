"""The rule's weights and per-tensor state as PyTorch tensors.

Accumulators are float32 (or bfloat16, with ``state_dtype=bfloat16``) whatever
the parameter dtype, shaped and keyed by :mod:`celo2.rule.state` (shared with the JAX front end). The weights come
as the published arrays (for the reference formula) and as the packed vector
of :mod:`celo2.rule.layout` (for the fused backends), from which the chunked
path's slices are cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from celo2.rule import layout, spec
from celo2.rule.state import state_shapes
from celo2.rule.theta import Theta


@dataclass
class TorchTheta:
    """Theta as tensors on one device, laid out for the step.

    Attributes:
        w0: ``(30, 8)`` first layer, groups concatenated in spec order.
        b0: ``(8,)``.
        w1: ``(8, 8)`` as ``(in, out)``.
        b1: ``(8,)``.
        w2: ``(8,)`` the direction column of the last layer.
        b2: ``()`` the direction bias.
        net: ``(layout.NET_SIZE,)`` the packed weights of :func:`celo2.rule.layout.pack_theta`.
    """

    w0: torch.Tensor
    b0: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    net: torch.Tensor

    @classmethod
    def from_theta(cls, theta: Theta, device: torch.device | str | None = None) -> "TorchTheta":
        """Theta's arrays as float32 tensors on ``device`` (default: PyTorch's default device).

        Args:
            theta: A :class:`~celo2.rule.theta.Theta`.
            device: Where the tensors live.

        Returns:
            The tensors, and the packed weights built once.
        """
        def t(x):  # noqa: ANN001 - numpy in, tensor out
            return torch.as_tensor(x, dtype=torch.float32, device=device).contiguous()

        return cls(
            w0=t(theta.first_layer()),
            b0=t(theta["b0"]),
            w1=t(theta["w1"]),
            b1=t(theta["b1"]),
            w2=t(theta["w2"][:, spec.DIRECTION_OUTPUT]),
            b2=t(theta["b2"][spec.DIRECTION_OUTPUT]),
            net=t(layout.pack_theta(theta)),
        )

    def layout(self) -> "ChunkedWeights":
        """The weights re-sliced for the chunked path (built once; theta is read-only after construction)."""
        cached = self.__dict__.get("_chunked")
        if cached is None or cached.net is not self.net:
            cached = ChunkedWeights.build(self.net)
            self.__dict__["_chunked"] = cached
        return cached

    def net_numpy(self) -> np.ndarray:
        """The packed weights as a float32 NumPy array, for the CPU kernels (built once)."""
        cached = self.__dict__.get("_net_numpy")
        if cached is None:
            cached = np.ascontiguousarray(self.net.detach().cpu().numpy())
            self.__dict__["_net_numpy"] = cached
        return cached


@dataclass
class ChunkedWeights:
    """The packed weights as the chunked PyTorch path multiplies them.

    Attributes:
        net: the packed vector these were cut from (cache key).
        w_el: ``(18, 8)`` first-layer rows of the per-element channels.
        w_row: ``(6, 8)`` rows of the row-statistic channels.
        w_col: ``(6, 8)`` rows of the column-statistic channels.
        b0: ``(8,)``.
        w1: ``(8, 9)`` = ``[w1.T | b1]``: the bias rides on a row of ones.
        w2: ``(1, 9)`` = ``[w2 | b2]``.
        momentum_w: ``(3,)`` ``1 - decay`` of the momenta.
        factored_w: ``(3,)`` ``1 - decay`` of the factored statistics.
    """

    net: torch.Tensor
    w_el: torch.Tensor
    w_row: torch.Tensor
    w_col: torch.Tensor
    b0: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    momentum_w: torch.Tensor
    factored_w: torch.Tensor

    @classmethod
    def build(cls, net: torch.Tensor) -> "ChunkedWeights":
        """Cut from a packed weight vector (see :func:`celo2.rule.layout.unpack`)."""
        parts = layout.unpack(net)
        dev = net.device
        return cls(
            net=net,
            w_el=parts["w_el"].contiguous(),
            w_row=parts["w_row"].contiguous(),
            w_col=parts["w_col"].contiguous(),
            b0=parts["b0"].contiguous(),
            w1=torch.cat([parts["w1"].t(), parts["b1"].reshape(-1, 1)], dim=1).contiguous(),
            w2=torch.cat([parts["w2"].reshape(1, -1), parts["b2"].reshape(1, 1)], dim=1).contiguous(),
            momentum_w=1.0 - torch.tensor(spec.MOMENTUM_DECAYS, dtype=torch.float32, device=dev),
            factored_w=1.0 - torch.tensor(spec.FACTORED_DECAYS, dtype=torch.float32, device=dev),
        )


def init_tensor_state(param: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Zeroed accumulators for one parameter.

    Args:
        param: The parameter (its shape and device are used).
        dtype: The state dtype (``torch.float32`` or ``torch.bfloat16``).

    Returns:
        :data:`celo2.rule.state.STATE_KEYS` -> zeros of :func:`celo2.rule.state.state_shapes`.
    """
    return {key: torch.zeros(s, dtype=dtype, device=param.device)
            for key, s in state_shapes(param.shape).items()}
