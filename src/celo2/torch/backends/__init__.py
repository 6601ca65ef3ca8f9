"""The backends that run the rule on PyTorch tensors, and the contract they share.

One module per value of ``backend=`` (:mod:`~celo2.torch.backends.triton`,
:mod:`~celo2.torch.backends.numba`, :mod:`~celo2.torch.backends.torch`: the
chunked PyTorch path, :mod:`~celo2.torch.backends.reference`), each exposing
a :class:`~celo2.torch.backends.base.Backend` object named ``BACKEND``. :func:`celo2.torch.functional.celo2`
picks one per tensor, once, and hands each backend the list of tensors it
took, as ``torch.optim.adam`` picks its fused, multi-tensor or single-tensor
implementation. A backend may step its list in one call (a multi-tensor
kernel) or loop over it.

What every backend shares is written once in :mod:`~celo2.torch.backends.base`:
the :class:`~celo2.torch.backends.base.Backend` protocol, the output RMS of a
direction and the update ``p <- p (1 - lr wd) - lr * direction``
(:func:`~celo2.torch.backends.base.finish`,
:func:`~celo2.torch.backends.base.apply_update`). This package's own module
holds no code: a submodule is named ``torch``, so a name ``torch`` here would
be rebound to it.

Adding a backend: write a module here with a ``BACKEND`` object that meets
:class:`~celo2.torch.backends.base.Backend` (its ``state_dtypes`` name the
state dtypes it stores; with ``torch.bfloat16`` its state-writing methods
take ``rounding=`` and store exactly the bits of :mod:`celo2.rule.rounding`),
add it to :data:`celo2.torch.functional.BACKENDS` and to the
fall-back order of ``"auto"`` in :func:`celo2.torch.functional.candidates`,
and run ``tests/torch/test_backends.py``, ``tests/torch/test_state_dtype.py``
and ``tests/rule/`` against it.
"""

