"""Surgery on a suture hybrid: more attention layers replaced, everything already there carried over bit for bit,
the new mixers MIL-initialised from the original teacher (or the hybrid's own attention), in memory and streaming."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_source
from test_generation import _greedy_without_cache
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import suture
from suture.cli.app import app
from suture.io.parse import layer_index
from suture.surgery import SelectionSpec, hybridize, hybridize_model, mil_mixer, select_layers
from suture.surgery.importance import ImportanceReport, LayerScore

suture.register()
N = 6
FIRST = [0, 3]  # the source hybrid's mixers


def _load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype="auto", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def _layer(state: dict, i: int) -> dict:
    prefix = f"model.layers.{i}."
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The teacher, and a hybrid of it (mamba at FIRST) whose every weight has moved, as if distilled, saved with
    the surgery.json of the first surgery (as `suture distill` saves it)."""
    root = tmp_path_factory.mktemp("rehybridize")
    teacher = tiny_source("llama", num_hidden_layers=N)
    teacher.save_pretrained(root / "teacher")
    hybridize(root / "teacher", root / "first", FIRST, checksum=False)
    hybrid = _load(root / "first")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in hybrid.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    hybrid.save_pretrained(root / "trained")
    shutil.copy(root / "first" / "surgery.json", root / "trained" / "surgery.json")
    return root


def test_in_memory_carries_everything_over_and_builds_new_mixers_from_the_teacher(ckpts):
    teacher, hybrid = _load(ckpts / "teacher"), _load(ckpts / "trained")
    layout = [None, "mamba", None, "mamba", "mamba2", None]  # layer 3 already is mamba: carried over
    grown = hybridize_model(hybrid, layout, seed=5, teacher=teacher)
    own = hybridize_model(hybrid, layout, seed=5)
    assert grown.config.layer_types == ["mamba", "mamba", "full_attention", "mamba", "mamba2", "full_attention"]
    before, teacher_state = hybrid.state_dict(), teacher.state_dict()
    for result, init_state in ((grown, teacher_state), (own, before)):
        got = result.state_dict()
        for name, tensor in got.items():  # mixers, MLPs, norms, embeddings, kept attention: the trained ones
            if not (layer_index(name) in (1, 4) and ".mamba." in name):
                assert torch.equal(tensor, before[name]), name
        for i in (1, 4):  # the new mixers: exactly a fresh MIL mixer of the teacher's (or the hybrid's) layer
            fresh = mil_mixer(result.config, i, _layer(init_state, i), seed=5)
            for key, tensor in fresh.state_dict().items():
                assert torch.equal(got[f"model.layers.{i}.mamba.{key}"], tensor), (i, key)
    in_proj = "model.layers.1.mamba.in_proj.weight"
    assert not torch.equal(grown.state_dict()[in_proj], own.state_dict()[in_proj])  # the teacher's attention counts


