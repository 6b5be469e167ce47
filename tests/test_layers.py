"""Layer selection: explicit lists, ratios, the published presets, importance ranking and their errors."""

import pytest

from suture.surgery import PRESETS, parse_layer_list, select_layers
from suture.surgery.layers import evenly_kept


def kept(selection, n):
    return [i for i in range(n) if i not in selection.replace]


def test_m1_preset_reproduces_the_published_layout():
    # M1-3B (Llama-3.2-3B, 28 layers) kept attention at [3, 8, 13, 18, 23, 27].
    assert kept(select_layers(28, preset="m1"), 28) == [3, 8, 13, 18, 23, 27]


@pytest.mark.parametrize("preset, ratio, expected", [
    ("mil-50", 0.5, list(range(1, 32, 2))),
    ("mil-75", 0.75, [3, 7, 11, 15, 19, 23, 27, 31]),
    ("mil-87.5", 0.875, [7, 15, 23, 31]),
])
def test_mambainllama_presets_and_ratios_agree_at_32_layers(preset, ratio, expected):
    assert kept(select_layers(32, preset=preset), 32) == expected
    assert kept(select_layers(32, ratio=ratio), 32) == expected


def test_ratio_keeps_the_last_layer_and_counts_right():
    for n in (4, 7, 28, 50):
        for ratio in (0.25, 0.5, 0.6, 0.9):
            selection = select_layers(n, ratio=ratio)
            assert len(selection.replace) == round(ratio * n)
            if len(selection.replace) < n:
                assert n - 1 not in selection.replace
    assert select_layers(6, ratio=1.0).replace == list(range(6))
    assert evenly_kept(10, 0) == []


def test_explicit_and_keep_attention():
    assert select_layers(8, mamba_layers=[5, 0, 2]).replace == [0, 2, 5]
    selection = select_layers(8, keep_attention=[3, 7])
    assert selection.replace == [0, 1, 2, 4, 5, 6] and selection.method == "keep-attention"
    assert selection.reasons[0] == "not kept"


def test_importance_replaces_the_least_important_layers():
    scores = {0: 0.9, 1: 0.01, 2: 0.5, 3: 0.02}
    selection = select_layers(4, ratio=0.5, scores=scores)
    assert selection.replace == [1, 3] and selection.method == "importance"
    assert "rank 1 of 4" in selection.reasons[1]


def test_parse_layer_list():
    assert parse_layer_list("0,2, 5-7") == [0, 2, 5, 6, 7]
    assert parse_layer_list("4 - 5,") == [4, 5]
    assert parse_layer_list("") == []
    with pytest.raises(ValueError, match="'0,2,5-7'"):
        parse_layer_list("a-b")


@pytest.mark.parametrize("text, message", [
    ("3-1", r"layer list '3-1': the range '3-1' runs backwards; write it as '1-3'"),
    ("0,5-2", r"the range '5-2' runs backwards"),
    ("-1", r"'-1' is not a layer index or range; layer indices count from 0 and cannot be negative"),
    ("0,-2", r"'-2' is not a layer index"),
    ("1.5", r"'1.5' is not a layer index or range; use indices and ranges such as '0,2,5-7'"),
    ("2-", r"'2-' is not a layer index"),
    ("1-2-3", r"'1-2-3' is not a layer index"),
])
def test_parse_layer_list_refuses_what_it_cannot_read(text, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_list(text)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mamba_layers=[0, 8]), r"\[8\] are out of range; the model has 8 layers"),
    (dict(mamba_layers=[-1]), "out of range"),
    (dict(keep_attention=[1, 1]), r"\[1\] are listed more than once"),
    (dict(ratio=0.0), "must be in"),
    (dict(ratio=1.5), "must be in"),
    (dict(preset="jamba"), "Unknown preset 'jamba'"),
    (dict(), "exactly one way"),
    (dict(ratio=0.5, preset="m1"), "got ratio, preset"),
    (dict(mamba_layers=[1], scores={1: 0.0}), "together with a ratio"),
    (dict(ratio=1.0, scores={1: 0.0}), "only 1 have scores"),
])
def test_selection_errors_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_layers(8, **kwargs)


@pytest.mark.parametrize("n, kwargs, message", [
    (4, dict(mamba_layers=[]), r"--mamba-layers lists no layer, so nothing would be replaced: name at least one"),
    (4, dict(keep_attention=[0, 1, 2, 3]), r"--keep-attention keeps all 4 layers, so nothing would be replaced"),
    (4, dict(ratio=0.1), r"--ratio 0\.1 replaces round\(0\.1 \* 4\) = 0 of 4 layers, so nothing would be replaced: "
                         r"pass a larger ratio \(--ratio 0\.25 replaces one layer\)"),
    (4, dict(ratio=0.1, scores={0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}), r"= 0 of 4 layers"),
    (1, dict(preset="m1"), r"--preset m1 keeps attention at all 1 layers of this model, so nothing would be replaced"),
])
def test_a_selection_that_replaces_nothing_is_refused(n, kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_layers(n, **kwargs)


def test_the_suggested_smallest_ratio_replaces_one_layer():
    for n in (3, 4, 7, 28, 80):
        ratio = float(f"{1 / n:.4g}")
        assert len(select_layers(n, ratio=ratio).replace) == 1, n


def test_every_preset_is_documented_and_keeps_the_last_layer():
    for name, (rule, description) in PRESETS.items():
        assert description
        assert 31 in rule(32), name
