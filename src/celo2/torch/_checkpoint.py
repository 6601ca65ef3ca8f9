"""Checkpoints of :class:`~celo2.torch.Celo2` and :class:`~celo2.torch.Celo2Base`:
a saved state checked whole against the optimizer before anything loads, and
what loading changes beyond ``torch.optim.Optimizer.load_state_dict``.

* :func:`check_state_dict`: the saved groups and every saved tensor state
  fit this optimizer and model (counts, the settings that select the
  algorithm, keys, shapes and dtypes per branch), or a ``ValueError`` names
  the group or parameter and nothing is loaded. :func:`check_tensor_state`
  is the per-tensor part, also run on the live state before each step.
* :class:`Migration`: taken before the load, applied after it: settings a
  state saved before they existed lacks keep this optimizer's values, the
  settings that depend on the machine (``backend``, ``ns_dtype``) and the
  state dtype stay this optimizer's, and the saved accumulators are
  converted to that state dtype whatever the parameter dtype
  (:func:`converted_accumulators`, checked before anything loads): bfloat16
  to float32 exactly, float32 to bfloat16 rounded to nearest-even (a
  deterministic conversion, done once), a value that would overflow the
  target refused; counters stay int32, and the rounding step counter is
  kept for bfloat16 state and dropped for float32.
* :func:`lay_out_state`: a loaded state laid out like its parameter for
  DTensor parameters (a whole tensor becomes this rank's block, a DTensor
  with other placements is redistributed) and gathered whole for plain ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch

from celo2.rule import routing
from celo2.rule import state as rule_state
from celo2.torch import _adamw, _blockwise8, _sharded
from celo2.torch._sharded import DTensor

COUNTER_KEY = "nonfinite_steps"
"""The per-tensor state entry counting steps skipped for a non-finite gradient (0-d int32)."""
ROUNDING_STEP_KEY = "rounding_step"
"""The per-tensor state entry of bfloat16 state counting the tensor's steps, the ``step`` of its stochastic
rounding (0-d int64 on the parameter's device; skipped steps count too)."""
COUNTER_KEYS: tuple[str, ...] = (COUNTER_KEY, ROUNDING_STEP_KEY)
"""The per-tensor integer counters beside the branch's own state."""
ALGORITHM_KEYS: tuple[str, ...] = ("branch", "orthogonalize", "nonfinite")
"""Param-group settings that select the algorithm: a saved state must agree on them."""
MACHINE_KEYS: tuple[str, ...] = ("backend", "ns_dtype")
"""Param-group settings that depend on the machine: kept from this optimizer when a state loads."""
KEPT_KEYS: tuple[str, ...] = (*MACHINE_KEYS, "state_dtype")
"""Param-group settings kept from this optimizer when a state loads: the machine's, and the state dtype (the
saved accumulators are converted to it)."""
DEFAULTED_KEYS: tuple[str, ...] = (*ALGORITHM_KEYS, "rounding_seed")
"""Param-group settings that a state saved before they existed lacks: they keep this optimizer's values."""
ACCUMULATOR_KEYS: tuple[str, ...] = (*rule_state.STATE_KEYS, *_adamw.MOMENT_KEYS)
"""Accumulators stored in the param group's state dtype whatever the parameter's dtype."""


class TensorEntry(NamedTuple):
    """One parameter of the optimizer, as the checks see it."""

    label: str
    """Its name when ``named_parameters()`` was given, else ``group<g>.param<i>``."""
    branch: str
    """``"celo2"`` or ``"adam"`` (see :mod:`celo2.rule.routing`)."""
    param: torch.Tensor


def expected_shapes(branch: str, p: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The state entries a parameter keeps on ``branch`` (the counter aside), with their shapes."""
    return rule_state.state_shapes(p.shape) if branch == routing.LEARNED else _adamw.state_shapes(p.shape)


def stored_as_blockwise8(pstate: Mapping[str, Any]) -> bool:
    """Whether a tensor's state holds 8-bit blockwise accumulators (codes and scales,
    :mod:`celo2.torch._blockwise8`) rather than floating-point ones."""
    return any(_blockwise8.scale_key(k) in pstate for k in ACCUMULATOR_KEYS)


def _check_blockwise8_state(where: str, label: str, expected: Mapping[str, tuple[int, ...]],
                            pstate: Mapping[str, Any], error: type[Exception]) -> None:
    """The codes and scales of an 8-bit state fit the accumulators ``expected`` (key -> shape)."""
    others = {k: shape for k, shape in expected.items() if k not in ACCUMULATOR_KEYS}
    entries = _blockwise8.expected_entries({k: v for k, v in expected.items() if k in ACCUMULATOR_KEYS})
    keys = set(pstate) - set(COUNTER_KEYS)
    if keys != set(entries) | set(others):
        raise error(f"{where}: the state of {label} has {sorted(keys)}, 8-bit blockwise state keeps "
                    f"{sorted(set(entries) | set(others))}; nothing was changed")
    for key, (shape, dtype) in entries.items():
        t = pstate[key]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            have = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise error(f"{where}: state {key!r} of {label} is {have}, expected {dtype} {shape} (8-bit blockwise "
                        f"state); nothing was changed")
    for key in others:
        if not isinstance(pstate[key], torch.Tensor) or not pstate[key].is_floating_point():
            raise error(f"{where}: state {key!r} of {label} is {type(pstate[key]).__name__}, expected a "
                        f"floating-point tensor; nothing was changed")


def check_tensor_state(where: str, label: str, branch: str, p: torch.Tensor, pstate: Mapping[str, Any],
                       error: type[Exception] = ValueError, state_dtype: Optional[torch.dtype | str] = None) -> None:
    """Refuse a tensor's saved or current state whose keys, shapes or dtypes do not fit ``p``.

    Args:
        where: The operation, for the message (``Celo2.load_state_dict``).
        label: The parameter's name.
        branch: Its branch.
        p: The parameter.
        pstate: Its state.
        error: The exception class raised.
        state_dtype: The dtype the accumulators must have (a live state; ``"int8"``: codes and scales), or
            ``None`` for any of the formats (a saved state, converted when it loads).

    Raises:
        error: Naming the parameter and the entry that does not fit.
    """
    expected = expected_shapes(branch, p)
    blockwise8 = stored_as_blockwise8(pstate)
    if state_dtype is not None and blockwise8 != _blockwise8.is_blockwise8(state_dtype):
        have = "8-bit blockwise" if blockwise8 else "floating-point"
        raise error(f"{where}: the state of {label} is {have}, but its param group's state_dtype is {state_dtype} "
                    f"(a setting changed after the state was made: convert the state by loading a state_dict into "
                    f"an optimizer built with the new state_dtype); nothing was changed")
    if blockwise8:
        _check_blockwise8_state(where, label, expected, pstate, error)
        expected = {}
    keys = set(pstate) - set(COUNTER_KEYS)
    if expected and keys != set(expected):
        raise error(f"{where}: the state of {label} has {sorted(keys)}, the {branch!r} branch keeps "
                    f"{sorted(expected)}; nothing was changed")
    for key, shape in expected.items():
        t = pstate[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise error(f"{where}: state {key!r} of {label} is {type(t).__name__} "
                        f"{getattr(t, 'dtype', '')}, expected a floating-point tensor; nothing was changed")
        if tuple(t.shape) != shape:
            raise error(f"{where}: state {key!r} of {label} has shape {tuple(t.shape)}, expected {shape} "
                        f"for a parameter of shape {tuple(p.shape)}; nothing was changed")
        if state_dtype is not None and key in ACCUMULATOR_KEYS and t.dtype != state_dtype:
            raise error(f"{where}: state {key!r} of {label} is {t.dtype}, but its param group's state_dtype is "
                        f"{state_dtype} (a setting changed after the state was made: convert the state by "
                        f"loading a state_dict into an optimizer built with the new state_dtype); nothing was "
                        f"changed")
    for name in COUNTER_KEYS:
        counter = pstate.get(name)
        if counter is not None and (not isinstance(counter, torch.Tensor) or counter.ndim != 0
                                    or counter.is_floating_point() or counter.is_complex()):
            raise error(f"{where}: state {name!r} of {label} must be a 0-d integer tensor; nothing was changed")


def variant(group: Mapping[str, Any]) -> str:
    """Which optimizer a saved param group comes from, for messages: ``Celo2Base``, ``Celo2`` or ``foreign``."""
    if group.get("branch") == routing.LEARNED and not group.get("orthogonalize"):
        return "Celo2Base"
    return "Celo2" if group.get("branch") in ("auto", routing.LEARNED, routing.ADAM) else "foreign"


def check_state_dict(owner: str, param_groups: Sequence[Mapping[str, Any]],
                     entries: Sequence[Sequence[TensorEntry]], state_dict: Any) -> None:
    """Refuse a state_dict that does not fit the optimizer.

    Args:
        owner: The optimizer's class name.
        param_groups: Its param groups.
        entries: Per group, its parameters as :class:`TensorEntry`.
        state_dict: What ``load_state_dict`` was given.

    Raises:
        ValueError: Naming the param group or parameter and what differs.
    """
    where = f"{owner}.load_state_dict"
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups' (an optimizer state_dict)")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"{where}: the saved state has {len(saved_groups)} param groups, this optimizer "
                         f"{len(param_groups)}; nothing was loaded")
    for gi, (group, sg, members) in enumerate(zip(param_groups, saved_groups, entries)):
        if len(sg["params"]) != len(group["params"]):
            raise ValueError(f"{where}: param group {gi} of the saved state has {len(sg['params'])} parameters, "
                             f"this optimizer's {len(group['params'])}; nothing was loaded")
        missing = [k for k in ("branch", "orthogonalize") if k not in sg]
        if missing:
            raise ValueError(f"{where}: param group {gi} of the saved state has no {missing} setting: it is not a "
                             f"Celo2/Celo2Base state (another optimizer's, AdamW's say); nothing was loaded")
        for key in ALGORITHM_KEYS:
            if key in sg and sg[key] != group[key]:
                raise ValueError(
                    f"{where}: param group {gi} was saved with {key}={sg[key]!r}, this {owner} has {key}="
                    f"{group[key]!r} (a {variant(sg)} state into a {owner}?); that setting selects the "
                    f"algorithm, so nothing was loaded")
        for entry, pid in zip(members, sg["params"]):
            pstate = saved_state.get(pid)
            if pstate:
                check_tensor_state(where, entry.label, entry.branch, entry.param, pstate)


def loaded_settings(group: Mapping[str, Any], saved_group: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a param group will hold once ``saved_group`` is loaded into it (parameters aside)."""
    settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    settings.update({k: v for k, v in saved_group.items() if k not in ("params", "param_names")})
    settings.update({k: group[k] for k in KEPT_KEYS})
    return settings


def convert_accumulator(t: torch.Tensor, dtype: torch.dtype, device: torch.device, where: str, label: str,
                        key: str) -> torch.Tensor:
    """A saved accumulator as a new tensor of the state dtype on ``device``.

    bfloat16 to float32 is exact; a wider dtype to bfloat16 (or float64 to float32) rounds to nearest-even.

    Args:
        t: The saved tensor (any floating dtype; a DTensor keeps its placements).
        dtype: The state dtype.
        device: The parameter's device.
        where: The operation, for the message.
        label: The parameter's name.
        key: The accumulator's key.

    Returns:
        The converted copy.

    Raises:
        ValueError: A finite value beyond ``dtype``'s range (it would become an infinity), naming the
            parameter and key.
    """
    out = t.to(device=device, dtype=dtype, copy=True)
    src, dst = _sharded.local(t), _sharded.local(out)
    if torch.finfo(dtype).max < torch.finfo(src.dtype).max:
        overflow = torch.isfinite(src.to(dst.device)) & ~torch.isfinite(dst)
        if bool(overflow.any()):
            worst = float(src.to(dst.device)[overflow].abs().max())
            raise ValueError(f"{where}: state {key!r} of {label} holds {worst:.6g}, beyond the range of "
                             f"{dtype} (the state dtype it would load into); nothing was loaded")
    return out


def converted_accumulators(where: str, param_groups: Sequence[Mapping[str, Any]],
                           entries: Sequence[Sequence[TensorEntry]], state_dict: Mapping[str, Any],
                           ) -> dict[Any, dict[str, torch.Tensor]]:
    """Every saved accumulator converted to its param group's state dtype (:func:`convert_accumulator`),
    before anything loads.

    Args:
        where: The operation, for messages.
        param_groups: The optimizer's param groups (their ``state_dtype``).
        entries: Per group, its parameters as :class:`TensorEntry`.
        state_dict: The (checked) saved state.

    Returns:
        Saved parameter id -> accumulator key -> converted tensor.

    Raises:
        ValueError: From :func:`convert_accumulator`.
    """
    out: dict[Any, dict[str, torch.Tensor]] = {}
    for group, sg, members in zip(param_groups, state_dict["param_groups"], entries):
        dtype = _blockwise8.state_format(group["state_dtype"])
        for entry, pid in zip(members, sg["params"]):
            pstate = state_dict["state"].get(pid) or {}
            keys = [k for k, t in pstate.items() if k in ACCUMULATOR_KEYS and isinstance(t, torch.Tensor)]
            device = entry.param.device
            if stored_as_blockwise8(pstate) and _blockwise8.is_blockwise8(dtype):
                out[pid] = {name: pstate[name].to(device=device, copy=True)
                            for k in keys for name in (k, _blockwise8.scale_key(k))}
            elif _blockwise8.is_blockwise8(dtype):
                out[pid] = {}
                for k in keys:
                    codes, scales = _blockwise8.encoded_nearest(pstate[k].to(device), k)
                    out[pid].update({k: codes, _blockwise8.scale_key(k): scales})
            else:
                if stored_as_blockwise8(pstate):
                    pstate = {k: _blockwise8.dequantise(pstate[k].to(device), pstate[_blockwise8.scale_key(k)].to(device),
                                                        k) for k in keys}
                out[pid] = {k: convert_accumulator(pstate[k], dtype, device, where, entry.label, k) for k in keys}
    return out


@dataclass
class Migration:
    """What a load changes beyond ``torch.optim.Optimizer.load_state_dict``
    (see the module doc): taken with :meth:`before` the load, applied with
    :meth:`after` it."""

    kept: list[dict[str, Any]]
    machine: list[dict[str, Any]]
    saved: Mapping[Any, Mapping[str, Any]]
    id_to_param: dict[Any, torch.Tensor]
    converted: Mapping[Any, Mapping[str, torch.Tensor]]
    bfloat16: dict[Any, bool]
    """Per saved parameter id, whether its state is rounded stochastically (bfloat16 or 8-bit), so that it keeps
    its rounding step counter."""

    @classmethod
    def before(cls, param_groups: Sequence[Mapping[str, Any]], state_dict: Mapping[str, Any],
               converted: Mapping[Any, Mapping[str, torch.Tensor]]) -> "Migration":
        """What to restore, read from the optimizer's groups and the (checked) ``state_dict``, with the
        accumulators already converted (:func:`converted_accumulators`)."""
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        params = chain.from_iterable(g["params"] for g in param_groups)
        bfloat16 = {pid: _blockwise8.state_format(g["state_dtype"]) != torch.float32
                    for g, sg in zip(param_groups, state_dict["param_groups"]) for pid in sg["params"]}
        return cls(kept=[{k: g[k] for k in DEFAULTED_KEYS} for g in param_groups],
                   machine=[{k: g[k] for k in KEPT_KEYS} for g in param_groups],
                   saved=state_dict["state"], id_to_param=dict(zip(saved_ids, params)), converted=converted,
                   bfloat16=bfloat16)

    def after(self, param_groups: Sequence[dict[str, Any]], state: Mapping[torch.Tensor, dict[str, Any]]) -> None:
        """Restore the kept settings, the counters' dtype and the converted accumulators."""
        for group, settings, here in zip(param_groups, self.kept, self.machine):
            for key, value in settings.items():
                group.setdefault(key, value)
            group.update(here)
        for pid, pstate in self.saved.items():
            p = self.id_to_param.get(pid)
            if p is None:
                continue
            if COUNTER_KEY in pstate:  # cast to the parameter's dtype by PyTorch's loader
                state[p][COUNTER_KEY] = pstate[COUNTER_KEY].to(device=p.device, dtype=torch.int32, copy=True)
            if ROUNDING_STEP_KEY in pstate and self.bfloat16.get(pid):
                state[p][ROUNDING_STEP_KEY] = pstate[ROUNDING_STEP_KEY].to(device=p.device, dtype=torch.int64,
                                                                           copy=True)
            else:
                state[p].pop(ROUNDING_STEP_KEY, None)
            converted = self.converted.get(pid, {})
            for key in ACCUMULATOR_KEYS:  # the scales of 8-bit state loaded into floating-point state
                if _blockwise8.scale_key(key) not in converted:
                    state[p].pop(_blockwise8.scale_key(key), None)
            state[p].update(converted)


def lay_out_state(state: dict[str, Any], p: torch.Tensor, sharding: Optional[_sharded.Sharding],
                  adam: bool) -> None:
    """Lay a loaded state out like its parameter, in place.

    For a DTensor ``p`` a whole tensor becomes this rank's block and a
    DTensor with other placements is redistributed (a collective: every rank
    loads together); for a plain ``p`` a DTensor state is gathered whole.

    Args:
        state: The parameter's state.
        p: The parameter.
        sharding: How ``p`` is sharded (``None`` for a plain tensor).
        adam: Whether ``p`` is on the AdamW branch (its moments are laid out like ``p``).
    """
    for key, t in list(state.items()):
        if key in ("step", *COUNTER_KEYS) or not isinstance(t, torch.Tensor):
            continue
        if not isinstance(p, DTensor):
            if isinstance(t, DTensor):
                state[key] = t.full_tensor()
            continue
        want = tuple(p.placements) if adam else sharding.state_placements(key)
        if isinstance(t, DTensor):
            if tuple(t.placements) != want or t.device_mesh != p.device_mesh:
                state[key] = t.redistribute(p.device_mesh, want)
            continue
        block = sharding.local_block("v" if adam else key, t).contiguous()  # "v": the parameter's own axis
        state[key] = DTensor.from_local(block, p.device_mesh, want, run_check=False, shape=t.shape,
                                        stride=_sharded.contiguous_strides(t.shape))
