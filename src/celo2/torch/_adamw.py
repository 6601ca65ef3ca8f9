"""The AdamW branch of :class:`~celo2.torch.Celo2`: the tensors the routing
gives AdamW (biases, norm scales, embeddings, heads), stepped with
``torch.optim.AdamW``'s arithmetic at ``adam_lr_mult * lr``, under the
optimizer's non-finite policy and precision rules.

Arithmetic, picked once per call from the hyperparameters' types:

* ``lr`` and ``weight_decay`` Python numbers: ``torch.optim.adam.adam``
  itself (bitwise ``torch.optim.AdamW``; ``capturable`` where the step count
  lives on an accelerator);
* either of them a 0-d tensor: :func:`foreach_adamw`, the arithmetic of
  ``torch.optim.AdamW(capturable=True, foreach=True)`` on any device: the bias
  corrections are computed from the step counts as tensors, so no value is
  read on the host (``torch.optim.adam`` tests ``weight_decay != 0`` and passes
  ``value=-step_size`` as a number, both host reads of a tensor).

Precision: the moments (with ``state_dtype=float32``) and the step count are
float32 whatever the parameter's dtype. With ``state_dtype=bfloat16`` the
moments are stored in bfloat16: the arithmetic runs on float32 copies and
stores them rounded stochastically (:mod:`celo2.torch._rounding`; slots
``exp_avg`` and ``exp_avg_sq``, a shard with its elements' indices in the
whole tensor). A half-precision parameter is stepped on a float32 copy
and rounded once; a float64 parameter takes the float32 update computed on a
zero parameter and applies it, and the weight decay, in float64, so it is
never rounded through float32.

Non-finite gradients (``nonfinite="skip"``): a CPU tensor checked on the host
is left out of the step; every other tensor is gated on its device
(:class:`celo2.torch.functional.Gate`: the writes are undone where its
gradient was not finite), a DTensor by a flag reduced over its shards so
that every rank skips alike.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch.optim.adam import adam as torch_adam

from celo2.torch import _rounding, _sharded
from celo2.torch import functional as F
from celo2.torch._sharded import DTensor
from celo2.torch.backends.base import StateRounding

STATE_KEYS: tuple[str, ...] = ("exp_avg", "exp_avg_sq", "step")
"""The state of one AdamW tensor: the two moments (the state dtype, the
parameter's shape) and the step count (a 0-d float32 tensor)."""

MOMENT_KEYS: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
"""The moments: the entries stored in the state dtype."""


def state_shapes(shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The shape of each entry of :data:`STATE_KEYS` for a parameter of ``shape``.

    Args:
        shape: The parameter's shape.

    Returns:
        ``exp_avg`` and ``exp_avg_sq`` -> ``shape``; ``step`` -> ``()``.
    """
    shape = tuple(int(s) for s in shape)
    return {"exp_avg": shape, "exp_avg_sq": shape, "step": ()}


def init_state(p: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Zero moments (of ``dtype``, the state dtype, laid out like ``p``) and a zero step count on the CPU.

    The step count moves to ``p``'s device where the step needs it there
    (:func:`step`).
    """
    return {
        "step": torch.tensor(0.0, dtype=torch.float32),
        "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
    }


def uses_tensor_hyperparameters(group: Mapping[str, Any]) -> bool:
    """Whether the group's ``lr`` or ``weight_decay`` is a tensor (the :func:`foreach_adamw` arithmetic)."""
    return isinstance(group["lr"], torch.Tensor) or isinstance(group["weight_decay"], torch.Tensor)


def step(group: Mapping[str, Any], params: Sequence[torch.Tensor], states: Sequence[dict[str, Any]],
         counters: Sequence[torch.Tensor], shardings: Mapping[torch.Tensor, _sharded.Sharding],
         rounding: Optional[StateRounding] = None) -> None:
    """AdamW at ``adam_lr_mult * lr`` on ``params``, in place, under the group's non-finite policy.

    Args:
        group: The param group (``lr``, ``weight_decay``, ``adam_lr_mult``,
            ``adam_betas``, ``adam_eps``, ``foreach``, ``nonfinite``, ``backend``).
        params: Its tensors routed to AdamW, each with a gradient of its shape.
        states: Their states (:func:`init_state`).
        counters: Their 0-d integer counters of skipped steps.
        shardings: How each DTensor of ``params`` is sharded.
        rounding: With bfloat16 moments, how each write is rounded (lists parallel to ``params``);
            ``None`` for float32 moments.
    """
    skip = group["nonfinite"] == "skip"
    on_device = uses_tensor_hyperparameters(group)  # the step counts join the device arithmetic
    flags = sharded_finite_flags(params, shardings) if skip else {}
    host, gated, gates = [], [], []
    for p, state, counter in zip(params, states, counters):
        if on_device:
            _step_count_on_device(p, state)
        if not skip:
            host.append(p)
        elif isinstance(p, DTensor):
            _step_count_on_device(p, state)
            gated.append(p)
            gates.append(F.Gate(_sharded.local(p), [_sharded.local(state[k]) for k in STATE_KEYS], counter,
                                ok=flags[p]))
        elif F.checked_on_host(group["backend"], p):
            if F.grad_finite(p.grad):
                host.append(p)
            else:
                counter.add_(1)
        else:
            # Gated on the device: the step count lives there too, so no write needs the flag on the host.
            _step_count_on_device(p, state)
            gated.append(p)
            gates.append(F.Gate(p, [state[k] for k in STATE_KEYS], counter))
    state_of = dict(zip(params, states))
    work_of = state_of
    if rounding is not None:
        work_of = {p: _rounding.working_copy(st, MOMENT_KEYS) for p, st in state_of.items()}
    _run(group, host, work_of, capturable=False)
    _run(group, [p for p in gated if p.device.type == "cpu"], work_of, capturable=False)
    _run(group, [p for p in gated if p.device.type != "cpu"], work_of, capturable=True)
    if rounding is not None:
        stepped = set(host) | set(gated)
        for j, p in enumerate(params):
            if p in stepped:
                layout = shardings[p].block_origin if isinstance(p, DTensor) else None
                _rounding.store_state({k: _sharded.local(state_of[p][k]) for k in MOMENT_KEYS},
                                      {k: _sharded.local(work_of[p][k]) for k in MOMENT_KEYS},
                                      rounding.tensor(j), MOMENT_KEYS, layout)
    for gate in gates:
        gate.close()


def sharded_finite_flags(params: Sequence[torch.Tensor],
                         shardings: Mapping[torch.Tensor, _sharded.Sharding]) -> dict[torch.Tensor, torch.Tensor]:
    """The non-finite flag of every DTensor of ``params``, reduced over its shards (one collective per
    shard group), so that every rank skips alike."""
    by_group: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if isinstance(p, DTensor):
            by_group.setdefault(shardings[p].group, []).append(p)
    flags = {}
    for members in by_group.values():
        oks = _sharded.finite_flags([p.grad for p in members], shardings[members[0]])
        flags.update(zip(members, oks))
    return flags


def _step_count_on_device(p: torch.Tensor, state: dict[str, Any]) -> None:
    """Move the step count to ``p``'s device (it starts on the CPU; a no-op for CPU parameters)."""
    if p.device.type != "cpu" and state["step"].device != p.device:
        state["step"] = state["step"].to(p.device)


def _run(group: Mapping[str, Any], params: list[torch.Tensor], state_of: Mapping[torch.Tensor, dict[str, Any]],
         capturable: bool) -> None:
    """The arithmetic on ``params`` under the precision rules of the module doc."""
    if not params:
        return
    beta1, beta2 = group["adam_betas"]
    lr, weight_decay = group["lr"] * group["adam_lr_mult"], group["weight_decay"]
    tensor_hyperparameters = uses_tensor_hyperparameters(group)
    kw = dict(beta1=beta1, beta2=beta2, lr=lr, eps=group["adam_eps"], capturable=capturable,
              tensor_hyperparameters=tensor_hyperparameters)
    loc = _sharded.local  # DTensors step on their local blocks: the branch is elementwise
    fp32 = [p for p in params if p.dtype == torch.float32]
    if fp32:
        _arithmetic([loc(p) for p in fp32], [loc(p.grad) for p in fp32],
                    [loc(state_of[p]["exp_avg"]) for p in fp32], [loc(state_of[p]["exp_avg_sq"]) for p in fp32],
                    [state_of[p]["step"] for p in fp32], foreach=group["foreach"], weight_decay=weight_decay, **kw)
    for p in params:
        if p.dtype == torch.float32:
            continue
        state = {k: loc(v) for k, v in state_of[p].items()}
        grad, p = loc(p.grad), loc(p)
        if p.dtype == torch.float64:
            # The float32 update, taken on a zero parameter, then applied in
            # float64: the parameter is never rounded through float32.
            p32, wd = torch.zeros_like(p, dtype=torch.float32), 0.0
        else:
            # Half-precision parameters: the same arithmetic on a float32 copy,
            # so the moments never lose precision.
            p32, wd = p.to(torch.float32), weight_decay
        _arithmetic([p32], [grad.to(torch.float32)], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]],
                    foreach=False, weight_decay=wd, **kw)
        if p.dtype == torch.float64:
            if tensor_hyperparameters:
                p.mul_(1.0 - _on(lr, p, torch.float64) * _on(weight_decay, p, torch.float64))
            elif weight_decay:
                p.mul_(1.0 - lr * weight_decay)
            p.add_(p32)
        else:
            p.copy_(p32)


