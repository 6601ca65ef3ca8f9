"""Celo2 and Celo2-base on DTensor parameters (FSDP2, tensor-parallel placements), under DDP, and through
``torch.distributed.checkpoint`` resharding: 2 gloo processes on the CPU against one process.

The ranks run :mod:`distributed_workers`; the oracle is the same computation in this process on plain
tensors. Tolerance 1e-5 (float32, Newton-Schulz in float32).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
import distributed_workers as W  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")
TOL = 1e-5


def spawn(tmp_path, world: int, cases: list[tuple[str, tuple]], tag: str) -> dict:
    out = tmp_path / tag
    out.mkdir()
    mp.spawn(W.run_rank, args=(world, str(out / "store"), str(out), cases), nprocs=world)
    return torch.load(out / "results.pt")


def assert_close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for k in want:
        diff = (got[k].to(torch.float64) - want[k].to(torch.float64)).abs().max().item()
        assert diff <= TOL, f"{what}: {k} differs from one process by {diff:.2e}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every multi-process case, run once: world 1 saves a checkpoint after 3 steps; world 2 runs the
    placement, FSDP2 and DDP cases, loads that checkpoint (1 -> 2) and saves its own; world 1 loads it (2 -> 1)."""
    tmp = tmp_path_factory.mktemp("dist")
    ck1, ck2 = str(tmp / "ck_world1"), str(tmp / "ck_world2")
    results = {}
    results.update(spawn(tmp, 1, [("rank_checkpoint", (k, 1, ck1 + k, False, range(3))) for k in ("celo2", "base")]
                         + [("rank_checkpoint", (k, 1, ck1 + k + "16", False, range(3), "bfloat16"))
                            for k in ("celo2", "base")], "save1"))
    cases = [(name, (k, 2)) for k in ("celo2", "base") for name in ("rank_placements", "rank_fsdp", "rank_ddp")]
    cases += [("rank_placements", (k, 2, "bfloat16")) for k in ("celo2", "base")]
    cases += [("rank_bad_layouts", (2,))]
    cases += [("rank_checkpoint", (k, 2, ck1 + k, True, range(3, W.STEPS))) for k in ("celo2", "base")]
    cases += [("rank_checkpoint", (k, 2, ck1 + k + "16", True, range(3, W.STEPS), "bfloat16"))
              for k in ("celo2", "base")]
    cases += [("rank_checkpoint", (k, 2, ck2 + k, False, range(3))) for k in ("celo2", "base")]
    results.update(spawn(tmp, 2, cases, "world2"))
    results.update(spawn(tmp, 1, [("rank_checkpoint", (k, 1, ck2 + k, True, range(3, W.STEPS)))
                                  for k in ("celo2", "base")], "load1"))
    return results, ck1, ck2


@pytest.mark.parametrize("kind", ["celo2", "base"])
def test_placements_match_one_process(runs, kind):
    """Shard(0) uneven and empty shards, Shard(1), a conv kernel, vectors, replicas, and a NaN in one
    rank's block (the whole tensor skips on every rank, as in one process)."""
    got = runs[0][f"rank_placements{(kind, 2)}"]
    want = W.oracle_placements(kind)
    assert int(want["nonfinite_steps"]) == 1
    assert_close(got, want, f"{kind} placements")


@pytest.mark.parametrize("kind", ["celo2", "base"])
def test_bfloat16_state_of_shards_is_bitwise_one_processs(runs, kind):
    """bfloat16 state on the same placements: each shard rounds with its elements' indices in the whole
    accumulator, so the gathered state equals one process's bit for bit (the gradients are fixed, so the
    state does not depend on the parameters' float32 differences); the parameters agree as in float32."""
    got = runs[0][f"rank_placements{(kind, 2, 'bfloat16')}"]
    want = W.oracle_placements(kind, "bfloat16")
    states = sorted(k for k in want if "/" in k)
    assert any(k.endswith("/fac_r") for k in states) and any(k.endswith("/exp_avg") for k in states) == (
        kind == "celo2")
    assert set(got) == set(want)
    for k in states:
        assert torch.equal(got[k], want[k]), f"{kind}: {k} differs from one process's bits"
    assert_close({k: v for k, v in got.items() if k not in states}, {k: v for k, v in want.items()
                                                                      if k not in states}, f"{kind} bf16 params")


@pytest.mark.parametrize("kind", ["celo2", "base"])
@pytest.mark.parametrize("case", ["rank_fsdp", "rank_ddp"])
def test_training_matches_one_process(runs, kind, case):
    assert_close(runs[0][f"{case}{(kind, 2)}"], W.oracle_net(kind), f"{kind} {case}")


@pytest.mark.parametrize("kind", ["celo2", "base"])
@pytest.mark.parametrize("saved_on,loaded_on", [(1, 2), (2, 1)])
def test_checkpoint_reshards(runs, kind, saved_on, loaded_on):
    """Saved by torch.distributed.checkpoint after 3 steps on one world size, loaded on another, trained
    on: the parameters equal one process's after 5 steps."""
    results, ck1, ck2 = runs
    folder = (ck1 if saved_on == 1 else ck2) + kind
    got = results[f"rank_checkpoint{(kind, loaded_on, folder, True, range(3, W.STEPS))}"]
    assert_close(got, W.oracle_net(kind), f"{kind} checkpoint {saved_on}->{loaded_on}")
    saved = results[f"rank_checkpoint{(kind, saved_on, folder, False, range(3))}"]
    assert_close(saved, W.oracle_net(kind, steps=3), f"{kind} before the checkpoint")


@pytest.mark.parametrize("kind", ["celo2", "base"])
def test_bfloat16_checkpoint_reshards(runs, kind):
    """bfloat16 state saved by torch.distributed.checkpoint on one process after 3 steps, loaded on two
    and trained on: still bfloat16, the step counters restored, the parameters one process's."""
    results, ck1, _ = runs
    got = dict(results[f"rank_checkpoint{(kind, 2, ck1 + kind + '16', True, range(3, W.STEPS), 'bfloat16')}"])
    assert bool(got.pop("bfloat16_kept"))
    assert got.pop("rounding_steps").tolist() == [W.STEPS]
    assert_close(got, W.oracle_net(kind, state_dtype="bfloat16"), f"{kind} bfloat16 checkpoint 1->2")


def test_unsupported_layouts_are_refused_by_name(runs):
    got = runs[0]["rank_bad_layouts(2,)"]
    assert "model.partial" in got["partial"] and "Partial" in got["partial"]
    assert "model.two_mesh_dims" in got["two_mesh_dims"] and "2 mesh dimensions" in got["two_mesh_dims"]
    assert "model.conv_last_axes" in got["conv_last_axes"] and "Shard(dim=2)" in got["conv_last_axes"]
    assert "model.good" in got["grad_layout"] and "Replicate()" in got["grad_layout"]
    assert got["unchanged"] == "True", "a parameter or state changed before the refused step"
