"""Bad input gets one clear error naming the field and the fix — before any process starts."""

import pytest

from suanli.infra.config import ConfigError, load_config, parse_set, to_toml
from suanli.infra.model import ModelConfig, preset
from suanli.infra.pipeline import build_stage_module, split_layers, stage_ids_for_rank
from suanli.infra.tensor_parallel import check_tp_degree


def test_unknown_key_and_section_are_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key train.stepz; known keys in \[train\]"):
        load_config(bad)
    bad.write_text("[trian]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]"):
        load_config(bad)


def test_wrong_types_name_the_key():
    with pytest.raises(ConfigError, match="train.steps: expected int, got str"):
        load_config(None, ['train.steps="ten"'])
    with pytest.raises(ConfigError, match="train.lr: expected float, got bool"):
        load_config(None, ["train.lr=true"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["steps=3"])


def test_value_checks_name_the_field():
    with pytest.raises(ConfigError, match="train.micro_batch: 3 does not divide train.global_batch=16"):
        load_config(None, ["train.micro_batch=3"])
    with pytest.raises(ConfigError, match="parallel.pp_schedule: 'zb' is not one of"):
        load_config(None, ['parallel.pp_schedule="zb"'])
    with pytest.raises(ConfigError, match="model.preset: unknown preset 'huge'"):
        from suanli.infra.config import model_config

        model_config(load_config(None, ['model.preset="huge"']))


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(None, ["train.steps=7", "parallel.pp_layers=[1,3]", "train.lr=1", 'model.preset="125m"'])
    assert cfg.train.steps == 7 and cfg.parallel.pp_layers == [1, 3] and cfg.train.lr == 1.0
    path = tmp_path / "effective.toml"
    path.write_text(to_toml(cfg))
    again = load_config(path)
    assert again == cfg
    assert parse_set(['train.run_dir="runs/x"']) == {"train": {"run_dir": "runs/x"}}


def test_tp_degree_errors_say_what_fits():
    cfg = preset("tiny")  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match=r"parallel.tp: 3 does not divide model.n_heads=4; tp can be one of \[1, 2\]"):
        check_tp_degree(cfg, 3)
    with pytest.raises(ValueError, match=r"parallel.tp: 4 does not divide model.n_kv_heads=2 \(grouped-query"):
        check_tp_degree(cfg, 4)
    check_tp_degree(cfg, 2)
    with pytest.raises(ValueError, match="model.n_heads: dim=100 is not divisible by n_heads=8"):
        ModelConfig(dim=100, n_heads=8)


def test_pipeline_split_errors_never_drop_a_layer():
    with pytest.raises(ValueError, match=r"parallel.pp_layers: \[2, 3\] sums to 5 but model.n_layers=4"):
        split_layers(4, 2, [2, 3])
    with pytest.raises(ValueError, match="empty stage"):
        split_layers(4, 2, [0, 4])
    with pytest.raises(ValueError, match="has 3 entries but there are 2 pipeline stages"):
        split_layers(4, 2, [1, 1, 2])
    with pytest.raises(ValueError, match="parallel.pp: 5 pipeline stages but model.n_layers=4"):
        split_layers(4, 5, [])
    # uniform: extra layers go to the middle stages; every layer is placed exactly once
    assert split_layers(10, 4, []) == [2, 3, 3, 2]
    assert sum(split_layers(7, 3, [])) == 7


def test_auto_split_balances_compute():
    # A huge head makes the last stage expensive: auto must give it fewer layers.
    counts = split_layers(8, 2, "auto", costs=(0.0, 1.0, 3.0))
    assert sum(counts) == 8 and counts[1] < counts[0]
    assert counts == [5, 3] or counts == [6, 2]


def test_stage_placement_and_tied_embeddings():
    assert stage_ids_for_rank(0, 2, "zbv", 2) == [0, 3]
    assert stage_ids_for_rank(1, 2, "interleaved-1f1b", 2) == [1, 3]
    from suanli.infra.model import Transformer

    tied = Transformer(preset("tiny", tie_embeddings=True))
    with pytest.raises(ValueError, match="model.tie_embeddings"):
        build_stage_module(tied, 0, 2, [2, 2])
    stage = build_stage_module(Transformer(preset("tiny")), 1, 2, [1, 3])
    assert list(stage.layers.keys()) == ["1", "2", "3"] and stage.tok_embeddings is None and stage.output is not None