def _arithmetic(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: Any, weight_decay: Any,
                beta1: float, beta2: float, eps: float, foreach: bool | None, capturable: bool,
                tensor_hyperparameters: bool) -> None:
    """One AdamW step on float32 lists, by the arithmetic the module doc picks."""
    if tensor_hyperparameters:
        foreach_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, weight_decay=weight_decay,
                      beta1=beta1, beta2=beta2, eps=eps)
        return
    torch_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=foreach, weight_decay=weight_decay,
               decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, eps=eps,
               maximize=False, capturable=capturable)


def _on(value: Any, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> Any:
    """``value`` (a number, or a 0-d tensor moved to ``like``'s device and ``dtype``)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=dtype, non_blocking=True)
    return value


def foreach_adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: Any, weight_decay: Any,
                  beta1: float, beta2: float, eps: float) -> None:
    """AdamW with decoupled weight decay, in place, with no host synchronisation.

    The operations of ``torch.optim.AdamW(capturable=True, foreach=True)``, on
    any device (torch allows that path on accelerators only): the step counts
    are tensors on the parameters' device and the bias corrections are
    computed from them, and ``lr`` and ``weight_decay`` may be 0-d tensors
    (moved to the parameters' device), so nothing is read on the host.

    Args:
        params: float32 parameters, updated in place.
        grads: Their gradients (float32).
        exp_avgs: First moments (float32), updated in place.
        exp_avg_sqs: Second moments (float32), updated in place.
        steps: 0-d float32 step counts on the parameters' devices, incremented.
        lr: Learning rate, a number or a 0-d tensor.
        weight_decay: Decoupled weight decay, a number or a 0-d tensor.
        beta1: First-moment decay.
        beta2: Second-moment decay.
        eps: Added to the bias-corrected RMS.
    """
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device, []).append(i)
    for members in by_device.values():
        ps, gs = [params[i] for i in members], [grads[i] for i in members]
        m1, m2, ts = [exp_avgs[i] for i in members], [exp_avg_sqs[i] for i in members], [steps[i] for i in members]
        lr_here, wd_here = _on(lr, ps[0]), _on(weight_decay, ps[0])
        torch._foreach_add_(ts, 1)
        if isinstance(wd_here, torch.Tensor) or wd_here != 0:
            torch._foreach_mul_(ps, 1 - lr_here * wd_here)
        torch._foreach_lerp_(m1, gs, 1 - beta1)
        torch._foreach_mul_(m2, beta2)
        torch._foreach_addcmul_(m2, gs, gs, 1 - beta2)
        # step_size = -lr / (1 - beta1^t); bias_correction2_sqrt = sqrt(1 - beta2^t)
        step_size = torch._foreach_pow(beta1, ts)
        bias_correction2_sqrt = torch._foreach_pow(beta2, ts)
        torch._foreach_sub_(step_size, 1)
        torch._foreach_sub_(bias_correction2_sqrt, 1)
        torch._foreach_neg_(bias_correction2_sqrt)
        torch._foreach_div_(step_size, lr_here)
        torch._foreach_reciprocal_(step_size)
        torch._foreach_sqrt_(bias_correction2_sqrt)
        denom = torch._foreach_sqrt(m2)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, step_size)
        torch._foreach_addcdiv_(ps, m1, denom)