@pytest.mark.parametrize("with_teacher", [True, False], ids=["teacher", "own-attention"])
def test_streamed_equals_in_memory_loads_and_generates_like_greedy_decoding(ckpts, tmp_path, with_teacher):
    teacher = ckpts / "teacher" if with_teacher else None
    result = hybridize(ckpts / "trained", tmp_path / "out", [1, 4], mixer="mamba2", teacher=teacher, seed=2,
                       max_shard_size="60KB")
    assert (result.replaced, result.carried) == ([1, 4], FIRST)
    streamed = _load(tmp_path / "out")
    reference = hybridize_model(_load(ckpts / "trained"), [None, "mamba2", None, None, "mamba2", None], seed=2,
                                teacher=_load(teacher) if with_teacher else None)
    got, want = streamed.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name

    prompt = torch.randint(3, 97, (7,), generator=torch.Generator().manual_seed(0))
    tokens, _ = _greedy_without_cache(streamed, prompt, 10)
    generated = streamed.generate(prompt[None], attention_mask=torch.ones(1, 7, dtype=torch.long),
                                  max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert generated[0, 7:].tolist() == tokens

    record = json.loads((tmp_path / "out" / "surgery.json").read_text())
    lineage = record["lineage"]
    assert lineage["source_hybrid"]["layer_types"] == ["mamba", "full_attention", "full_attention", "mamba",
                                                       "full_attention", "full_attention"]
    assert lineage["source_hybrid"]["surgery"]["source"]["name"] == "teacher"  # the first surgery's own record
    assert lineage["carried_over"] == FIRST
    assert lineage["newly_replaced"] == [{"index": 1, "reason": None}, {"index": 4, "reason": None}]  # a plain list
    assert lineage["mil_init_from"] == ("teacher" if with_teacher else "source")
    assert (lineage["teacher"] or {}).get("path") == (str(teacher.resolve()) if with_teacher else None)
    assert record["source"]["model_type"] == "suture_hybrid"
    assert [row["carried_over"] for row in record["layers"]] == [True, False, False, True, False, False]
    assert record["layers"][0]["reason"] == "carried over from trained"
    assert sorted({n.split(".self_attn.")[0] for n in record["dropped_source_tensors"]}) == [
        "model.layers.1", "model.layers.4"]  # only the newly replaced attention is dropped
    card = (tmp_path / "out" / "README.md").read_text()
    assert "from the suture hybrid `trained` (itself made from `teacher`)" in card and "carried over" in card


def test_selection_on_a_hybrid_source_counts_and_skips_its_mixers(ckpts, tmp_path):
    chosen = select_layers(N, mamba_layers=[0, 1], replaced=FIRST)  # 0 is a mixer already: nothing changes there
    assert chosen.replace == [1] and chosen.detail == {"mamba_layers": [0, 1]}
    assert select_layers(N, keep_attention=[2, 5], replaced=FIRST).replace == [1, 4]
    assert select_layers(N, ratio=4 / 6, replaced=FIRST).replace == [1, 4]  # 2 more, evenly among 1, 2, 4, 5
    assert select_layers(N, preset="mil-50", replaced=[0, 2]).replace == [4]  # keeps 1, 3, 5
    scores = {i: float(i) for i in range(N)}  # e.g. a report scored on the teacher: the mixers 0 and 3 are skipped
    by_importance = select_layers(N, ratio=0.5, scores=scores, replaced=FIRST)
    assert by_importance.replace == [1] and by_importance.reasons[1].startswith("importance rank 1 of 4")

    report = ImportanceReport("trained", "workload", ["loo"], 1, 1, "mamba",
                              [LayerScore(i, "full_attention", {"loo": s}) for i, s in ((1, 0.3), (2, 0.1), (4, 0.2),
                                                                                         (5, 0.4))])
    result = hybridize(ckpts / "trained", tmp_path / "imp", SelectionSpec(ratio=4 / 6, select="importance",
                                                                         importance=report), checksum=False)
    assert result.replaced == [2, 4] and result.layer_types[2] == result.layer_types[4] == "mamba"
    assert result.surgery["lineage"]["newly_replaced"][0]["reason"].startswith("importance rank 1 of 4")
    kept = hybridize(ckpts / "trained", tmp_path / "kept", SelectionSpec(keep_attention="5"), checksum=False)
    assert kept.replaced == [1, 2, 4] and kept.carried == FIRST


@pytest.mark.parametrize("selection, mixer, message", [
    (SelectionSpec(ratio=2 / 6), "mamba", r"--ratio 0.333.* = 2 of 6 layers mixers, but the source already has 2 of 6 "
                                          r"layers replaced: pass a larger ratio \(--ratio 0.5 replaces one more"),
    (SelectionSpec(preset="m1"), "mamba", r"--preset m1 keeps attention at layers \[3\], which the source hybrid has "
                                          "already replaced"),
    (SelectionSpec(keep_attention=[0, 5]), "mamba", r"--keep-attention lists layers \[0\], which the source hybrid"),
    (SelectionSpec(mamba_layers=[0, 3]), "mamba", r"lists only layers the source has replaced already \(\[0, 3\]\)"),
    (SelectionSpec(mamba_layers=[0, 1]), "mamba2", r"--mamba-layers lists layers \[0\], which .* already has as "
                                                   "mamba mixers, not mamba2"),
    ([0, 1], "mamba2", r"layer 0 of the source hybrid already is a 'mamba' layer, .* pass None \(or 'mamba'\)"),
])
def test_selections_a_hybrid_source_cannot_take_are_refused(ckpts, tmp_path, selection, mixer, message):
    with pytest.raises(ValueError, match=message):
        hybridize(ckpts / "trained", tmp_path / "out", selection, mixer=mixer)
    assert not (tmp_path / "out").exists()


def test_layer_types_and_settings_a_hybrid_cannot_take_are_refused(ckpts):
    hybrid = _load(ckpts / "trained")
    for layout, message in [
        (["full_attention", None, None, None, None, None], "layer 0 of the source hybrid already is a 'mamba' layer, "
                                                           "which surgery carries over and cannot make attention"),
        ([None, None, None, "mamba2", None, None], "cannot make a 'mamba2' layer"),
        ([None, "sliding_attention", None, None, None, None], "it cannot become 'sliding_attention'"),
        ([None] * 5, "has 5 entries but the source hybrid has 6 layers"),
    ]:
        with pytest.raises(ValueError, match=message):
            hybridize_model(hybrid, layout)
    with pytest.raises(ValueError, match=r"mamba_d_state=8 differs from the source hybrid's mamba_d_state=16"):
        hybridize_model(hybrid, [None, "mamba", None, None, None, None], mamba_d_state=8)
    assert hybridize_model(hybrid, [None, "mamba", None, None, None, None], mamba_d_state=16).config.mamba_d_state == 16
    with pytest.raises(ValueError, match="applies to a hybrid source only"):
        hybridize_model(_load(ckpts / "teacher"), [None, "mamba", None, None, None, None], teacher=hybrid)


@pytest.mark.parametrize("teacher_kwargs, message", [
    (dict(num_key_value_heads=4), r"tensor 'model.layers.1.self_attn.v_proj.weight' has shape \[64, 64\], but layer "
                                  r"1's mamba mixer needs \[32, 64\]"),
    (dict(num_hidden_layers=4), r"`num_hidden_layers` is 4, the hybrid's is 6"),
    (dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1), r"`hidden_size` is 32, the hybrid's is 64"),
])
def test_a_teacher_that_does_not_fit_is_refused(ckpts, tmp_path, teacher_kwargs, message):
    tiny_source("llama", **{"num_hidden_layers": N, **teacher_kwargs}).save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match=message):
        hybridize(ckpts / "trained", tmp_path / "out", [1], teacher=tmp_path / "wrong")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is a suture hybrid: pass the original transformer"):
        hybridize(ckpts / "trained", tmp_path / "out", [1], teacher=ckpts / "first")
    with pytest.raises(ValueError, match="A teacher applies to a hybrid source only"):
        hybridize(ckpts / "teacher", tmp_path / "out", [1], teacher=ckpts / "teacher")
    assert not (tmp_path / "out").exists()


