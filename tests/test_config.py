import pytest

from oboro.oboro_model import OboroConfig, head_schedule, parse_heads, preset


def test_head_schedule_equal_groups():
    assert head_schedule(32) == (8,) * 8 + (16,) * 8 + (24,) * 8 + (48,) * 8
    assert head_schedule(4, (1, 2)) == (1, 1, 2, 2)


def test_head_schedule_uneven_depth_never_narrows():
    hs = head_schedule(10)
    assert len(hs) == 10 and list(hs) == sorted(hs) and set(hs) == {8, 16, 24, 48}


def test_parse_heads_forms():
    assert parse_heads("8,16,24,48", 8) == (8, 8, 16, 16, 24, 24, 48, 48)
    assert parse_heads("16", 3) == (16, 16, 16)
    assert parse_heads("1,2,3", 3) == (1, 2, 3)


def test_base_preset_matches_paper():
    cfg = preset("oboro-base-1b")
    assert cfg.depth == 32 and cfg.hidden_size == 1536
    assert sorted(set(cfg.head_dims)) == [32, 64, 96, 192]
    assert cfg.head_dims[0] == 192 and cfg.head_dims[-1] == 32


def test_heads_must_divide_hidden():
    with pytest.raises(ValueError, match=r"layer 1: 5 heads do not divide hidden_size 64"):
        OboroConfig(hidden_size=64, depth=2, heads=(2, 5), mlp_hidden=128)


def test_head_dim_must_be_rope_compatible():
    # 96 / 12 = 8: cannot be split 2:3:3 into even parts.
    with pytest.raises(ValueError, match=r"head dim 8 cannot be split"):
        OboroConfig(hidden_size=96, depth=1, heads=(12,), mlp_hidden=128)


def test_depth_and_heads_length_must_agree():
    with pytest.raises(ValueError, match="heads lists 2 layers but depth is 3"):
        OboroConfig(hidden_size=64, depth=3, heads=(1, 2))


def test_dict_round_trip_and_unknown_field():
    cfg = preset("tiny")
    assert OboroConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown OboroConfig fields"):
        OboroConfig.from_dict({**cfg.to_dict(), "bogus": 1})
