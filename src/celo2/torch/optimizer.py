"""Celo2 and Celo2-base as ``torch.optim.Optimizer`` subclasses.

The classes validate their options, keep the state and route each tensor to
a branch: the learned rule, whose arithmetic is
:func:`celo2.torch.functional.celo2` (it hands each tensor to a backend and
batches Newton-Schulz across tensors), or AdamW (:mod:`celo2.torch._adamw`).
Checkpoints are checked and migrated by :mod:`celo2.torch._checkpoint`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch

from celo2.rule import routing, spec
from celo2.rule.theta import Theta
from celo2.rule.variant import VariantNotSupportedError, note_general_path
from celo2.theta_files import load_theta
from celo2.torch import _adamw, _blockwise8, _checkpoint, _rounding, _sharded
from celo2.torch import functional as F
from celo2.torch._checkpoint import COUNTER_KEY, ROUNDING_STEP_KEY, TensorEntry
from celo2.torch.backends.base import StateRounding
from celo2.torch.backends.torch import Workspace
from celo2.torch._sharded import DTensor
from celo2.torch._state import TorchTheta, init_tensor_state
from celo2.torch.ns import resolve_ns_dtype

BRANCHES: tuple[str, ...] = ("auto", routing.LEARNED, routing.ADAM)
"""Values of a param group's ``branch``: the routing, or one branch for the whole group."""

FOREIGN_GROUP_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "maximize": ((False,), "Celo2 minimises; negate the loss to maximise it"),
    "amsgrad": ((False,), "the AdamW branch has no AMSGrad variant"),
    "betas": ((), "the AdamW branch's betas are adam_betas"),
    "eps": ((), "the AdamW branch's epsilon is adam_eps"),
    "decoupled_weight_decay": ((True,), "weight decay is always decoupled"),
    "differentiable": ((False,), "the step is not differentiable"),
    "momentum": ((0, 0.0), "the rule keeps its own momenta (theta decides them)"),
    "dampening": ((0, 0.0), "the rule keeps its own momenta (theta decides them)"),
    "nesterov": ((False,), "the rule keeps its own momenta (theta decides them)"),
    "momentum_decay": ((), "that is NAdam's option"),
    "lr_decay": ((0, 0.0), "that is Adagrad's option; drive lr with a torch.optim.lr_scheduler"),
    "initial_accumulator_value": ((), "that is Adagrad's option"),
    "rho": ((), "that is Adadelta's option"),
    "alpha": ((), "that is RMSprop's option"),
    "centered": ((False,), "that is RMSprop's option"),
    "lambd": ((), "that is ASGD's option"),
    "t0": ((), "that is ASGD's option"),
    "etas": ((), "that is Rprop's option"),
    "step_sizes": ((), "that is Rprop's option"),
    "ns_coefficients": ((), "Newton-Schulz's coefficients are fixed; ns_dtype sets its precision"),
    "ns_steps": ((), "Newton-Schulz's steps are fixed; ns_dtype sets its precision"),
    "adjust_lr_fn": ((), "that is Muon's option"),
}
"""Param-group keys of other ``torch.optim`` optimizers that would change the
algorithm if this one read them: refused (with what to do instead) unless
they hold the value that changes nothing (``maximize=False`` and the like).
Other keys are kept as metadata, as ``torch.optim`` does (``initial_lr`` of
the learning-rate schedulers, a group's name)."""


