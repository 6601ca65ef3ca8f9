"""Evaluation of Celo2 against hand-designed optimizers on CPU-sized PyTorch tasks.

``tasks`` (what is trained: the registry and suites, built from ``task_data``,
``problems``, ``models`` and ``cartpole``), ``optimizers`` (what trains it),
``runner`` (one resumable run each), ``report`` (best LR, tables, plots),
``bench`` (the planner behind ``celo2 bench``) and ``theta_specs`` (the
command line's ``--theta`` specs).
"""
