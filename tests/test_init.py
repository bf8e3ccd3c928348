"""suanli.init on 4 real gloo processes: coordinates and sub-mesh collectives for each layout."""

import itertools

import pytest

from conftest import json_lines, run_workers
from suanli.infra.distributed import MESH_DIMS, ParallelConfig


def expected(shape: tuple[int, ...]) -> dict[int, dict]:
    """Row-major rank layout over (pp, dp_replicate, dp_shard, tp), and for each rank the sum of
    ranks that share all coordinates but one (what an all-reduce on that sub-mesh returns)."""
    coords = list(itertools.product(*[range(n) for n in shape]))
    out = {}
    for rank, c in enumerate(coords):
        sums = {}
        for i, dim in enumerate(MESH_DIMS):
            sums[dim] = float(sum(r for r, o in enumerate(coords) if all(o[j] == c[j] for j in range(4) if j != i)))
        sums["dp"] = float(sum(r for r, o in enumerate(coords) if o[0] == c[0] and o[3] == c[3]))
        out[rank] = {"coords": dict(zip(MESH_DIMS, c)), "sums": sums, "dp_rank": c[1] * shape[2] + c[2]}
    return out


@pytest.mark.parametrize("pp,tp,dp_replicate", [(2, 2, 1), (4, 1, 1), (1, 4, 1), (1, 2, 1), (1, 1, 2)],
                         ids=["pp2xtp2", "pp4", "tp4", "dp2xtp2", "hsdp2x2"])
def test_mesh_coordinates_and_collectives(pp, tp, dp_replicate):
    world = 4
    dp_shard = world // (pp * tp * dp_replicate)
    want = expected((pp, dp_replicate, dp_shard, tp))
    outs = run_workers("mesh_worker.py", world, pp, tp, dp_replicate)
    for out in outs:
        (res,) = json_lines(out, "RESULT")
        w = want[res["rank"]]
        assert res["backend"] == "gloo"
        assert res["coords"] == w["coords"]
        assert res["dp_rank"] == w["dp_rank"] and res["dp_size"] == dp_replicate * dp_shard
        assert res["sums"] == w["sums"], (res["rank"], res["sums"], w["sums"])


def test_degrees_that_do_not_multiply_name_the_fix():
    with pytest.raises(ValueError, match=r"parallel: tp\*pp\*dp_replicate = 3\*1\*1 = 3 does not divide the world size 4"):
        ParallelConfig(tp=3).resolve(4)
    with pytest.raises(ValueError, match="parallel.dp_shard"):
        ParallelConfig(dp_shard=0).resolve(4)
    with pytest.raises(ValueError, match="but the world size is 4"):
        ParallelConfig(tp=2, dp_shard=4).resolve(4)
    with pytest.raises(ValueError, match="parallel.tp: must be an integer >= 1"):
        ParallelConfig(tp=0).resolve(4)
    assert ParallelConfig(tp=2).resolve(8).dp_shard == 4
