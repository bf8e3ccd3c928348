"""The low-bandwidth all-reduces on 4 real gloo processes (2 "nodes" × 2 ranks)."""

import pytest

from conftest import json_lines, run_workers


@pytest.fixture(scope="module")
def result():
    (res,) = json_lines(run_workers("lowbw_collectives_worker.py", 4)[0], "RESULT")
    return res


def test_hierarchical_equals_flat(result):
    assert result["hier_shape"] == [2, 2, 2, 2]          # intra size, inter size, per node, nodes
    assert result["exact_equal"]                         # exact on sums that round-trip exactly
    assert result["random_maxdiff"] <= 1e-6 * max(1.0, result["random_scale"])
    assert result["hostname_shape"] == [4, 1] and result["hostname_maxdiff"] <= 1e-6
    assert result["hier_int8_maxerr"] < 0.05             # int8 only on the inter-node hop


def test_int8_allreduce_error_bound_and_bytes(result):
    assert result["int8_err_over_bound"] <= 1.0
    assert result["int8_replicas_identical"]
    # one byte per element plus a 4-byte scale per 64: about 1/3.8 of fp32
    assert result["int8_bytes"] < 0.27 * result["fp32_bytes"]


def test_error_feedback_keeps_accumulated_error_bounded(result):
    with_ef, without = result["acc_err_ef_True"], result["acc_err_ef_False"]
    bound = result["one_step_bound"]
    assert max(with_ef) <= bound                          # bounded at every step, not growing
    assert max(with_ef[-10:]) <= max(with_ef[:10]) * 2 + 1e-6
    assert without[-1] > 10 * max(with_ef)                # dropping the residual accumulates
    assert without[-1] > without[len(without) // 2] * 1.5