def test_cli_hybridizes_a_hybrid_further_with_a_teacher(ckpts, tmp_path):
    runner = CliRunner()
    args = ["hybridize", str(ckpts / "trained"), str(tmp_path / "out"), "--ratio", "0.5",
            "--teacher", str(ckpts / "teacher")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 of 6 layers replaced by mamba, 2 mixer layers carried over" in " ".join(result.output.split())
    assert "carried over from trained" in result.output and "newly replaced: ratio 0.5" in result.output
    record = json.loads((tmp_path / "out" / "surgery.json").read_text())
    lineage = record["lineage"]
    assert lineage["carried_over"] == FIRST and [e["index"] for e in lineage["newly_replaced"]] == [2]
    assert lineage["teacher"]["sha256"].keys() == {"model.safetensors"}  # checksummed like the source
    assert lineage["teacher"]["model_type"] == "llama" and lineage["mil_init_from"] == "teacher"
    assert _load(tmp_path / "out").config.layer_types[2] == "mamba"  # evenly spaced among 1, 2, 4, 5

    before = (ckpts / "teacher" / "model.safetensors").read_bytes()
    forced = runner.invoke(app, [*args[:2], str(ckpts / "teacher"), *args[3:], "--force"])
    assert forced.exit_code == 1 and "error:" in forced.output  # --force never replaces an input
    assert (ckpts / "teacher" / "model.safetensors").read_bytes() == before
