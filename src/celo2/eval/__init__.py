"""Evaluation of Celo2 against hand-designed optimizers on CPU-sized PyTorch tasks.

``tasks`` (what is trained), ``optimizers`` (what trains it), ``runner`` (one
resumable run each), ``report`` (best LR, tables, plots) and ``bench`` (the
planner behind ``celo2 bench``).
"""
