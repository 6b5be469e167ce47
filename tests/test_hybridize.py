"""Streaming checkpoint -> hybrid surgery: bit-exact transfer, identity of untouched tensors, outputs, bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import FAMILY_NAMES, tiny_source
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import suture
from suture.io.checkpoint import CheckpointReader, ShardedSafetensorsWriter
from suture.cli.app import app
from suture.surgery import ImportanceReport, LayerSelection, SelectionSpec, hybridize, hybridize_model, select_layers
from suture.workload import build_tokenizer

REPLACED = [0, 2]
suture.register()  # AutoModelForCausalLM loads the hybrids written here


def _save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


def _load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype="auto", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
def test_streamed_hybrid_equals_in_memory_surgery_and_keeps_every_other_tensor(tmp_path, family, mixer):
    source = tiny_source(family)
    src = _save(source, tmp_path / "src", max_shard_size="100KB")  # sharded source
    result = hybridize(src, tmp_path / "out", REPLACED, mixer=mixer, seed=7, max_shard_size="80KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # sharded output
    assert result.replaced == REPLACED
    hybrid = _load(tmp_path / "out")
    assert hybrid.config.layer_types == [mixer, hybrid.config.layer_types[1], mixer, hybrid.config.layer_types[3]]

    reference = hybridize_model(source, [mixer if i in REPLACED else None for i in range(4)], seed=7)
    got, want, src_state = hybrid.state_dict(), reference.state_dict(), source.state_dict()
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name
        if ".mamba." not in name:  # embeddings, kept layers, MLPs, norms, head: identical to the source
            assert torch.equal(got[name], src_state[name]), name

    cfg = hybrid.config
    q_width, kv_width = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for i in REPLACED:
        mixer_module = hybrid.model.layers[i].mamba
        attn = {p: src_state[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkvo"}
        rows = mixer_module.in_proj.weight[q_width:]  # [z | x | B | C | dt]: skip the gate z (d_inner = q width)
        assert torch.equal(rows[:kv_width], attn["v"])  # V -> x
        assert torch.equal(rows[kv_width : 2 * kv_width], attn["k"])  # K -> B
        assert torch.equal(rows[2 * kv_width : 2 * kv_width + q_width], attn["q"])  # Q -> C
        assert torch.equal(mixer_module.out_proj.weight, attn["o"])  # O -> out_proj

    ids = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hybrid(ids).logits, reference.eval()(ids).logits)


def test_surgery_record_model_card_and_copied_files(tmp_path):
    tokenizer = build_tokenizer()
    source = tiny_source("qwen2", vocab_size=len(tokenizer))
    src = _save(source, tmp_path / "src")
    tokenizer.save_pretrained(src)
    selection = select_layers(4, keep_attention=[3])
    hybridize(src, tmp_path / "out", selection, mixer="mamba2")
    out = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "surgery.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "surgery.json").read_text())
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert record["source"]["sha256"] == {"model.safetensors": digest}
    assert record["selection"] == {"method": "keep-attention", "keep_attention": [3]}
    assert [row["replaced"] for row in record["layers"]] == [True, True, True, False]
    assert record["layers"][0]["reason"] == "not kept"
    dropped = set(record["dropped_source_tensors"])
    for i in range(3):  # the replaced attention, including Qwen2's q/k/v biases, is accounted for
        for p in "qkvo":
            assert f"model.layers.{i}.self_attn.{p}_proj.weight" in dropped
        assert f"model.layers.{i}.self_attn.q_proj.bias" in dropped
    assert not any(".layers.3." in n for n in dropped)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "| 3 | full_attention |" in card and "suture.register()" in card


def test_tied_embeddings_and_dtype_cast(tmp_path):
    source = tiny_source("llama", tie_word_embeddings=True)
    src = _save(source, tmp_path / "src")
    hybridize(src, tmp_path / "out", [1], dtype="bfloat16")
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    hybrid = _load(tmp_path / "out")
    assert hybrid.lm_head.weight.data_ptr() == hybrid.model.embed_tokens.weight.data_ptr()
    assert torch.equal(hybrid.model.embed_tokens.weight, source.model.embed_tokens.weight.bfloat16())


def test_pickle_source_needs_opt_in_and_then_matches(tmp_path):
    source = tiny_source("llama")
    src = tmp_path / "src"
    source.save_pretrained(src)
    (src / "model.safetensors").unlink()
    torch.save(source.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="--allow-pickle"):
        hybridize(src, tmp_path / "out", [0])
    assert not (tmp_path / "out").exists()
    hybridize(src, tmp_path / "out", [0], allow_pickle=True)
    reference = hybridize_model(source, ["mamba", None, None, None])
    got = _load(tmp_path / "out").state_dict()
    assert all(torch.equal(got[n], t) for n, t in reference.state_dict().items())


def _tamper(src, edit):
    weights = load_file(src / "model.safetensors")
    edit(weights)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop("model.layers.1.mlp.up_proj.weight"), r"lacks 1 tensors .*mlp\.up_proj"),
    (lambda w: w.update({"model.layers.9.extra.weight": torch.zeros(2)}), r"holds 1 tensors its config does not"),
    (lambda w: w.update({"model.norm.weight": torch.ones(65)}), r"'model\.norm\.weight' has shape \[65\]"),
])
def test_checkpoints_that_do_not_match_their_config_are_refused(tmp_path, edit, message):
    src = _save(tiny_source("llama"), tmp_path / "src")
    _tamper(src, edit)
    with pytest.raises(ValueError, match=message):
        hybridize(src, tmp_path / "out", [0])
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


@pytest.mark.parametrize("stored_head", ["equal", "different"])
def test_tied_source_that_also_stores_lm_head_becomes_the_hybrid_transformers_would_load(tmp_path, stored_head):
    source = tiny_source("llama", tie_word_embeddings=True)
    src = _save(source, tmp_path / "src")
    embedding = source.model.embed_tokens.weight.detach()
    head = embedding.clone() if stored_head == "equal" else torch.randn(embedding.shape) * 0.1
    _tamper(src, lambda w: w.update({"lm_head.weight": head}))
    # transformers ties only a stored head equal to the embedding; a different one it loads untied, as stored.
    teacher = AutoModelForCausalLM.from_pretrained(src).eval()
    assert (teacher.lm_head.weight is teacher.model.embed_tokens.weight) == (stored_head == "equal")
    assert torch.equal(teacher.lm_head.weight, head) and torch.equal(teacher.model.embed_tokens.weight, embedding)

    result = hybridize(src, tmp_path / "out", [0, 2])
    hybrid = _load(tmp_path / "out")
    assert hybrid.config.tie_word_embeddings is (stored_head == "equal")
    assert torch.equal(hybrid.lm_head.weight, head) and torch.equal(hybrid.model.embed_tokens.weight, embedding)
    tied_record = result.surgery["stored_tied_copies"]
    assert [(r["name"], r["tied_to"], r["equal"]) for r in tied_record] == [
        ("lm_head.weight", "model.embed_tokens.weight", stored_head == "equal")]
    assert ("lm_head.weight" in result.surgery["ignored_source_tensors"]) is (stored_head == "equal")
    assert "lm_head.weight" not in result.surgery["dropped_source_tensors"]

    ids = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    in_memory = hybridize_model(teacher, ["mamba", None, "mamba", None])  # the in-memory path agrees
    kept_all = hybridize_model(teacher, [None] * 4).eval()  # nothing replaced: exactly the teacher
    with torch.no_grad():
        assert torch.equal(hybrid(ids).logits, in_memory.eval()(ids).logits)
        assert torch.equal(kept_all(ids).logits, teacher(ids).logits)


def test_a_selection_that_replaces_nothing_is_refused(tmp_path):
    src = _save(tiny_source("llama"), tmp_path / "src")
    for selection in ([], LayerSelection([], "explicit")):
        with pytest.raises(ValueError, match=r"replaces none of the 4 layers .* pass at least one layer index"):
            hybridize(src, tmp_path / "out", selection)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--mamba-layers", "3-1"], "the range '3-1' runs backwards"),
    (["--mamba-layers", ""], "--mamba-layers lists no layer, so nothing would be replaced"),
    (["--mamba-layers=-1"], "cannot be negative"),
    (["--ratio", "0.1"], r"--ratio 0.1 replaces round(0.1 * 4) = 0 of 4 layers"),
    (["--keep-attention", "0-3"], "--keep-attention keeps all 4 layers"),
])
def test_cli_refuses_a_selection_that_replaces_nothing(tmp_path, args, message):
    src = _save(tiny_source("llama"), tmp_path / "src")
    result = CliRunner().invoke(app, ["hybridize", str(src), str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


def test_old_rotary_buffers_are_ignored(tmp_path):
    src = _save(tiny_source("llama"), tmp_path / "src")
    _tamper(src, lambda w: w.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    result = hybridize(src, tmp_path / "out", [0])
    assert result.surgery["ignored_source_tensors"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_other_bad_inputs(tmp_path):
    src = _save(tiny_source("llama"), tmp_path / "src")
    with pytest.raises(ValueError, match=r"\[4\] are out of range: .* has 4 layers"):
        hybridize(src, tmp_path / "out", [4])
    with pytest.raises(ValueError, match="mixer must be one of"):
        hybridize(src, tmp_path / "out", [0], mixer="rwkv")
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not a family"):
        hybridize(tmp_path / "gpt", tmp_path / "out", [0])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hybridize(tmp_path / "missing", tmp_path / "out", [0])
    hybridize(src, tmp_path / "out", [0])
    with pytest.raises(FileExistsError, match="--force"):
        hybridize(src, tmp_path / "out", [1])
    # a hybrid source is hybridized further (tests/test_rehybridize.py); its mixers are never replaced by another kind
    with pytest.raises(ValueError, match=r"layer 0 of the source hybrid already is a 'mamba' layer"):
        hybridize(tmp_path / "out", tmp_path / "again", [0, 1], mixer="mamba2")
    assert not (tmp_path / "again").exists()
    again = hybridize(tmp_path / "out", tmp_path / "again", [1])
    assert (again.replaced, again.carried) == ([1], [0])
    hybridize(src, tmp_path / "out", [1], force=True)
    assert json.loads((tmp_path / "out" / "surgery.json").read_text())["selection"]["mamba_layers"] == [1]


def test_a_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    src = _save(tiny_source("llama"), tmp_path / "src")
    import suture.surgery.streaming as module

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = module.new_mixer
    monkeypatch.setattr(module, "new_mixer", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        hybridize(src, tmp_path / "out", [0, 2])
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


def test_cli_hybridize(tmp_path):
    src = _save(tiny_source("mistral", num_hidden_layers=6), tmp_path / "src")
    runner = CliRunner()
    result = runner.invoke(app, ["hybridize", str(src), str(tmp_path / "out"), "--preset", "mil-50", "--mixer", "mamba2"])
    assert result.exit_code == 0, result.output
    hybrid = _load(tmp_path / "out")
    assert hybrid.config.layer_types == ["mamba2", "sliding_attention"] * 3
    result = runner.invoke(app, ["hybridize", str(src), str(tmp_path / "out"), "--ratio", "0.5"])
    assert result.exit_code == 1 and "already exists" in result.output
    result = runner.invoke(app, ["hybridize", str(src), str(tmp_path / "o2"), "--mamba-layers", "1,7"])
    assert result.exit_code == 1 and "out of range" in result.output
    result = runner.invoke(app, ["hybridize", str(src), str(tmp_path / "o2"), "--ratio", "0.5", "--select", "importance"])
    assert result.exit_code == 1 and "needs --ratio and exactly one of --data" in result.output
    assert not (tmp_path / "o2").exists()


def test_writer_and_reader_round_trip_every_dtype(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
    }
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path, plan, max_shard_size=24) as writer:
        for name in reversed(list(tensors)):  # any order
            writer.write(name, tensors[name])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for shard in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / shard))  # the reference reader agrees
    reader = CheckpointReader(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and torch.equal(reader.read(name), tensor), name
    with pytest.raises(RuntimeError, match="never written"):
        ShardedSafetensorsWriter(tmp_path / ".", plan[:1]).close()
    with pytest.raises(ValueError, match="planned"):
        ShardedSafetensorsWriter(tmp_path, plan[:1]).write("f32", torch.zeros(4, 3))


def test_cli_selects_layers_by_importance_and_records_the_scores(tmp_path):
    tokenizer = build_tokenizer()
    source = tiny_source("llama", vocab_size=len(tokenizer), num_hidden_layers=4)
    with torch.no_grad():  # layer 1's attention contributes nothing: it must be the first to go
        source.model.layers[1].self_attn.o_proj.weight.zero_()
    src = _save(source, tmp_path / "src")
    tokenizer.save_pretrained(src)
    runner = CliRunner()
    args = ["hybridize", str(src), str(tmp_path / "out"), "--select", "importance", "--ratio", "0.25"]
    result = runner.invoke(app, [*args, "--data", "workload"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert [row["index"] for row in record["layers"] if row["replaced"]] == [1]
    assert record["selection"] == {"method": "importance", "ratio": 0.25, "probe": "loo"}
    assert "importance rank 1 of 4" in record["layers"][1]["reason"]
    assert record["scores"]["layers"][1]["scores"]["loo"] == 0.0

    # a saved report gives the same selection without scoring again
    result = runner.invoke(app, ["importance", str(src), "--n", "8", "--json", str(tmp_path / "imp.json")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*args[:2], str(tmp_path / "out2"), *args[3:], "--importance", str(tmp_path / "imp.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out2" / "surgery.json").read_text())["layers"][1]["replaced"]


def _importance_source(tmp_path):
    """A 4-layer Llama whose layer 1 attention adds nothing (the first to go by importance), with a tokenizer."""
    tokenizer = build_tokenizer()
    source = tiny_source("llama", vocab_size=len(tokenizer), num_hidden_layers=4)
    with torch.no_grad():
        source.model.layers[1].self_attn.o_proj.weight.zero_()
    src = _save(source, tmp_path / "src")
    tokenizer.save_pretrained(src)
    return src


def test_python_selects_layers_by_importance_in_one_call(tmp_path):
    """`--select importance` from Python: a SelectionSpec that hybridize resolves by scoring the source."""
    src = _importance_source(tmp_path)
    phases = set()
    result = hybridize(src, tmp_path / "out", SelectionSpec(ratio=0.25, select="importance", data="workload"),
                       on_progress=lambda phase, done, total: phases.add(phase))
    assert result.replaced == [1] and "importance" in phases
    record = result.surgery
    assert record["selection"] == {"method": "importance", "ratio": 0.25, "probe": "loo"}
    assert record["scores"]["methods"] == ["loo"] and record["scores"]["layers"][1]["scores"]["loo"] == 0.0
    assert "importance rank 1 of 4" in record["layers"][1]["reason"]

    # the probe is a parameter; a saved report (or the report itself) selects without scoring again
    mil = hybridize(src, tmp_path / "mil", SelectionSpec(ratio=0.25, select="importance", data="workload",
                                                          probe="mil"))
    assert mil.surgery["selection"]["probe"] == "mil" and mil.surgery["scores"]["methods"] == ["mil"]
    (tmp_path / "imp.json").write_text(json.dumps(record["scores"]))
    report = ImportanceReport.load_json(tmp_path / "imp.json")
    for saved in (tmp_path / "imp.json", report):
        again = hybridize(src, tmp_path / "again", SelectionSpec(ratio=0.25, select="importance", importance=saved),
                          force=True)
        assert again.replaced == [1] and again.surgery["scores"] == record["scores"]
    with pytest.raises(ValueError, match="'mil' was not scored"):
        hybridize(src, tmp_path / "bad", SelectionSpec(ratio=0.25, select="importance", importance=report,
                                                        probe="mil"))

    # text layer lists and the other ways of choosing go through the same spec
    assert hybridize(src, tmp_path / "text", SelectionSpec(mamba_layers="0,2-3")).replaced == [0, 2, 3]
    assert hybridize(src, tmp_path / "kept", SelectionSpec(keep_attention=[3])).replaced == [0, 1, 2]
    with pytest.raises(ValueError, match="only apply with --select importance"):
        SelectionSpec(ratio=0.5, probe="mil")
    with pytest.raises(ValueError, match="needs --ratio and exactly one of --data"):
        SelectionSpec(ratio=0.5, select="importance", data="workload", importance=tmp_path / "imp.json")
    with pytest.raises(ValueError, match="records its own report"):
        hybridize(src, tmp_path / "both", SelectionSpec(ratio=0.25, select="importance", importance=report),
                  scores=record["scores"])
    assert not any((tmp_path / name).exists() for name in ("bad", "both"))


def test_cli_probe_and_dtype_spellings(tmp_path):
    src = _importance_source(tmp_path)
    runner = CliRunner()
    args = ["hybridize", str(src), str(tmp_path / "out"), "--select", "importance", "--ratio", "0.25",
            "--data", "workload", "--probe", "mil", "--dtype", "bf16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert record["selection"]["probe"] == "mil" and record["scores"]["methods"] == ["mil"]
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    result = runner.invoke(app, ["hybridize", str(src), str(tmp_path / "o2"), "--mamba-layers", "1", "--dtype", "int8"])
    assert result.exit_code == 2 and "--dtype" in result.output and "bfloat16 (bf16)" in result.output
    assert not (tmp_path / "o2").exists()
