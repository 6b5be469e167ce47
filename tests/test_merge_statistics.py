"""Calibration statistics for AIM and RCP, checked against hand / brute-force computations on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_source
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from suture.io.checkpoint import CheckpointReader
from suture.merge import get_method, merge_state_dicts
from suture.merge.statistics import (
    RcpStatistics,
    activation_scales,
    activation_scales_from_checkpoint,
    load_statistics,
    rcp_statistics,
    save_statistics,
)
from suture.surgery import hybridize_model
from suture.data import load_sequences
from suture.workload import build_tokenizer

TOKENIZER = build_tokenizer()
VOCAB = len(TOKENIZER)


def model(family: str = "llama", seed: int = 0, **overrides):
    return tiny_source(family, seed=seed, vocab_size=VOCAB, num_hidden_layers=2, **overrides)


def sequences(lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------------- AIM
def hand_scales(net, seqs, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Mean |input| per channel over every token of every sequence (each run alone), over its maximum."""
    rows = {name: [] for name in modules}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: rows[name].append(args[0][0]))
             for name, m in modules.items()]
    try:
        with torch.no_grad():
            for ids in seqs:
                net(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    means = {name: torch.cat(r).abs().double().mean(0) for name, r in rows.items()}  # (in,)
    return {name: (m / m.max()).float() for name, m in means.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_aim_scales_equal_hand_computation(family):
    net, seqs = model(family), sequences([9, 5, 12, 3])
    stats = activation_scales(net, seqs, batch_size=3)
    # lm_head's input is the last hidden state (after the final norm), layer 0's norm sees the embeddings
    with torch.no_grad():
        hidden = [net(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states for ids in seqs]
    for key, index in [("lm_head.weight", -1), ("model.layers.0.input_layernorm.weight", 0)]:
        mean = torch.cat([h[index][0] for h in hidden]).abs().double().mean(0)
        torch.testing.assert_close(stats[key], (mean / mean.max()).float())
    layer = net.model.layers[1]
    picked = {"model.norm.weight": net.model.norm, "model.layers.1.mlp.down_proj.weight": layer.mlp.down_proj,
              "model.layers.1.self_attn.o_proj.weight": layer.self_attn.o_proj}
    for key, expected in hand_scales(net, seqs, picked).items():
        torch.testing.assert_close(stats[key], expected)


def test_aim_keys_ranges_and_hooks():
    net = model()
    stats = activation_scales(net, sequences([7, 4]))
    linears = {f"{n}.weight" for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    norms = {f"{n}.weight" for n, m in net.named_modules() if "RMSNorm" in type(m).__name__}
    assert set(stats) == linears | norms and "lm_head.weight" in stats and len(norms) == 5
    assert not any("embed" in key for key in stats)
    for key, a in stats.items():
        weight = net.get_parameter(key)
        assert a.shape == weight.shape[-1:] and a.dtype == torch.float32
        assert a.min() >= 0 and a.max() == 1.0
    assert all(not m._forward_pre_hooks for m in net.modules())

    def fail(done, total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        activation_scales(net, sequences([7, 4]), on_progress=fail)
    assert all(not m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize("layer_types", [["mamba", None], ["mamba2", None], [None, None]])
def test_aim_padding_never_counts(layer_types):
    net = hybridize_model(model(), layer_types) if layer_types != [None, None] else model()
    seqs = sequences([11, 3, 6, 8, 2], seed=1)
    alone = activation_scales(net, seqs, batch_size=1)  # no padding at all
    batched = activation_scales(net, seqs, batch_size=5)  # one right-padded batch
    assert set(alone) == set(batched)
    for key in alone:
        torch.testing.assert_close(batched[key], alone[key], rtol=1e-5, atol=1e-6)
    # padding changes the raw sums if it leaks in: the same batch with the mask all ones must differ
    ids = torch.zeros(2, 11, dtype=torch.long)
    ids[0], ids[1, :3] = torch.tensor(seqs[0]), torch.tensor(seqs[1])
    leaky = activation_scales(net, [(ids, torch.ones_like(ids))])
    assert not torch.allclose(leaky["lm_head.weight"], activation_scales(net, seqs[:2])["lm_head.weight"])


def test_aim_hybrid_keys():
    net = hybridize_model(model(), ["mamba", None])
    stats = activation_scales(net, sequences([6, 9]))
    mixer = net.model.layers[0].mamba
    assert stats["model.layers.0.mamba.in_proj.weight"].shape == (mixer.in_proj.in_features,)
    assert stats["model.layers.0.mamba.out_proj.weight"].shape == (mixer.out_proj.in_features,)
    assert "model.layers.1.self_attn.q_proj.weight" in stats
    assert "model.layers.0.mamba.dt_proj.weight" not in stats  # applied with F.linear: no module forward runs


def test_aim_save_load_and_checkpoint_dir(tmp_path):
    net = model(tie_word_embeddings=True)
    net.save_pretrained(tmp_path / "base")
    TOKENIZER.save_pretrained(tmp_path / "base")
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["12+34=46", "7*8=56 and 9-3=6", "100"]))
    stats = activation_scales(net, data, tokenizer=TOKENIZER, n=3)
    from_dir = activation_scales_from_checkpoint(tmp_path / "base", data, n=3)
    assert set(from_dir) == set(stats)
    for key in stats:
        torch.testing.assert_close(from_dir[key], stats[key])
    # tied: the checkpoint stores the shared matrix as the embedding only, which gets no scales
    with CheckpointReader(tmp_path / "base") as reader:
        assert "lm_head.weight" in stats and "lm_head.weight" not in reader
        assert "model.embed_tokens.weight" in reader and "model.embed_tokens.weight" not in stats

    save_statistics(from_dir, tmp_path / "aim.safetensors")
    loaded = load_statistics(tmp_path / "aim.safetensors")
    assert loaded.keys() == stats.keys() and all(torch.equal(loaded[k], from_dir[k]) for k in stats)
    assert loaded.source == str(tmp_path / "base") and loaded.n_tokens == from_dir.n_tokens > 0
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="no AIM statistics"):
        load_statistics(tmp_path / "other.safetensors")


# ---------------------------------------------------------------------------------------------------- RCP
def brute_saliencies(net, seqs) -> list[dict[str, torch.Tensor]]:
    """g * w per sample on a copy, with transformers' own loss (labels = input ids) and full autograd."""
    out = []
    for ids in seqs:
        twin = copy.deepcopy(net).eval()
        params = dict(twin.named_parameters())
        x = torch.tensor([ids])
        grads = torch.autograd.grad(twin(input_ids=x, labels=x).loss, list(params.values()))
        out.append({name: g * p.detach() for (name, p), g in zip(params.items(), grads)})
    return out


@pytest.fixture(scope="module")
def rcp_setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("rcp") / "stats"
    reasoning, domain, base = model(seed=1), model(seed=2), model(seed=3)
    r_seqs, d_seqs = sequences([10, 6], seed=4), sequences([8, 5, 12], seed=5)
    stats = rcp_statistics(reasoning, domain, r_seqs, d_seqs, out, n_reasoning=2, n_domain=3)
    return stats, out, (reasoning, domain, base), (r_seqs, d_seqs)


CHECKED = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
           "model.norm.weight", "lm_head.weight"]


def test_rcp_statistics_equal_brute_force(rcp_setup):
    stats, out, (reasoning, domain, _), (r_seqs, d_seqs) = rcp_setup
    prior = brute_saliencies(reasoning, r_seqs)
    sensitivity = brute_saliencies(domain, d_seqs)
    for name in CHECKED:
        expected = torch.stack([s[name] ** 2 for s in prior]).mean(0)
        torch.testing.assert_close(stats.reasoning_prior(name), expected, rtol=1e-4, atol=1e-10)
        got = stats.domain_sensitivity(name)
        assert len(got) == 3
        for g, e in zip(got, sensitivity):
            torch.testing.assert_close(g, e[name], rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in [*reasoning.parameters(), *domain.parameters()])
    assert not reasoning.training and not domain.training


def test_rcp_files_and_reader(rcp_setup):
    stats, out, (reasoning, *_), _ = rcp_setup
    assert sorted(p.name for p in out.iterdir()) == [
        "domain_sensitivity-000.safetensors", "domain_sensitivity-001.safetensors",
        "domain_sensitivity-002.safetensors", "reasoning_prior.safetensors"]
    reopened = RcpStatistics.open(out)
    assert reopened.n_domain == 3 and set(reopened.names) == set(dict(reasoning.named_parameters()))
    assert reopened.reasoning_prior("nope") is None and reopened.domain_sensitivity("nope") is None
    assert reopened.reasoning_prior("model.norm.weight").dtype == torch.float32
    with pytest.raises(FileExistsError):
        rcp_statistics(reasoning, reasoning, [[1, 2, 3]], [[1, 2, 3]], out, n_reasoning=1, n_domain=1)
    with pytest.raises(ValueError, match="only 1 usable"):
        rcp_statistics(reasoning, reasoning, [[1, 2, 3]], [[1, 2, 3]], out.parent / "x", n_reasoning=1, n_domain=2)


def test_rcp_rule_end_to_end(rcp_setup):
    stats, _, models, _ = rcp_setup
    theta_r, theta_d, theta_0 = (m.state_dict() for m in models)
    name = "model.layers.0.self_attn.q_proj.weight"
    prior, samples = stats.reasoning_prior(name), stats.domain_sensitivity(name)
    gap = (theta_r[name] - theta_d[name]) ** 2
    lam = float(torch.stack(samples).abs().median() / (prior * gap).median())  # both outcomes occur
    merged = get_method("rcp")([theta_r[name], theta_d[name]], theta_0[name], reasoning_prior=prior,
                               domain_sensitivity=samples, **{"lambda": lam})
    expected = theta_r[name].clone()
    flat_r, flat_d, flat_0, out = (t.reshape(-1) for t in (theta_r[name], theta_d[name], theta_0[name], expected))
    for j in range(out.numel()):  # the vote, entry by entry
        penalty = lam * prior.reshape(-1)[j] * (flat_r[j] - flat_d[j]) ** 2
        votes = sum(1 if s.reshape(-1)[j] + penalty <= 0 else -1 for s in samples)
        if votes > 0:
            out[j] = flat_r[j] + flat_d[j] - flat_0[j]
    assert 0 < (expected != theta_r[name]).sum() < expected.numel()
    torch.testing.assert_close(merged, expected)
    # the engine's in-memory path takes the same statistics by tensor name
    provider = {"rcp": lambda stat, n: stats.reasoning_prior(n) if stat == "reasoning_prior"
                else stats.domain_sensitivity(n)}
    whole = merge_state_dicts("rcp", [theta_r, theta_d], base=theta_0, parameters={"lambda": lam},
                              statistics=provider)
    torch.testing.assert_close(whole[name], expected)


def test_rcp_from_checkpoint_dirs_with_tied_embeddings(tmp_path):
    for i, seed in enumerate([1, 2]):
        model(seed=seed, tie_word_embeddings=True).save_pretrained(tmp_path / f"m{i}")
    TOKENIZER.save_pretrained(tmp_path / "m0")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(5)))
    progress = []
    stats = rcp_statistics(tmp_path / "m0", tmp_path / "m1", data, data, tmp_path / "out", n_reasoning=2,
                           n_domain=2, on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with CheckpointReader(tmp_path / "m0") as reader:
        assert set(stats.names) == set(reader.index)  # the shared matrix under the embedding's name only
    assert "lm_head.weight" not in stats.names
    # the tied matrix gets the gradient of both uses (autograd on the shared parameter sums them)
    reasoning = AutoModelForCausalLM.from_pretrained(tmp_path / "m0", dtype=torch.float32)
    seqs = load_sequences(data, TOKENIZER, n=2)
    expected = torch.stack([s["model.embed_tokens.weight"] ** 2 for s in brute_saliencies(reasoning, seqs)]).mean(0)
    torch.testing.assert_close(stats.reasoning_prior("model.embed_tokens.weight"), expected, rtol=1e-4, atol=1e-10)
