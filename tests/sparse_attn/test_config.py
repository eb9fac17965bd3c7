"""Head patterns, per-model configs and the head search's choice."""

from __future__ import annotations


import pytest
import torch

from kvtier.sparse_attn.config import HeadPattern, SparseConfig, SparseConfigError, load_config
from kvtier.sparse_attn.search import choose, search_config


def test_unknown_pattern_name_is_a_clear_error():
    with pytest.raises(SparseConfigError, match="unknown sparse pattern 'diagonal'.*a_shape, vertical_slash, block_sparse"):
        HeadPattern("diagonal")
    with pytest.raises(SparseConfigError, match="unknown sparse pattern"):
        SparseConfig.from_json('{"model": "m", "num_heads": 1, "layers": [[{"kind": "tri_shape"}]]}')


@pytest.mark.parametrize("kwargs,message", [
    ({"kind": "a_shape", "sink": 64}, "needs"),
    ({"kind": "a_shape", "sink": 64, "local": 10, "mass": 0.9}, "takes"),
    ({"kind": "vertical_slash", "vertical": -1, "slash": 10}, "non-negative"),
    ({"kind": "block_sparse", "mass": 1.5}, "mass must be in"),
    ({"kind": "block_sparse", "blocks": 2.5}, "non-negative integer"),
    ({"kind": "block_sparse", "mass": 0.9, "pool": 1}, "pool must be true or false"),
    ({"kind": "dense", "pool": True}, "takes"),
    ({"kind": "block_sparse", "mass": 0.9, "pool_shift": 1.0}, "pool_shift must be a finite number"),
    ({"kind": "block_sparse", "mass": 0.9, "pool": True, "pool_shift": float("nan")}, "pool_shift must be a finite"),
    ({"kind": "block_sparse", "mass": 0.9, "pool": True, "pool_shift": "1"}, "pool_shift must be a finite number"),
    ({"kind": "dense", "pool_shift": 1.0}, "takes"),
])
def test_bad_pattern_fields(kwargs, message):
    with pytest.raises(SparseConfigError, match=message):
        HeadPattern(**kwargs)


def test_config_round_trips_through_json(tmp_path):
    config = SparseConfig("m", 2, [[HeadPattern("a_shape", sink=64, local=128), HeadPattern("vertical_slash", mass=0.9)],
                                   [HeadPattern("block_sparse", blocks=4, pool=True, pool_shift=1.0),
                                    HeadPattern("vertical_slash", vertical=10, slash=20, pool=True, pool_shift=-0.5)]],
                          {"note": "x"})
    config.save(tmp_path / "c.json")
    again = load_config(tmp_path / "c.json")
    assert again.layers == config.layers and again.info == config.info and again.num_layers == 2


def test_config_shape_errors():
    with pytest.raises(SparseConfigError, match="every layer needs 2 head patterns"):
        SparseConfig("m", 2, [[HeadPattern("block_sparse", blocks=1)]])
    config = SparseConfig("m", 1, [[HeadPattern("block_sparse", blocks=1)]])
    with pytest.raises(SparseConfigError, match=r"is for 'm' \(1 layers x 1 heads\); the model has 30 layers x 9 heads"):
        config.check_model(30, 9)
    with pytest.raises(SparseConfigError, match="no sparse config 'llama-70b'; shipped configs: .*smollm2-135m"):
        load_config("llama-70b")
    with pytest.raises(SparseConfigError, match="not a kvtier sparse config"):
        SparseConfig.from_json("[1, 2]")


def test_shipped_smollm2_config():
    config = load_config("smollm2-135m")
    assert config.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (config.num_layers, config.num_heads) == (30, 9)
    config.check_model(30, 9)


def test_choose_keeps_mean_density_within_budget_and_prefers_recall():
    recall = torch.tensor([[[0.5, 0.6], [0.9, 0.99], [1.0, 1.0]]], dtype=torch.float64)  # [layer, candidate, head]
    density = torch.tensor([[[0.1, 0.1], [0.3, 0.3], [1.0, 1.0]]], dtype=torch.float64)
    assert choose(recall, density, 1.0).tolist() == [[2, 2]]
    assert choose(recall, density, 0.3).tolist() == [[1, 1]]
    assert choose(recall, density, 0.2).tolist() == [[1, 0]]  # head 0 gains more (0.4) from the costlier one
    assert choose(recall, density, 0.05).tolist() == [[0, 0]]


def test_dense_pattern_takes_no_fields():
    assert HeadPattern("dense").label() == "dense()"
    with pytest.raises(SparseConfigError, match="takes"):
        HeadPattern("dense", local=64)


def tiny_llama(heads: int):
    """A real (random, tiny) transformers model with ``heads`` attention heads: what the search reads of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16 * heads, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=heads, num_key_value_heads=heads, head_dim=16))


def test_search_picks_the_least_output_error_within_the_budget():
    model = tiny_llama(heads=2)
    candidates = (HeadPattern("a_shape", sink=64, local=256), HeadPattern("vertical_slash", mass=0.9),
                  HeadPattern("dense"))
    error = torch.tensor([[[0.5, 0.1], [0.2, 0.05], [0.0, 0.0]]], dtype=torch.float64)  # [layer, candidate, head]
    density = torch.tensor([[[0.1, 0.1], [0.3, 0.3], [1.0, 1.0]]], dtype=torch.float64)
    config = search_config(model, torch.zeros(1, 8192), "m", 0.2, candidates, (error, density))
    assert config.layers == [[candidates[1], candidates[0]]]  # head 0 loses more error (0.3) from the costlier one
    assert config.info["mean_error"] == pytest.approx(0.15) and config.info["mean_density"] == pytest.approx(0.2)
    assert search_config(model, torch.zeros(1, 8192), "m", 1.0, candidates, (error, density)).layers == [[candidates[2]] * 2]


def test_search_with_pool_gives_every_sparse_head_pooled_keys():
    model = tiny_llama(heads=2)
    candidates = (HeadPattern("a_shape", sink=64, local=256), HeadPattern("dense"))
    error = torch.tensor([[[0.5, 0.1], [0.0, 0.0]]], dtype=torch.float64)
    density = torch.tensor([[[0.1, 0.1], [1.0, 1.0]]], dtype=torch.float64)
    config = search_config(model, torch.zeros(1, 8192), "m", 0.55, candidates, (error, density), pool=True)
    assert config.layers == [[HeadPattern("dense"), HeadPattern("a_shape", sink=64, local=256, pool=True)]]
    assert config.info["pool"] is True


def test_search_pool_shift_sets_the_first_layer_apart():
    model = tiny_llama(heads=1)
    candidates = (HeadPattern("a_shape", sink=64, local=256), HeadPattern("dense"))
    error = torch.tensor([[[0.1], [0.0]]] * 3, dtype=torch.float64)  # 3 layers, one head
    density = torch.tensor([[[0.1], [1.0]]] * 3, dtype=torch.float64)
    config = search_config(model, torch.zeros(1, 8192), "m", 0.2, candidates, (error, density), pool=True,
                           pool_shift=(2.0, -0.5))
    assert [layer[0].pool_shift for layer in config.layers] == [2.0, -0.5, -0.5]
    assert config.info["pool_shift"] == [2.0, -0.5]
