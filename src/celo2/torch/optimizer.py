"""Celo2 and Celo2-base as ``torch.optim.Optimizer`` subclasses."""

from __future__ import annotations

from functools import partial
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch.optim.adam import adam as _adam_functional

from celo2.rule import routing, spec
from celo2.rule.theta import Theta, load_theta
from celo2.kernels import cpu as cpu_kernels
from celo2.torch.rule import TorchTheta, _Workspace, apply_step, init_tensor_state, runs_on_one_thread

_BRANCHES = ("auto", routing.LEARNED, routing.ADAM)
_STATE_KEYS_FP32 = ("m", "v", "fac_r", "fac_c", "exp_avg", "exp_avg_sq")


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
    ) -> None:
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
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["branch"] not in _BRANCHES:
                raise ValueError(
                    f"param group option branch={group['branch']!r}: expected one of {_BRANCHES}"
                )
            for p in group["params"]:
                if torch.is_complex(p):
                    name = self._name_of(group, p)
                    raise ValueError(f"{type(self).__name__} does not support complex parameters ({name})")
        self.theta = load_theta(theta)
        self.adam_name_pattern = adam_name_pattern
        self._theta_by_device: dict[torch.device, TorchTheta] = {}
        # Chunk scratch of the fast path, one per device, reused across tensors
        # and steps (a few MB; not part of state_dict).
        self._workspace_by_device: dict[torch.device, _Workspace] = {}

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

    def _branch(self, group: dict[str, Any], index: int, p: torch.Tensor) -> str:
        if group["branch"] != "auto":
            return group["branch"]
        names = group.get("param_names")
        name = names[index] if names else None
        return routing.route(name, tuple(p.shape), self.adam_name_pattern)

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

    # -- state_dict: keep accumulators float32 whatever the parameter dtype ----------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(saved_ids, params))
        super().load_state_dict(state_dict)
        for pid, pstate in saved.items():
            p = id_to_param.get(pid)
            if p is None or p.dtype == torch.float32:
                continue
            for key in _STATE_KEYS_FP32:
                if key in pstate and isinstance(pstate[key], torch.Tensor):
                    self.state[p][key] = pstate[key].to(device=p.device, dtype=torch.float32, copy=True)

    # -- the step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            adam_params: list[torch.Tensor] = []
            threaded: list[tuple[int, Callable[[], None]]] = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"({self._name_of(group, p) or f'parameter {i}'}); use a dense embedding"
                    )
                if self._branch(group, i, p) == routing.ADAM:
                    adam_params.append(p)
                else:
                    task = self._learned_step(group, p)
                    if task is not None:
                        threaded.append((p.numel(), task))
            if threaded:  # tensors that are fused CPU kernels only go to threads whole
                cpu_kernels.run_tensors(threaded)
            if adam_params:
                self._adam_step(group, adam_params)
        return loss

    def _learned_step(self, group: dict[str, Any], p: torch.Tensor) -> Callable[[], None] | None:
        """Step ``p`` now, or return its step as a task when it is fused CPU
        kernels only (the caller spreads those over threads)."""
        state = self.state[p]
        if not state:
            state.update(init_tensor_state(p))
        theta = self._torch_theta(p.device)
        # p <- p (1 - lr wd) - lr * direction, in place, chunk by chunk where possible.
        args = (theta, state, p.grad, p, group["orthogonalize"], group["lr"], group["weight_decay"])
        if runs_on_one_thread(state, p.grad, p, group["orthogonalize"]):
            theta.layout().numpy()  # built here, not raced for by the threads
            return partial(apply_step, *args)
        workspace = None
        if not torch.compiler.is_compiling():  # traced: the compiler plans the scratch
            workspace = self._workspace_by_device.setdefault(p.device, _Workspace())
        apply_step(*args, workspace=workspace)
        return None

    def _adam_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """AdamW at ``adam_lr_mult * lr``, exactly ``torch.optim.AdamW``'s arithmetic."""
        beta1, beta2 = group["adam_betas"]
        lr = group["lr"] * group["adam_lr_mult"]
        fp32, low = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            (fp32 if p.dtype == torch.float32 else low).append(p)
        if fp32:
            _adam_functional(
                fp32,
                [p.grad for p in fp32],
                [self.state[p]["exp_avg"] for p in fp32],
                [self.state[p]["exp_avg_sq"] for p in fp32],
                [],
                [self.state[p]["step"] for p in fp32],
                foreach=group["foreach"],
                decoupled_weight_decay=True,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=lr,
                weight_decay=group["weight_decay"],
                eps=group["adam_eps"],
                maximize=False,
            )
        for p in low:
            # Half-precision parameters: the same arithmetic on a float32 copy,
            # so the moments never lose precision.
            state = self.state[p]
            p32 = p.to(torch.float32)
            _adam_functional(
                [p32],
                [p.grad.to(torch.float32)],
                [state["exp_avg"]],
                [state["exp_avg_sq"]],
                [],
                [state["step"]],
                foreach=False,
                decoupled_weight_decay=True,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=lr,
                weight_decay=group["weight_decay"],
                eps=group["adam_eps"],
                maximize=False,
            )
            p.copy_(p32)


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
        )


class Celo2Base(_LearnedOptimizer):
    """Celo2-base: the learned rule, without orthogonalisation, on every tensor."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        theta: Theta | str | None = None,
        *,
        foreach: bool | None = None,
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
        )
