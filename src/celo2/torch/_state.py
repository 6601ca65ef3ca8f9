"""The rule's weights and per-tensor state as PyTorch tensors.

Accumulators are float32 (or bfloat16, with ``state_dtype=bfloat16``) whatever
the parameter dtype, shaped and keyed by :mod:`celo2.rule.state` (shared with the JAX front end). The weights come
as the published arrays (for the reference formula) and as the packed vector
of :mod:`celo2.rule.layout` (for the fused backends), from which the chunked
path's slices are cut. A theta of another rule variant has no packed vector
(the fused kernels run the published rule only): the chunked path's weights
are cut from its arrays, the first layer's rows of the groups it leaves out
set to zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from celo2.rule import layout, spec
from celo2.rule.state import state_shapes
from celo2.rule.theta import Theta
from celo2.rule.variant import MAGNITUDE_OUTPUT, PUBLISHED, RuleVariant


@dataclass
class TorchTheta:
    """Theta as tensors on one device, laid out for the step.

    Attributes:
        w0: ``(features, width)`` first layer, the variant's groups concatenated in spec order
            (published ``(30, 8)``).
        b0: ``(width,)``.
        w1: ``(width, width)`` the second layer as ``(in, out)`` (``None`` with one hidden layer).
        b1: ``(width,)`` (``None`` with one hidden layer).
        w2: ``(width,)`` the direction column of the last layer.
        b2: ``()`` the direction bias.
        net: ``(layout.NET_SIZE,)`` the packed weights of :func:`celo2.rule.layout.pack_theta`
            (``None`` for a rule variant other than the published one).
        variant: The rule variant (default the published rule).
        layers: ``(w, b)`` of every hidden-to-hidden layer in order (``w`` as ``(in, out)``).
        w_out: ``(width, 3)`` the whole last layer.
        b_out: ``(3,)`` its biases.
    """

    w0: torch.Tensor
    b0: torch.Tensor
    w1: torch.Tensor | None
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor
    net: torch.Tensor | None
    variant: RuleVariant = PUBLISHED
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    w_out: torch.Tensor | None = None
    b_out: torch.Tensor | None = None

    @classmethod
    def from_theta(cls, theta: Theta, device: torch.device | str | None = None) -> "TorchTheta":
        """Theta's arrays as float32 tensors on ``device`` (default: PyTorch's default device).

        Args:
            theta: A :class:`~celo2.rule.theta.Theta` of any rule variant.
            device: Where the tensors live.

        Returns:
            The tensors, (published rule) the packed weights, and the chunked path's slices, built once.
        """
        def t(x):  # noqa: ANN001 - numpy in, tensor out
            return torch.as_tensor(x, dtype=torch.float32, device=device).contiguous()

        variant = theta.variant
        arrays = theta.arrays
        last = variant.hidden_layers
        layers = tuple((t(arrays[f"w{k}"]), t(arrays[f"b{k}"])) for k in range(1, last))
        weights = cls(
            w0=t(theta.first_layer()),
            b0=t(arrays["b0"]),
            w1=layers[0][0] if layers else None,
            b1=layers[0][1] if layers else None,
            w2=t(arrays[f"w{last}"][:, spec.DIRECTION_OUTPUT]),
            b2=t(arrays[f"b{last}"][spec.DIRECTION_OUTPUT]),
            net=t(layout.pack_theta(theta)) if variant.is_published else None,
            variant=variant,
            layers=layers,
            w_out=t(arrays[f"w{last}"]),
            b_out=t(arrays[f"b{last}"]),
        )
        weights.layout()  # built here, outside any step, so that a torch.compile'd step only reads it
        return weights

    def layout(self) -> "ChunkedWeights":
        """The weights re-sliced for the chunked path (built once; theta is read-only after construction)."""
        cached = self.__dict__.get("_chunked")
        if cached is None or (self.net is not None and cached.net is not self.net):
            cached = ChunkedWeights.build(self.net) if self.variant.is_published else ChunkedWeights.of_variant(self)
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
        net: the packed vector these were cut from (cache key; ``None`` for a rule variant).
        w_el: ``(18, width)`` first-layer rows of the per-element channels.
        w_row: ``(6, width)`` rows of the row-statistic channels.
        w_col: ``(6, width)`` rows of the column-statistic channels.
        b0: ``(width,)``.
        w1: ``(width, width + 1)`` = ``[w1.T | b1]``: the bias rides on a row of ones
            (``None`` with one hidden layer).
        w2: ``(outputs, width + 1)`` = ``[w2 | b2]`` of the outputs used (the direction; then the magnitude).
        momentum_w: ``(3,)`` ``1 - decay`` of the momenta.
        factored_w: ``(3,)`` ``1 - decay`` of the factored statistics.
        variant: The rule variant; its left-out groups' first-layer rows are zero.
        hidden: ``[w_k.T | b_k]`` of every hidden-to-hidden layer (``(w1,)`` published).
        rms_decay: The second moment's decay.
    """

    net: torch.Tensor | None
    w_el: torch.Tensor
    w_row: torch.Tensor
    w_col: torch.Tensor
    b0: torch.Tensor
    w1: torch.Tensor | None
    w2: torch.Tensor
    momentum_w: torch.Tensor
    factored_w: torch.Tensor
    variant: RuleVariant = PUBLISHED
    hidden: tuple[torch.Tensor, ...] = ()
    rms_decay: float = spec.RMS_DECAY

    @property
    def width(self) -> int:
        """Units per hidden layer."""
        return self.variant.hidden_width

    @classmethod
    def build(cls, net: torch.Tensor) -> "ChunkedWeights":
        """Cut from a packed weight vector (see :func:`celo2.rule.layout.unpack`)."""
        parts = layout.unpack(net)
        dev = net.device
        w1 = torch.cat([parts["w1"].t(), parts["b1"].reshape(-1, 1)], dim=1).contiguous()
        return cls(
            net=net,
            w_el=parts["w_el"].contiguous(),
            w_row=parts["w_row"].contiguous(),
            w_col=parts["w_col"].contiguous(),
            b0=parts["b0"].contiguous(),
            w1=w1,
            w2=torch.cat([parts["w2"].reshape(1, -1), parts["b2"].reshape(1, 1)], dim=1).contiguous(),
            momentum_w=1.0 - torch.tensor(spec.MOMENTUM_DECAYS, dtype=torch.float32, device=dev),
            factored_w=1.0 - torch.tensor(spec.FACTORED_DECAYS, dtype=torch.float32, device=dev),
            hidden=(w1,),
        )

    @classmethod
    def of_variant(cls, theta: TorchTheta) -> "ChunkedWeights":
        """Cut from the arrays of a theta of any rule variant (no packed vector): the first layer as
        ``(30, width)`` with zero rows for the groups the variant leaves out, so that the chunked
        path builds every channel and the left-out ones add nothing."""
        variant = theta.variant
        dev = theta.b0.device
        first = torch.zeros(spec.NUM_FEATURES, variant.hidden_width, dtype=torch.float32, device=dev)
        start = 0
        for group in variant.groups:
            rows = layout.GROUP_ROWS[group.name]
            first[rows[0]:rows[-1] + 1] = theta.w0[start:start + group.width]
            start += group.width
        hidden = tuple(torch.cat([w.t(), b.reshape(-1, 1)], dim=1).contiguous() for w, b in theta.layers)
        outputs = [spec.DIRECTION_OUTPUT] + ([MAGNITUDE_OUTPUT] if variant.outputs == "direction+magnitude" else [])
        w2 = torch.cat([theta.w_out[:, outputs].t(), theta.b_out[outputs].reshape(-1, 1)], dim=1).contiguous()
        return cls(
            net=None,
            w_el=first[list(layout.ELEMENT_ROWS)].contiguous(),
            w_row=first[list(layout.ROW_STAT_ROWS)].contiguous(),
            w_col=first[list(layout.COL_STAT_ROWS)].contiguous(),
            b0=theta.b0,
            w1=hidden[0] if hidden else None,
            w2=w2,
            momentum_w=1.0 - torch.tensor(variant.momentum_decays, dtype=torch.float32, device=dev),
            factored_w=1.0 - torch.tensor(variant.factored_decays, dtype=torch.float32, device=dev),
            variant=variant,
            hidden=hidden,
            rms_decay=variant.rms_decay,
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
