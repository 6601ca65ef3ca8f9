"""Celo2 and Celo2-base as ``torch.optim.Optimizer`` subclasses.

The classes validate their options, keep the state and route each tensor to
a branch (the learned rule or AdamW); the rule's arithmetic is
:func:`celo2.torch.functional.celo2`, which hands each tensor to a backend
(Triton, the Numba kernels, the chunked PyTorch path or the reference
formula) and batches Newton-Schulz across tensors.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim.adam import adam as _adam_functional

from celo2.rule import routing, spec
from celo2.rule.theta import Theta, load_theta
from celo2.torch import _sharded
from celo2.torch import functional as F
from celo2.torch.backends.torch import Workspace
from celo2.torch._sharded import DTensor
from celo2.torch._state import TorchTheta, init_tensor_state, state_shapes
from celo2.torch.ns import resolve_ns_dtype

_BRANCHES = ("auto", routing.LEARNED, routing.ADAM)
_STATE_KEYS_FP32 = ("m", "v", "fac_r", "fac_c", "exp_avg", "exp_avg_sq")
_LEARNED_KEYS = ("m", "v", "fac_r", "fac_c")
_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")
_COUNTER = "nonfinite_steps"
_ALGORITHM_KEYS = ("branch", "orthogonalize", "nonfinite")
"""Param-group settings that select the algorithm: a saved state must agree on them."""
_MACHINE_KEYS = ("backend", "ns_dtype")
"""Param-group settings that depend on the machine: kept from this optimizer when a state loads."""


def _adam_shapes(p: torch.Tensor) -> dict[str, tuple[int, ...]]:
    return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape), "step": ()}


class _LearnedOptimizer(torch.optim.Optimizer):
    """Shared machinery: routing, theta per device, the two branches."""

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        weight_decay: float,
        theta: Theta | str | None,
        orthogonalize: bool,
        branch: str,
        adam_lr_mult: float,
        adam_betas: tuple[float, float],
        adam_eps: float,
        adam_name_pattern: str | None,
        foreach: bool | None,
        nonfinite: str,
        backend: str,
        ns_dtype: str | torch.dtype,
    ) -> None:
        F.check_backend(backend)
        resolve_ns_dtype(ns_dtype, "cpu")  # validates the name
        if not 0.0 <= float(lr):
            raise ValueError(f"invalid learning rate lr={lr}: must be >= 0")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay={weight_decay}: must be >= 0")
        if not 0.0 <= adam_lr_mult:
            raise ValueError(f"invalid adam_lr_mult={adam_lr_mult}: must be >= 0")
        if not all(0.0 <= b < 1.0 for b in adam_betas) or len(adam_betas) != 2:
            raise ValueError(f"invalid adam_betas={adam_betas}: two values in [0, 1)")
        if not 0.0 <= adam_eps:
            raise ValueError(f"invalid adam_eps={adam_eps}: must be >= 0")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            orthogonalize=orthogonalize,
            branch=branch,
            adam_lr_mult=adam_lr_mult,
            adam_betas=tuple(adam_betas),
            adam_eps=adam_eps,
            foreach=foreach,
            nonfinite=spec.check_nonfinite_policy(nonfinite),
            backend=backend,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["branch"] not in _BRANCHES:
                raise ValueError(
                    f"param group option branch={group['branch']!r}: expected one of {_BRANCHES}"
                )
            spec.check_nonfinite_policy(group["nonfinite"])
            F.check_backend(group["backend"])
            resolve_ns_dtype(group["ns_dtype"], "cpu")
            for p in group["params"]:
                if torch.is_complex(p):
                    name = self._name_of(group, p)
                    raise ValueError(f"{type(self).__name__} does not support complex parameters ({name})")
        self.theta = load_theta(theta)
        self.adam_name_pattern = adam_name_pattern
        self._shardings: dict[torch.Tensor, _sharded.Sharding] = {}
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if isinstance(p, DTensor):
                    self._sharding(gi, group, i, p)
        self._theta_by_device: dict[torch.device, TorchTheta] = {}
        # Chunk scratch of the fast path, one per device, reused across tensors
        # and steps (a few MB; not part of state_dict).
        self._workspace_by_device: dict[torch.device, Workspace] = {}

    # -- routing -------------------------------------------------------------------
    @staticmethod
    def _name_of(group: dict[str, Any], p: torch.Tensor) -> str | None:
        names = group.get("param_names")
        if not names:
            return None
        for q, name in zip(group["params"], names):
            if q is p:
                return name
        return None

    @staticmethod
    def _label(group_index: int, group: dict[str, Any], index: int) -> str:
        """The parameter's name when ``named_parameters()`` was given, else ``group<g>.param<i>``."""
        names = group.get("param_names")
        return names[index] if names else f"group{group_index}.param{index}"

    def _branch(self, group: dict[str, Any], index: int, p: torch.Tensor) -> str:
        if group["branch"] != "auto":
            return group["branch"]
        names = group.get("param_names")
        name = names[index] if names else None
        return routing.route(name, tuple(p.shape), self.adam_name_pattern)

    def _sharding(self, gi: int, group: dict[str, Any], i: int, p: DTensor) -> _sharded.Sharding:
        """How DTensor ``p`` is sharded (checked once: see :func:`celo2.torch._sharded.describe`)."""
        sh = self._shardings.get(p)
        if sh is None:
            label = self._label(gi, group, i)
            sh = _sharded.describe(p, label)
            if self._branch(group, i, p) != routing.ADAM:
                _sharded.check_learned(sh, label, p, group["orthogonalize"])
            self._shardings[p] = sh
        return sh

    def routing(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(branch, name, shape)`` for every parameter, in param-group order."""
        rows = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [f"group{gi}.param{i}" for i in range(len(group["params"]))]
            for i, p in enumerate(group["params"]):
                rows.append((self._branch(group, i, p), names[i], tuple(p.shape)))
        return rows

    def routing_table(self) -> str:
        """The routing as a printable table (which tensors get the rule, which AdamW)."""
        return routing.format_routing_table(self.routing())

    def _torch_theta(self, device: torch.device) -> TorchTheta:
        if device not in self._theta_by_device:
            self._theta_by_device[device] = TorchTheta.from_theta(self.theta, device)
        return self._theta_by_device[device]

    def nonfinite_steps(self) -> dict[str, int]:
        """Steps skipped for a non-finite gradient, per parameter (``nonfinite="skip"``).

        Reads every counter ``state[p]["nonfinite_steps"]`` to the host, so it
        synchronises with accelerators: call it for logging, not every step.

        Returns:
            Parameter name (``group<g>.param<i>`` without names) -> count (0 for
            parameters not stepped yet, and always 0 under ``"propagate"``).
        """
        counts = {}
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                counter = self.state[p].get(_COUNTER) if p in self.state else None
                counts[self._label(gi, group, i)] = 0 if counter is None else int(counter)
        return counts

    # -- state_dict: checked whole before anything loads; accumulators float32 -----------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of the same optimizer class and model.

        Every saved tensor is checked against its parameter first (keys and
        shapes for its branch, floating dtype), and the param-group settings
        that select the algorithm (``branch``, ``orthogonalize``,
        ``nonfinite``) must agree with this optimizer's; on any mismatch
        nothing is loaded. Accumulators are kept float32 whatever the
        parameter dtype. A state saved before ``nonfinite`` existed keeps this
        optimizer's setting. For DTensor parameters each state is laid out like
        its parameter: a whole (single-process) tensor becomes this rank's
        block, and a DTensor with other placements is redistributed (a
        collective: every rank loads together).

        Args:
            state_dict: As returned by :meth:`state_dict`.

        Raises:
            ValueError: Naming the param group or parameter (its name when
                ``named_parameters()`` was given, else ``group<g>.param<i>``)
                and what differs; the optimizer is left exactly as it was.
        """
        self._check_state_dict(state_dict)
        kept = [{k: g[k] for k in _ALGORITHM_KEYS} for g in self.param_groups]
        machine = [{k: g[k] for k in _MACHINE_KEYS} for g in self.param_groups]
        saved = state_dict["state"]
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(saved_ids, params))
        super().load_state_dict(state_dict)
        for group, settings, here in zip(self.param_groups, kept, machine):
            for key, value in settings.items():
                group.setdefault(key, value)
            group.update(here)
        for pid, pstate in saved.items():
            p = id_to_param.get(pid)
            if p is not None and _COUNTER in pstate:  # cast to the parameter's dtype by PyTorch's loader
                self.state[p][_COUNTER] = pstate[_COUNTER].to(device=p.device, dtype=torch.int32, copy=True)
            if p is None or p.dtype == torch.float32:
                continue
            for key in _STATE_KEYS_FP32:
                if key in pstate and isinstance(pstate[key], torch.Tensor):
                    self.state[p][key] = pstate[key].to(device=p.device, dtype=torch.float32, copy=True)
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p in self.state:
                    self._lay_out_state(gi, group, i, p)

    def _lay_out_state(self, gi: int, group: dict[str, Any], i: int, p: torch.Tensor) -> None:
        """Lay a loaded state out like its parameter: a whole tensor becomes this rank's block of a DTensor,
        a DTensor with other placements is redistributed (a collective: every rank loads together), and a
        DTensor state of a plain parameter is gathered whole."""
        state = self.state[p]
        for key, t in list(state.items()):
            if key in ("step", _COUNTER) or not isinstance(t, torch.Tensor):
                continue
            if not isinstance(p, DTensor):
                if isinstance(t, DTensor):
                    state[key] = t.full_tensor()
                continue
            sh = self._sharding(gi, group, i, p)
            adam = self._branch(group, i, p) == routing.ADAM
            want = tuple(p.placements) if adam else sh.state_placements(key)
            if isinstance(t, DTensor):
                if tuple(t.placements) != want or t.device_mesh != p.device_mesh:
                    state[key] = t.redistribute(p.device_mesh, want)
                continue
            block = sh.local_block("v" if adam else key, t).contiguous()  # "v": the parameter's own axis
            state[key] = DTensor.from_local(block, p.device_mesh, want, run_check=False, shape=t.shape,
                                            stride=_sharded.contiguous_strides(t.shape))

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a state_dict that does not fit this optimizer (see :meth:`load_state_dict`)."""
        me = type(self).__name__
        where = f"{me}.load_state_dict"
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups' (an optimizer state_dict)")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{where}: the saved state has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}; nothing was loaded")
        for gi, (group, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(sg["params"]) != len(group["params"]):
                raise ValueError(f"{where}: param group {gi} of the saved state has {len(sg['params'])} parameters, "
                                 f"this optimizer's {len(group['params'])}; nothing was loaded")
            missing = [k for k in ("branch", "orthogonalize") if k not in sg]
            if missing:
                raise ValueError(f"{where}: param group {gi} of the saved state has no {missing} setting: it is not a "
                                 f"Celo2/Celo2Base state (another optimizer's, AdamW's say); nothing was loaded")
            for key in _ALGORITHM_KEYS:
                if key in sg and sg[key] != group[key]:
                    raise ValueError(
                        f"{where}: param group {gi} was saved with {key}={sg[key]!r}, this {me} has {key}="
                        f"{group[key]!r} (a {self._variant(sg)} state into a {me}?); that setting selects the "
                        f"algorithm, so nothing was loaded")
            for i, (p, pid) in enumerate(zip(group["params"], sg["params"])):
                pstate = saved_state.get(pid)
                if pstate:
                    self._check_tensor_state(where, self._label(gi, group, i), self._branch(group, i, p), p, pstate)

    @staticmethod
    def _variant(group: dict[str, Any]) -> str:
        if group.get("branch") == routing.LEARNED and not group.get("orthogonalize"):
            return "Celo2Base"
        return "Celo2" if group.get("branch") in _BRANCHES else "foreign"

    @staticmethod
    def _check_tensor_state(where: str, label: str, branch: str, p: torch.Tensor, pstate: dict[str, Any],
                            error: type[Exception] = ValueError) -> None:
        """Refuse (raise ``error``) a tensor's saved or current state whose keys,
        shapes or dtypes do not fit ``p``."""
        expected = state_shapes(p.shape) if branch == routing.LEARNED else _adam_shapes(p)
        keys = set(pstate) - {_COUNTER}
        if keys != set(expected):
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
        counter = pstate.get(_COUNTER)
        if counter is not None and (not isinstance(counter, torch.Tensor) or counter.ndim != 0
                                    or counter.is_floating_point() or counter.is_complex()):
            raise error(f"{where}: state {_COUNTER!r} of {label} must be a 0-d integer tensor; nothing was changed")

    # -- the step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step.

        Args:
            closure: Re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: Before any tensor is written, naming the parameter, if
                a gradient is sparse or has another shape than its parameter,
                or a parameter's state does not fit it (resized since its
                state was made, or an unchecked state put in place).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan()
        for group, entries in plan:
            learned = [p for p, branch in entries if branch != routing.ADAM]
            adam_params = [p for p, branch in entries if branch == routing.ADAM]
            if learned:
                self._learned_step(group, learned)
            if adam_params:
                self._adam_step(group, adam_params)
        return loss

    def _plan(self) -> list[tuple[dict[str, Any], list[tuple[torch.Tensor, str]]]]:
        """``(group, [(param, branch)])`` of the tensors to step, every one
        checked first (see :meth:`step`), so that a bad one stops the step
        before anything is written."""
        me = type(self).__name__
        plan = []
        for gi, group in enumerate(self.param_groups):
            entries = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{me} does not support sparse gradients "
                        f"({self._name_of(group, p) or f'parameter {i}'}); use a dense embedding"
                    )
                label = self._label(gi, group, i)
                if p.grad.shape != p.shape:
                    raise RuntimeError(f"{me}.step: the gradient of {label} has shape {tuple(p.grad.shape)}, the "
                                       f"parameter {tuple(p.shape)}; nothing was changed")
                branch = self._branch(group, i, p)
                state = self.state.get(p)
                if isinstance(p, DTensor) or isinstance(p.grad, DTensor):
                    self._check_dtensor(me, gi, group, i, p, branch, state)
                if state:
                    self._check_tensor_state(f"{me}.step", label, branch, p, state, RuntimeError)
                entries.append((p, branch))
            plan.append((group, entries))
        return plan

    def _check_dtensor(self, me: str, gi: int, group: dict[str, Any], i: int, p: torch.Tensor, branch: str,
                       state: Optional[dict[str, Any]]) -> None:
        """A DTensor parameter's gradient and state must be laid out like it (see :meth:`step`)."""
        label = self._label(gi, group, i)
        if not isinstance(p, DTensor):
            raise RuntimeError(f"{me}.step: the gradient of {label} is a DTensor "
                               f"({tuple(p.grad.placements)}) but the parameter is a plain tensor; nothing was changed")
        try:
            sh = self._sharding(gi, group, i, p)
        except ValueError as e:
            raise RuntimeError(f"{me}.step: {e}; nothing was changed") from None
        g = p.grad
        if not isinstance(g, DTensor) or tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
            where = f"placements {tuple(g.placements)}" if isinstance(g, DTensor) else "a plain tensor"
            raise RuntimeError(f"{me}.step: the gradient of {label} is {where}, the parameter a DTensor with "
                               f"{tuple(p.placements)}: they must be laid out alike (redistribute the gradient); "
                               f"nothing was changed")
        for key, t in (state or {}).items():
            if key in ("step", _COUNTER):
                continue
            want = sh.state_placements(key) if branch != routing.ADAM else tuple(p.placements)
            if not isinstance(t, DTensor) or tuple(t.placements) != want:
                have = f"placements {tuple(t.placements)}" if isinstance(t, DTensor) else "a plain tensor"
                raise RuntimeError(f"{me}.step: state {key!r} of {label} is {have}, expected a DTensor with {want} "
                                   f"like its parameter (load states with load_state_dict or torch.distributed."
                                   f"checkpoint.state_dict.set_optimizer_state_dict); nothing was changed")

    @staticmethod
    def _counter(state: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
        if _COUNTER not in state:
            state[_COUNTER] = torch.zeros((), dtype=torch.int32, device=p.device)
        return state[_COUNTER]

    def _learned_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The learned rule on the group's tensors (:func:`celo2.torch.functional.celo2`)."""
        states, sharded = [], []
        for p in params:
            state = self.state[p]
            if not state:
                sh = self._shardings.get(p) if isinstance(p, DTensor) else None
                state.update(init_tensor_state(p) if sh is None else _sharded.init_state(p, sh))
            self._counter(state, p)
            states.append(state)
        workspace = None
        if params and not torch.compiler.is_compiling():  # traced: the compiler plans the scratch
            workspace = self._workspace_by_device.setdefault(params[0].device, Workspace())
        # Plain tensors, and replicated DTensors as their local copies; sharded DTensors apart.
        plain = [j for j, p in enumerate(params) if not isinstance(p, DTensor) or self._shardings[p].axis is None]
        sharded = [j for j, p in enumerate(params) if j not in set(plain)]
        kw = dict(theta=self._torch_theta, lr=group["lr"], weight_decay=group["weight_decay"],
                  orthogonalize=group["orthogonalize"], ns_dtype=group["ns_dtype"])
        if plain:
            F.celo2([_sharded.local(params[j]) for j in plain], [_sharded.local(params[j].grad) for j in plain],
                    [{k: _sharded.local(v) for k, v in states[j].items()} for j in plain], backend=group["backend"],
                    nonfinite=group["nonfinite"], counters=[states[j][_COUNTER] for j in plain],
                    workspace=workspace, **kw)
        if sharded:
            _sharded.celo2([params[j] for j in sharded], [params[j].grad for j in sharded],
                           [states[j] for j in sharded], [self._shardings[params[j]] for j in sharded],
                           skip=group["nonfinite"] == "skip", counters=[states[j][_COUNTER] for j in sharded],
                           workspace=workspace, **kw)

    def _adam_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """AdamW at ``adam_lr_mult * lr``, exactly ``torch.optim.AdamW``'s arithmetic,
        under the group's non-finite policy."""
        host, gated, gates = [], [], []
        flags = self._sharded_finite_flags(params) if group["nonfinite"] == "skip" else {}
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            counter = self._counter(state, p)
            if group["nonfinite"] != "skip":
                host.append(p)
            elif isinstance(p, DTensor):
                # The flag reduced over the shards, so every rank skips alike.
                if p.device.type != "cpu" and state["step"].device != p.device:
                    state["step"] = state["step"].to(p.device)
                gated.append(p)
                gates.append(F.Gate(_sharded.local(p), [_sharded.local(state[k]) for k in _ADAM_KEYS], counter,
                                    ok=flags[p]))
            elif F.checked_on_host(group["backend"], p):
                if F.grad_finite(p.grad):
                    host.append(p)
                else:
                    counter.add_(1)
            else:
                if p.device.type != "cpu" and state["step"].device != p.device:
                    # Gated on the device: the step count lives there too (AdamW's
                    # capturable arithmetic), so no write needs the flag on the host.
                    state["step"] = state["step"].to(p.device)
                gated.append(p)
                gates.append(F.Gate(p, [state[k] for k in _ADAM_KEYS], counter))
        self._adam_run(group, host, capturable=False)
        self._adam_run(group, [p for p in gated if p.device.type == "cpu"], capturable=False)
        self._adam_run(group, [p for p in gated if p.device.type != "cpu"], capturable=True)
        for gate in gates:
            gate.close()

    def _sharded_finite_flags(self, params: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """The non-finite flag of every DTensor of ``params``, reduced over its shards (one collective per
        shard group), so that every rank skips alike."""
        by_group: dict[Any, list[torch.Tensor]] = {}
        for p in params:
            if isinstance(p, DTensor):
                by_group.setdefault(self._shardings[p].group, []).append(p)
        flags = {}
        for members in by_group.values():
            oks = _sharded.finite_flags([p.grad for p in members], self._shardings[members[0]])
            flags.update(zip(members, oks))
        return flags

    def _adam_run(self, group: dict[str, Any], params: list[torch.Tensor], capturable: bool) -> None:
        if not params:
            return
        beta1, beta2 = group["adam_betas"]
        lr = group["lr"] * group["adam_lr_mult"]
        kw = dict(decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
                  eps=group["adam_eps"], maximize=False, capturable=capturable)
        loc = _sharded.local  # DTensors step on their local blocks: the branch is elementwise
        fp32 = [p for p in params if p.dtype == torch.float32]
        if fp32:
            _adam_functional(
                [loc(p) for p in fp32],
                [loc(p.grad) for p in fp32],
                [loc(self.state[p]["exp_avg"]) for p in fp32],
                [loc(self.state[p]["exp_avg_sq"]) for p in fp32],
                [],
                [self.state[p]["step"] for p in fp32],
                foreach=group["foreach"],
                weight_decay=group["weight_decay"],
                **kw,
            )
        for p in params:
            if p.dtype == torch.float32:
                continue
            state = {k: loc(v) for k, v in self.state[p].items()}
            grad, p = loc(p.grad), loc(p)
            if p.dtype == torch.float64:
                # The float32 update, taken on a zero parameter, then applied in
                # float64: the parameter is never rounded through float32.
                p32, wd = torch.zeros_like(p, dtype=torch.float32), 0.0
            else:
                # Half-precision parameters: the same arithmetic on a float32 copy,
                # so the moments never lose precision.
                p32, wd = p.to(torch.float32), group["weight_decay"]
            _adam_functional(
                [p32],
                [grad.to(torch.float32)],
                [state["exp_avg"]],
                [state["exp_avg_sq"]],
                [],
                [state["step"]],
                foreach=False,
                weight_decay=wd,
                **kw,
            )
            if p.dtype == torch.float64:
                if group["weight_decay"]:
                    p.mul_(1.0 - lr * group["weight_decay"])
                p.add_(p32)
            else:
                p.copy_(p32)


_POLICY_DOC = """
    Non-finite gradients (``nonfinite``, see :data:`celo2.rule.spec.NONFINITE_POLICIES`):
    under ``"skip"`` (default) a tensor whose gradient holds any NaN or +-inf
    keeps its parameter and all of its state bitwise unchanged for that step
    (no weight decay either; both branches), every other tensor steps as it
    would without the check, and ``state[p]["nonfinite_steps"]`` (a 0-d int32
    tensor on the parameter's device) counts the skipped steps;
    :meth:`nonfinite_steps` reads them all by name. On the CPU (with the CPU
    kernels on) the check is read on the host and a skipped tensor is not
    touched; elsewhere (accelerators, ``backend="torch"``) it is a
    device-side flag that gates the writes with ``torch.where`` (no
    synchronisation; the tensor and its state are copied for the step, and
    on accelerators the AdamW branch keeps its step count on the device). ``"propagate"`` runs no check: a NaN flows through as in AdamW
    and, through the rule's normalisations, reaches the whole tensor and its
    accumulators.

    Zero gradients: the rule's output is normalised to unit RMS, so with
    exactly zero gradients a parameter still moves by about ``lr`` per step
    (published theta included); freeze a tensor by leaving it out of the
    optimizer (or ``grad=None``), not by zeroing its gradient.

    Distributed: DTensor parameters (FSDP2's ``fully_shard``, ``Shard(dim)``
    on one mesh dimension with ``Replicate()`` on the others, uneven shards
    included) are stepped where they lie, with the update one process would
    compute; their state is DTensors laid out like them, so
    ``torch.distributed.checkpoint`` reshards it (see
    :mod:`celo2.torch._sharded` and the "Distributed training" guide). Other
    layouts raise a ``ValueError`` naming the parameter and its placements.

    Dtypes: accumulators are float32 whatever the parameter dtype; a float64
    parameter is updated in float64 (``lr=0`` leaves it exactly unchanged);
    bfloat16 / float16 parameters combine the update in float32 and round once.
"""


class Celo2(_LearnedOptimizer):
    """Celo2: the learned rule with Newton-Schulz orthogonalisation for hidden
    matrices, AdamW for everything else.

    Routing: tensors with two or more dimensions (conv kernels included) get
    the learned rule; 0-D and 1-D tensors get AdamW at ``adam_lr_mult * lr``;
    when names are known (``model.named_parameters()``), names matching
    ``adam_name_pattern`` (embeddings and output heads, see
    :data:`celo2.rule.routing.ADAM_NAME_PATTERN`) get AdamW too. A param group
    may force its branch with ``branch="celo2"`` or ``branch="adam"``.
    :meth:`routing_table` prints the result.

    Both branches use decoupled weight decay: ``p <- p - lr * (step + wd * p)``
    (with ``adam_lr_mult * lr`` on the AdamW branch).

    Args:
        params: Parameters, or ``named_parameters()`` (names enable name
            routing and name the tensors in errors and :meth:`nonfinite_steps`),
            or param-group dicts.
        lr: Learning rate of the rule (default 1e-3); AdamW gets ``adam_lr_mult * lr``.
        weight_decay: Decoupled weight decay (default 0).
        adam_lr_mult: Learning-rate multiplier of the AdamW branch (default 20).
        adam_betas: AdamW's betas (default (0.9, 0.95)).
        adam_eps: AdamW's epsilon (default 1e-8).
        theta: The rule's weights: a :class:`~celo2.rule.theta.Theta`, a path,
            or ``None`` for the shipped theta.
        orthogonalize: Newton-Schulz on the rule's matrix directions (default ``True``).
        adam_name_pattern: Regex of names routed to AdamW (default
            :data:`celo2.rule.routing.ADAM_NAME_PATTERN`; ``None``: shapes only).
        foreach: Passed to AdamW's functional step (default ``None``: PyTorch's choice).
        nonfinite: ``"skip"`` (default) or ``"propagate"``, see below.
        backend: Which implementation steps the rule's tensors: ``"auto"``
            (default: Triton on CUDA, the Numba kernels on the CPU, the chunked
            PyTorch path otherwise), ``"triton"``, ``"numba"``, ``"torch"`` or
            ``"reference"`` (see :mod:`celo2.torch.functional`).
        ns_dtype: The dtype of Newton-Schulz's matrix products: ``"auto"``
            (default: bfloat16 where the hardware multiplies it natively, CUDA
            and CPUs with AMX or AVX512-BF16; float32 elsewhere),
            ``torch.float32`` or ``torch.bfloat16``. The matrices sharing a
            shape are orthogonalised together, one batched chain per group.

    Raises:
        ValueError: For a negative ``lr``, ``weight_decay``, ``adam_lr_mult`` or
            ``adam_eps``, betas outside [0, 1), an unknown ``branch``,
            ``nonfinite``, ``backend`` or ``ns_dtype``, a backend this
            installation lacks (Triton, Numba), complex parameters, or a DTensor
            parameter laid out in a way the rule cannot step (named, with its placements).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        adam_lr_mult: float = spec.ADAM_LR_MULT,
        adam_betas: tuple[float, float] = spec.ADAM_BETAS,
        adam_eps: float = spec.ADAM_EPS,
        theta: Theta | str | None = None,
        *,
        orthogonalize: bool = True,
        adam_name_pattern: str | None = routing.ADAM_NAME_PATTERN,
        foreach: bool | None = None,
        nonfinite: str = spec.NONFINITE_DEFAULT,
        backend: str = "auto",
        ns_dtype: str | torch.dtype = "auto",
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            weight_decay=weight_decay,
            theta=theta,
            orthogonalize=orthogonalize,
            branch="auto",
            adam_lr_mult=adam_lr_mult,
            adam_betas=adam_betas,
            adam_eps=adam_eps,
            adam_name_pattern=adam_name_pattern,
            foreach=foreach,
            nonfinite=nonfinite,
            backend=backend,
            ns_dtype=ns_dtype,
        )


class Celo2Base(_LearnedOptimizer):
    """Celo2-base: the learned rule, without orthogonalisation, on every tensor.

    Args:
        params: Parameters, ``named_parameters()`` or param-group dicts.
        lr: Learning rate (default 1e-3).
        weight_decay: Decoupled weight decay ``p <- p - lr * (step + wd * p)`` (default 0).
        theta: The rule's weights: a :class:`~celo2.rule.theta.Theta`, a path,
            or ``None`` for the shipped theta.
        foreach: Unused by the rule (kept for the shared machinery; default ``None``).
        nonfinite: ``"skip"`` (default) or ``"propagate"``, see below.
        backend: As :class:`Celo2`'s (default ``"auto"``).

    Raises:
        ValueError: For a negative ``lr`` or ``weight_decay``, an unknown
            ``nonfinite`` or ``backend``, a backend this installation lacks, or
            complex parameters, or a DTensor parameter laid out in a way the rule
            cannot step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        theta: Theta | str | None = None,
        *,
        foreach: bool | None = None,
        nonfinite: str = spec.NONFINITE_DEFAULT,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            weight_decay=weight_decay,
            theta=theta,
            orthogonalize=False,
            branch=routing.LEARNED,
            adam_lr_mult=spec.ADAM_LR_MULT,
            adam_betas=spec.ADAM_BETAS,
            adam_eps=spec.ADAM_EPS,
            adam_name_pattern=None,
            foreach=foreach,
            nonfinite=nonfinite,
            backend=backend,
            ns_dtype="auto",
        )


for _cls in (Celo2, Celo2Base):
    _cls.__doc__ += _POLICY_DOC
