"""Sequence parallelism (launcher/sequence.py): rows sliced per rank without losing a target, and every
misconfiguration refused before a worker starts. (Training equality with one process: tests/test_backends.py.)"""

from __future__ import annotations

import pytest
import torch

from launcher.config import ConfigError
from launcher.packing import collate
from launcher.sequence import check, data_parallel, packed_after_all_to_all
from launcher.templates import IGNORE_INDEX
from launcher.validate import validate
from tests.conftest import run_launcher
from tests.test_configs import _compose
from launcher.config import to_object

ROWS = [[{"input_ids": list(range(10, 23)), "labels": list(range(10, 23))},
         {"input_ids": list(range(30, 36)), "labels": [IGNORE_INDEX] * 2 + list(range(32, 36))}],
        [{"input_ids": list(range(40, 47)), "labels": list(range(40, 47))}]]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_slices_put_together_are_the_padded_rows(n: int) -> None:
    whole = collate(ROWS, pad_id=0)
    parts = [collate(ROWS, pad_id=0, shard=(k, n)) for k in range(n)]
    width = parts[0]["input_ids"].shape[1] * n
    assert width % n == 0 and width - n < whole["input_ids"].shape[1] <= width  # padded at the tail only
    for key in ("input_ids", "labels", "position_ids"):
        joined = torch.cat([p[key] for p in parts], dim=1)
        assert torch.equal(joined[:, :whole[key].shape[1]], whole[key]), key
    joined = torch.cat([p["labels"] for p in parts], dim=1)
    assert (joined[:, whole["labels"].shape[1]:] == IGNORE_INDEX).all()  # the extra padding trains nothing
    assert sum(int(p["num_tokens"]) for p in parts) == int(whole["num_tokens"]) == 26


def test_a_record_crossing_a_slice_boundary_keeps_its_targets() -> None:
    first, second = (collate(ROWS, pad_id=0, shard=(k, 2)) for k in range(2))
    assert first["labels"][0, -1] == first["input_ids"][0, -1] + 1 == second["input_ids"][0, 0]


def test_data_parallel_ranks_of_a_sequence_group() -> None:
    assert [data_parallel(r, 4, 2) for r in range(4)] == [((0, 2), (0, 2)), ((0, 2), (1, 2)),
                                                          ((1, 2), (0, 2)), ((1, 2), (1, 2))]


def test_attention_after_the_all_to_all_keeps_records_apart() -> None:
    """The attention after the all-to-all, on whole rows: each record (one of a single token, and a row's tail
    padding, numbered 0, 1, ... by collate) gets exactly the causal attention it would get alone."""
    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 3, 0, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 0]])
    q, k, v = (torch.randn(2, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    out, _ = packed_after_all_to_all(module, q, k, v, None, position_ids=pos, dropout=0.0, scaling=0.5)
    for row, records in enumerate([[(0, 4), (4, 5), (5, 8)], [(0, 5), (5, 7), (7, 8)]]):
        for lo, hi in records:
            alone = torch.nn.functional.scaled_dot_product_attention(
                *(t[row:row + 1, :, lo:hi] for t in (q, k, v)), is_causal=True, scale=0.5)
            assert torch.allclose(out[row, lo:hi], alone[0].transpose(0, 1), atol=1e-12), (row, lo, hi)


def cfg(*overrides: str):
    return to_object(_compose(*overrides))


@pytest.mark.parametrize("overrides, expected", [
    (("backend=fsdp",), "use backend=deepspeed_zero3"),
    (("backend=single",), "use backend=deepspeed_zero3"),
    (("backend=deepspeed_zero3", "model.attn_implementation=eager"), "needs model.attn_implementation=sdpa"),
])
def test_unsupported_setups_are_named(overrides, expected) -> None:
    with pytest.raises(ConfigError) as err:
        validate(cfg("parallel.sequence=2", *overrides))
    assert "parallel.sequence=2" in str(err.value) and expected in str(err.value)


def test_the_degree_must_divide_the_world_and_the_heads() -> None:
    c = cfg("backend=deepspeed_zero3", "parallel.sequence=3")  # tiny Llama: 4 heads, 2 key/value heads
    with pytest.raises(ConfigError) as err:
        check(c, 4)
    msg = str(err.value)
    assert "divide the number of workers, 4" in msg and "4 attention heads" in msg and "2 key/value heads" in msg
    check(cfg("backend=deepspeed_zero3", "parallel.sequence=2"), 4)  # fine


def test_the_launcher_refuses_before_any_worker(tmp_path) -> None:
    r = run_launcher("backend=deepspeed_zero3", "launcher.nproc_per_node=3", "parallel.sequence=2",
                     f"output_dir={tmp_path}", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "parallel.sequence=2: it must divide the number of workers, 3" in r.stderr
    assert "Traceback" not in r.stderr and not any(tmp_path.rglob("config.yaml"))