class _LearnedOptimizer(torch.optim.Optimizer):
    """Shared machinery: validation, routing, theta per device, the step over both branches."""

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
        state_dtype: str | torch.dtype,
        rounding_seed: int,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            orthogonalize=orthogonalize,
            branch=branch,
            adam_lr_mult=adam_lr_mult,
            adam_betas=adam_betas,
            adam_eps=adam_eps,
            foreach=foreach,
            nonfinite=nonfinite,
            backend=backend,
            ns_dtype=ns_dtype,
            state_dtype=state_dtype,
            rounding_seed=rounding_seed,
        )
        self._check_settings(defaults, "")
        defaults["adam_betas"] = tuple(adam_betas)
        self._normalise(defaults)
        self.adam_name_pattern = adam_name_pattern
        self._shardings: dict[torch.Tensor, _sharded.Sharding] = {}
        super().__init__(params, defaults)  # every group through add_param_group, so checked alike
        self.theta = load_theta(theta)
        self._check_variant(self.param_groups)
        self._theta_by_device: dict[torch.device, TorchTheta] = {}
        # Chunk scratch of the fast path, one per device, reused across tensors
        # and steps (a few MB; not part of state_dict).
        self._workspace_by_device: dict[torch.device, Workspace] = {}

    # -- validation: the constructor, add_param_group and load_state_dict check alike --------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, checked as the constructor checks its groups.

        Args:
            param_group: ``{"params": ..., <setting>: ...}``; missing settings
                take the optimizer's defaults.

        Raises:
            ValueError: A setting the constructor would refuse (see the class
                doc), a key of another optimizer that changes the algorithm
                (:data:`FOREIGN_GROUP_KEYS`), a complex or non-floating
                parameter, or a DTensor laid out in a way the rule cannot step;
                the optimizer is left without the group.
            TypeError: From ``torch.optim.Optimizer.add_param_group`` (a
                parameter that is not a tensor, a set of parameters).
        """
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        try:
            self._check_settings(group, f"param group {gi}: ")
            if "theta" in self.__dict__:  # the constructor checks its groups once theta is loaded
                self._check_variant([group], gi)
            shardings = self._check_params(gi, group)
        except Exception:
            self.param_groups.pop()
            raise
        self._normalise(group)
        self._shardings.update(shardings)

    def _check_variant(self, groups: list[dict[str, Any]], first: int = 0) -> None:
        """A rule variant's theta runs on the chunked and reference backends only: refuse a group that asks
        for a fast backend (naming the variant and the backend), and say once (a
        :class:`~celo2.rule.variant.VariantPathWarning`) that ``"auto"`` takes the chunked path."""
        variant = self.theta.variant
        if variant.is_published:
            return
        for gi, group in enumerate(groups, first):
            try:
                F.check_backend(group["backend"], variant=variant)
            except VariantNotSupportedError as exc:
                raise VariantNotSupportedError(f"param group {gi}: {exc}") from None
        if any(group["backend"] == "auto" for group in groups):
            note_general_path(variant, f"celo2.torch.{type(self).__name__}", "the chunked PyTorch backend ('torch')")

    @staticmethod
    def _normalise(settings: dict[str, Any]) -> None:
        """The checked ``state_dtype`` (a torch dtype, or ``"int8"``: :func:`celo2.torch._blockwise8.state_format`)
        and ``rounding_seed`` as an int, in place."""
        settings["state_dtype"] = _blockwise8.state_format(settings["state_dtype"])
        settings["rounding_seed"] = _rounding.check_seed(settings["rounding_seed"])

    @staticmethod
    def _check_choices(settings: dict[str, Any], where: str) -> None:
        """The settings that pick the algorithm or the implementation (cheap: run before every step too)."""
        for key, (neutral, hint) in FOREIGN_GROUP_KEYS.items():
            if key in settings and settings[key] not in neutral:
                raise ValueError(f"{where}unsupported param group option {key}={settings[key]!r}: {hint} "
                                 f"(see celo2.torch.optimizer.FOREIGN_GROUP_KEYS)")
        if settings["branch"] not in BRANCHES:
            raise ValueError(f"{where}invalid branch={settings['branch']!r}: expected one of {BRANCHES}")
        try:
            spec.check_nonfinite_policy(settings["nonfinite"])
            dtype = _blockwise8.state_format(settings["state_dtype"])
            _rounding.check_seed(settings["rounding_seed"])
            if settings["backend"] not in F.BACKENDS:
                F.check_backend(settings["backend"])  # raises, naming the backends
            # 8-bit state: every backend steps the decoded float32 state (_blockwise8_step).
            if dtype != torch.float32 and not _blockwise8.is_blockwise8(dtype) and settings["backend"] != "auto":
                F.check_backend(settings["backend"], dtype)  # a backend that stores the state dtype
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None

    @classmethod
    def _check_settings(cls, settings: dict[str, Any], where: str) -> None:
        """Every setting of a param group (or the defaults), before it joins; ``where`` prefixes the message."""
        cls._check_choices(settings, where)
        try:
            F.check_backend(settings["backend"])
            resolve_ns_dtype(settings["ns_dtype"], "cpu")  # validates the name
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
        lr = _number(settings["lr"], "lr", where)
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"{where}invalid learning rate lr={settings['lr']}: must be finite and >= 0")
        for key in ("weight_decay", "adam_lr_mult", "adam_eps"):
            value = _number(settings[key], key, where)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{where}invalid {key}={settings[key]}: must be finite and >= 0")
        betas = settings["adam_betas"]
        try:
            ok = len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{where}invalid adam_betas={betas}: two values in [0, 1)")

    def _check_params(self, gi: int, group: dict[str, Any]) -> dict[torch.Tensor, _sharded.Sharding]:
        """The group's parameters are real floating-point tensors, and its DTensors laid out so that they
        can be stepped; returns the DTensors' shardings."""
        me = type(self).__name__
        shardings = {}
        for i, p in enumerate(group["params"]):
            label = self._label(gi, group, i)
            if torch.is_complex(p):
                raise ValueError(f"{me} does not support complex parameters ({label}: {p.dtype})")
            if not p.is_floating_point():
                raise ValueError(f"{me} steps floating-point parameters; {label} is {p.dtype}")
            if isinstance(p, DTensor):
                if _blockwise8.is_blockwise8(_blockwise8.state_format(group["state_dtype"])):
                    raise ValueError(f"{me}: {label} is a DTensor ({tuple(p.placements)}), and state_dtype='int8' "
                                     f"(8-bit blockwise state) steps plain tensors only; use float32 or bfloat16 "
                                     f"state for sharded parameters")
                shardings[p] = self._describe(group, i, p, label)
        return shardings

    # -- copies: copy.deepcopy, pickle and torch.save keep what the step needs ------------------
    def __getstate__(self) -> dict[str, Any]:
        """torch.optim's state (defaults, state, param groups) with the theta and the name rule.

        Caches (theta per device, chunk scratch, DTensor shardings) are left
        out and rebuilt, so a copy made by ``copy.deepcopy``, ``pickle`` or
        ``torch.save`` steps exactly like the original.
        """
        return {**super().__getstate__(), "theta": self.theta, "adam_name_pattern": self.adam_name_pattern}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copy made from :meth:`__getstate__` and rebuild its caches.

        ``torch.optim.Optimizer.load_state_dict`` also calls this, with the
        state and param groups only: that update keeps the caches.

        Raises:
            ValueError: A copy without its theta (pickled by a celo2 release
                whose optimizers lost it).
        """
        if "defaults" not in state:  # load_state_dict's update
            super().__setstate__(state)
            return
        if "theta" not in state:
            raise ValueError(f"this {type(self).__name__} was pickled without its theta (a celo2 release before "
                             f"copies kept it): build the optimizer again with its theta and load the old one's "
                             f"state_dict()")
        had_differentiable = "differentiable" in state["defaults"]
        for settings in (state["defaults"], *state["param_groups"]):  # pickled before bfloat16 state
            settings.setdefault("state_dtype", torch.float32)
            settings.setdefault("rounding_seed", 0)
        super().__setstate__(state)
        if not had_differentiable:  # torch.optim adds it to a copy; the original has none
            self.defaults.pop("differentiable", None)
        self._theta_by_device = {}
        self._workspace_by_device = {}
        self._shardings = {}
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if isinstance(p, DTensor):
                    self._sharding(gi, group, i, p)

    # -- routing -------------------------------------------------------------------
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

    def _describe(self, group: dict[str, Any], i: int, p: DTensor, label: str) -> _sharded.Sharding:
        """How DTensor ``p`` is sharded, checked (see :func:`celo2.torch._sharded.describe`)."""
        sh = _sharded.describe(p, label)
        if self._branch(group, i, p) != routing.ADAM:
            _sharded.check_learned(sh, label, p, group["orthogonalize"])
        return sh

    def _sharding(self, gi: int, group: dict[str, Any], i: int, p: DTensor) -> _sharded.Sharding:
        """How DTensor ``p`` is sharded (described once)."""
        sh = self._shardings.get(p)
        if sh is None:
            sh = self._shardings[p] = self._describe(group, i, p, self._label(gi, group, i))
        return sh

    def _entries(self) -> list[list[TensorEntry]]:
        """Every parameter with its label and branch, per param group."""
        return [[TensorEntry(self._label(gi, g, i), self._branch(g, i, p), p) for i, p in enumerate(g["params"])]
                for gi, g in enumerate(self.param_groups)]

    def routing(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(branch, name, shape)`` for every parameter, in param-group order."""
        return [(e.branch, e.label, tuple(e.param.shape)) for group in self._entries() for e in group]

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
                counter = self.state[p].get(COUNTER_KEY) if p in self.state else None
                counts[self._label(gi, group, i)] = 0 if counter is None else int(counter)
        return counts

    # -- state_dict: checked whole before anything loads (celo2.torch._checkpoint) -------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of the same optimizer class and model.

        Every saved tensor is checked against its parameter first (keys and
        shapes for its branch, floating dtype), the param-group settings
        that select the algorithm (``branch``, ``orthogonalize``,
        ``nonfinite``) must agree with this optimizer's, and the saved
        settings must pass the constructor's checks; on any mismatch
        nothing is loaded. Accumulators are kept in the state dtype whatever
        the parameter dtype. A state saved before ``nonfinite`` existed keeps this
        optimizer's setting.

        State dtype: the saved accumulators are converted to this optimizer's
        ``state_dtype`` (each param group's): bfloat16 to float32 exactly,
        float32 to bfloat16 rounded to nearest-even (once, deterministically;
        later writes round stochastically); float32 or bfloat16 to 8-bit
        codes rounded to the nearest code (once), and 8-bit codes to float32
        or bfloat16 by decoding them. A finite value beyond the target's
        range is refused, naming the parameter and key. ``rounding_seed`` and
        the per-tensor ``rounding_step`` counters are restored from the saved
        state (a state saved before they existed keeps this optimizer's seed),
        so a bfloat16 run resumes bitwise. For DTensor parameters each state is laid out like
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
        where = f"{type(self).__name__}.load_state_dict"
        _checkpoint.check_state_dict(type(self).__name__, self.param_groups, self._entries(), state_dict)
        for gi, (group, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            try:
                self._check_settings(_checkpoint.loaded_settings(group, saved),
                                     f"{where}: param group {gi} of the saved state: ")
            except ValueError as exc:
                raise ValueError(f"{exc}; nothing was loaded") from None
        converted = _checkpoint.converted_accumulators(where, self.param_groups, self._entries(), state_dict)
        migration = _checkpoint.Migration.before(self.param_groups, state_dict, converted)
        super().load_state_dict(state_dict)
        migration.after(self.param_groups, self.state)
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p in self.state:
                    sharding = self._sharding(gi, group, i, p) if isinstance(p, DTensor) else None
                    _checkpoint.lay_out_state(self.state[p], p, sharding, self._branch(group, i, p) == routing.ADAM)

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
                a parameter is on the ``meta`` device (no data yet), or a
                parameter's state does not fit it (resized since its state was
                made, or an unchecked state put in place).
            ValueError: Before any tensor is written, if a param group was
                edited in place to a setting the constructor refuses
                (``branch``, ``nonfinite``, ``backend``, or a key of
                :data:`FOREIGN_GROUP_KEYS`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan()
        order = self._order() if any(_blockwise8.state_format(g["state_dtype"]) != torch.float32
                                     for g, _ in plan) else {}
        for group, entries in plan:
            learned = [p for p, branch in entries if branch != routing.ADAM]
            adam_params = [p for p, branch in entries if branch == routing.ADAM]
            if _blockwise8.is_blockwise8(group["state_dtype"]):
                for p, branch in entries:
                    self._blockwise8_step(group, p, branch, order)
                continue
            if learned:
                self._learned_step(group, learned, order)
            if adam_params:
                self._adam_step(group, adam_params, order)
        return loss

    def _plan(self) -> list[tuple[dict[str, Any], list[tuple[torch.Tensor, str]]]]:
        """``(group, [(param, branch)])`` of the tensors to step, every one
        checked first (see :meth:`step`), so that a bad one stops the step
        before anything is written."""
        me = type(self).__name__
        plan = []
        for gi, group in enumerate(self.param_groups):
            self._check_choices(group, f"{me}.step: param group {gi}: ")
            entries = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                label = self._label(gi, group, i)
                if p.grad.is_sparse:
                    raise RuntimeError(f"{me} does not support sparse gradients ({label}); use a dense embedding")
                if p.device.type == "meta":
                    raise RuntimeError(f"{me}.step: {label} is on the meta device, which holds no values: "
                                       f"materialise the model (module.to_empty(device=...), then initialise it) "
                                       f"and build the optimizer from its parameters; nothing was changed")
                if p.grad.shape != p.shape:
                    raise RuntimeError(f"{me}.step: the gradient of {label} has shape {tuple(p.grad.shape)}, the "
                                       f"parameter {tuple(p.shape)}; nothing was changed")
                branch = self._branch(group, i, p)
                state = self.state.get(p)
                if isinstance(p, DTensor) or isinstance(p.grad, DTensor):
                    self._check_dtensor(me, gi, group, i, p, branch, state)
                if state:
                    _checkpoint.check_tensor_state(f"{me}.step", label, branch, p, state, RuntimeError,
                                                   _blockwise8.state_format(group["state_dtype"]))
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
            if key in ("step", COUNTER_KEY, ROUNDING_STEP_KEY):
                continue
            want = sh.state_placements(key) if branch != routing.ADAM else tuple(p.placements)
            if not isinstance(t, DTensor) or tuple(t.placements) != want:
                have = f"placements {tuple(t.placements)}" if isinstance(t, DTensor) else "a plain tensor"
                raise RuntimeError(f"{me}.step: state {key!r} of {label} is {have}, expected a DTensor with {want} "
                                   f"like its parameter (load states with load_state_dict or torch.distributed."
                                   f"checkpoint.state_dict.set_optimizer_state_dict); nothing was changed")

    @staticmethod
    def _counter(state: dict[str, Any], p: torch.Tensor) -> torch.Tensor:
        if COUNTER_KEY not in state:
            state[COUNTER_KEY] = torch.zeros((), dtype=torch.int32, device=p.device)
        return state[COUNTER_KEY]

    def _state_rounding(self, group: dict[str, Any], params: list[torch.Tensor],
                        order: dict[torch.Tensor, int]) -> Optional[StateRounding]:
        """For bfloat16 state, each tensor's step counter (advanced by one on its device, no host
        synchronisation) with the group's seed and the tensors' indices in the optimizer's order; ``None``
        for float32 state."""
        if _blockwise8.state_format(group["state_dtype"]) != torch.bfloat16:
            return None
        steps = [self._rounding_step(p) for p in params]
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in steps:
            by_device.setdefault(t.device, []).append(t)
        for ts in by_device.values():
            torch._foreach_add_(ts, 1)
        return StateRounding(int(group["rounding_seed"]), steps, [order[p] for p in params])

    def _rounding_step(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor's rounding step counter (made at 0 where its state has none)."""
        state = self.state[p]
        if ROUNDING_STEP_KEY not in state:
            state[ROUNDING_STEP_KEY] = torch.zeros((), dtype=torch.int64, device=_sharded.local(p).device)
        return state[ROUNDING_STEP_KEY]

    def _blockwise8_step(self, group: dict[str, Any], p: torch.Tensor, branch: str,
                         order: dict[torch.Tensor, int]) -> None:
        """One tensor of an 8-bit state group: its accumulators decoded to float32, the float32 step of its
        branch (any backend; no rounding), then encoded back with stochastic rounding
        (:mod:`celo2.torch._blockwise8`). A tensor the step skipped (a non-finite gradient under ``"skip"``)
        keeps its codes and scales bitwise. The transient float32 state is this tensor's alone."""
        state = self.state[p]
        if not state:
            state.update(self._new_state(group, p, branch))
        counter = self._counter(state, p)
        step = self._rounding_step(p)
        step.add_(1)
        keys = list(_checkpoint.expected_shapes(branch, p))
        keys = [k for k in keys if k in _checkpoint.ACCUMULATOR_KEYS]
        work = _blockwise8.decoded(state, keys)
        before = counter.clone()
        if branch == routing.ADAM:
            _adamw.step(group, [p], [work], [counter], self._shardings, None)
        else:
            workspace = None
            if not torch.compiler.is_compiling():
                workspace = self._workspace_by_device.setdefault(p.device, Workspace())
            F.celo2([p], [p.grad], [work], backend=group["backend"], nonfinite=group["nonfinite"],
                    counters=[counter], workspace=workspace, rounding=None, theta=self._torch_theta,
                    lr=group["lr"], weight_decay=group["weight_decay"], orthogonalize=group["orthogonalize"],
                    ns_dtype=group["ns_dtype"])
        for k, t in work.items():  # entries the step replaced rather than updated (AdamW's step count)
            if k not in keys and state.get(k) is not t:
                state[k] = t
        kept = counter != before if group["nonfinite"] == "skip" else None
        _blockwise8.encode_(state, work, _rounding.TensorRounding(int(group["rounding_seed"]), step, order[p]),
                            keys, kept)

    def _order(self) -> dict[torch.Tensor, int]:
        """Each parameter's index in the optimizer's order (the param groups' parameters in order)."""
        return {p: k for k, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _new_state(self, group: dict[str, Any], p: torch.Tensor, branch: str) -> dict[str, torch.Tensor]:
        """The state a parameter's first step creates: its branch's accumulators in the group's state dtype,
        laid out like it, and its counters."""
        dtype = _blockwise8.state_format(group["state_dtype"])
        sh = self._shardings.get(p) if isinstance(p, DTensor) else None
        if _blockwise8.is_blockwise8(dtype):
            shapes = _checkpoint.expected_shapes(branch, p)
            state = _blockwise8.init_state({k: v for k, v in shapes.items() if k in _checkpoint.ACCUMULATOR_KEYS},
                                           p.device)
            if branch == routing.ADAM:
                state["step"] = _adamw.init_state(p.new_empty(0))["step"]
        elif branch == routing.ADAM:
            state = _adamw.init_state(p, dtype)
        else:
            state = init_tensor_state(p, dtype) if sh is None else _sharded.init_state(p, sh, dtype)
        device = _sharded.local(p).device
        state[COUNTER_KEY] = torch.zeros((), dtype=torch.int32, device=device)
        if dtype != torch.float32:
            state[ROUNDING_STEP_KEY] = torch.zeros((), dtype=torch.int64, device=device)
        return state

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state per parameter, counted from its state tensors.

        A parameter not stepped yet counts the state its first step creates
        (built on its device without stepping, so a model on the ``meta``
        device can be counted). A DTensor's state counts this rank's blocks.

        Returns:
            Parameter name (``group<g>.param<i>`` without names) -> bytes.
        """
        out = {}
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                state = self.state.get(p) or self._new_state(group, p, self._branch(group, i, p))
                out[self._label(gi, group, i)] = sum(_sharded.local(t).numel() * t.element_size()
                                                     for t in state.values() if isinstance(t, torch.Tensor))
        return out

    def _adam_step(self, group: dict[str, Any], params: list[torch.Tensor], order: dict[torch.Tensor, int]) -> None:
        """AdamW on the group's tensors (:func:`celo2.torch._adamw.step`)."""
        for p in params:
            if not self.state[p]:
                self.state[p].update(self._new_state(group, p, routing.ADAM))
        counters = [self._counter(self.state[p], p) for p in params]
        _adamw.step(group, params, [self.state[p] for p in params], counters, self._shardings,
                    self._state_rounding(group, params, order))

    def _learned_step(self, group: dict[str, Any], params: list[torch.Tensor], order: dict[torch.Tensor, int]) -> None:
        """The learned rule on the group's tensors (:func:`celo2.torch.functional.celo2`)."""
        states, sharded = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state.update(self._new_state(group, p, routing.LEARNED))
            self._counter(state, p)
            states.append(state)
        rounding = self._state_rounding(group, params, order)
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
                    nonfinite=group["nonfinite"], counters=[states[j][COUNTER_KEY] for j in plain],
                    workspace=workspace, rounding=None if rounding is None else rounding.select(plain), **kw)
        if sharded:
            _sharded.celo2([params[j] for j in sharded], [params[j].grad for j in sharded],
                           [states[j] for j in sharded], [self._shardings[params[j]] for j in sharded],
                           skip=group["nonfinite"] == "skip", counters=[states[j][COUNTER_KEY] for j in sharded],
                           workspace=workspace, rounding=None if rounding is None else rounding.select(sharded),
                           **kw)


def _number(value: Any, key: str, where: str) -> float:
    """``value`` (a number or a one-element tensor, read once here) as a float, or a ValueError naming ``key``."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{where}invalid {key}={value!r}: expected a number or a one-element tensor") from None


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
    on accelerators the AdamW branch keeps its step count on the device).
    ``"propagate"`` runs no check: a NaN flows through as in AdamW and,
    through the rule's normalisations, reaches the whole tensor and its
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

    Dtypes: accumulators are of the state dtype (``state_dtype``: float32 by
    default) whatever the parameter dtype; a float64 parameter is updated in
    float64 (``lr=0`` leaves it exactly unchanged); bfloat16 / float16
    parameters combine the update in float32 and round once.

    bfloat16 state (``state_dtype=torch.bfloat16``): every accumulator of
    both branches (the rule's momenta, second moment and factored
    statistics, AdamW's two moments) is stored in bfloat16, 2 bytes instead
    of 4. The arithmetic, and so the step's direction, is float32 state's;
    each write rounds stochastically with bits hashed from
    ``(rounding_seed, step, tensor, slot, element)``
    (:mod:`celo2.rule.rounding`), so the rounding is unbiased (a momentum
    with decay 0.999 does not stall as under round-to-nearest), a run
    repeats bitwise, and a resumed run continues bitwise. ``step`` is
    ``state[p]["rounding_step"]`` (a 0-d int64 tensor on the parameter's
    device, advanced on the device each step the tensor has a gradient,
    skipped steps included) and ``tensor`` the parameter's index over all
    param groups in order. Both settings live in the param groups (each
    group may have its own) and in :meth:`state_dict`; a group's
    ``state_dtype`` may not change once its state exists (the step refuses
    it: convert through :meth:`load_state_dict`). ``backend="auto"`` picks,
    per tensor, a backend that stores the dtype; a named backend that does
    not is refused.

    8-bit blockwise state (``state_dtype="int8"``, :mod:`celo2.rule.blockwise8`):
    each accumulator is kept as 8-bit codes (``state[p][key]``: ``int8``
    for momenta, ``uint8`` square-root codes for second moments, shaped
    like the accumulator) and one float32 scale per 256 elements
    (``state[p][key + "_scale"]``), about a quarter of float32 state's
    bytes. Each tensor is stepped alone: its accumulators are decoded to
    float32, the selected backend's float32 step runs on them, and they are
    encoded back with stochastic rounding from the same counter as
    bfloat16 state (``rounding_step``, ``rounding_seed``), so runs and
    resumed runs repeat bitwise. The transient is one tensor's float32
    state. A block holding a NaN or an infinity keeps the scale NaN (it
    decodes to NaN); a skipped tensor keeps its codes bitwise. DTensor
    parameters are refused with it.

    Copies: ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load``
    (``weights_only=False``) of the optimizer keep its theta, routing and
    state, and the copy steps bitwise like the original.

    Host synchronisation on accelerators: none in the AdamW branch, for
    ``lr`` and ``weight_decay`` as numbers or as 0-d tensors (a tensor takes
    ``torch.optim.AdamW(capturable=True, foreach=True)``'s arithmetic, see
    :mod:`celo2.torch._adamw`).
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
        foreach: Passed to AdamW's functional step (default ``None``: PyTorch's
            choice); a 0-d tensor ``lr`` or ``weight_decay`` always takes the
            multi-tensor arithmetic (see :mod:`celo2.torch._adamw`).
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
        state_dtype: The dtype of the optimizer state: ``torch.float32``
            (default), ``torch.bfloat16`` (or their names; see "bfloat16
            state" below), or ``"int8"`` (8-bit blockwise state, see below).
        rounding_seed: The seed of bfloat16 and 8-bit state's stochastic
            rounding, an integer in ``[0, 2**32)`` (default 0).

    Raises:
        ValueError: For a negative or non-finite ``lr``, ``weight_decay``,
            ``adam_lr_mult`` or ``adam_eps``, betas outside [0, 1), an unknown
            ``branch``, ``nonfinite``, ``backend``, ``ns_dtype`` or
            ``state_dtype``, a ``rounding_seed`` outside ``[0, 2**32)``, a
            backend that does not store ``state_dtype``, a backend
            this installation lacks (Triton, Numba), a DTensor parameter with
            ``state_dtype="int8"``, a key of another optimizer
            that would change the algorithm (``maximize=True``, ``betas``, ...:
            :data:`FOREIGN_GROUP_KEYS`), complex or integer parameters, or a
            DTensor parameter laid out in a way the rule cannot step (named,
            with its placements). Param groups, those given here and those
            added later with :meth:`add_param_group`, are checked alike.
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
        state_dtype: str | torch.dtype = torch.float32,
        rounding_seed: int = 0,
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
            state_dtype=state_dtype,
            rounding_seed=rounding_seed,
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
        state_dtype: ``torch.float32`` (default), ``torch.bfloat16`` or ``"int8"``, as :class:`Celo2`'s.
        rounding_seed: As :class:`Celo2`'s (default 0).

    Raises:
        ValueError: For a negative or non-finite ``lr`` or ``weight_decay``, an
            unknown ``nonfinite``, ``backend`` or ``state_dtype``, a
            ``rounding_seed`` outside ``[0, 2**32)``, a backend that does not
            store ``state_dtype``, a backend this installation
            lacks, a key of another optimizer that would change the algorithm
            (:data:`FOREIGN_GROUP_KEYS`), complex or integer parameters, or a
            DTensor parameter laid out in a way the rule cannot step; param
            groups added later are checked alike.
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
        state_dtype: str | torch.dtype = torch.float32,
        rounding_seed: int = 0,
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
            state_dtype=state_dtype,
            rounding_seed=rounding_seed,
        )


for _cls in (Celo2, Celo2Base):
    _cls.__doc__ += _POLICY_DOC
