"""`suture inspect`: per-layer table from headers only, cache footprint, checkpoint diffs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_source
from safetensors.torch import save_file
from typer.testing import CliRunner

from suture.cli import app
from suture.demo import kv_bytes_per_token, ssm_state_bytes
from suture.surgery import hybridize_model
from suture.io.inspect import diff_checkpoints, inspect_checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    source = tiny_source("qwen2")
    hybrid = hybridize_model(source, ["mamba", None, "mamba2", None])
    source.save_pretrained(root / "source")
    hybrid.save_pretrained(root / "hybrid", max_shard_size="100KB")
    return root, source, hybrid


def test_inspection_matches_the_model(saved):
    root, source, hybrid = saved
    report = inspect_checkpoint(root / "hybrid")
    assert [r.mixer for r in report.layers] == ["mamba", "full_attention", "mamba2", "full_attention"]
    assert report.total_parameters == sum(t.numel() for t in hybrid.state_dict().values())
    for row in report.layers:
        layer_params = sum(p.numel() for p in hybrid.model.layers[row.index].parameters())
        assert row.parameters == layer_params
    assert report.kv_bytes_per_token == kv_bytes_per_token(hybrid)
    assert report.state_bytes_per_sequence == ssm_state_bytes(hybrid)
    assert report.dtypes == {"F32": report.total_parameters}
    plain = inspect_checkpoint(root / "source")
    assert [r.mixer for r in plain.layers] == ["full_attention"] * 4 and plain.state_bytes_per_sequence == 0


def test_diff_names_shapes_and_relative_change(saved, tmp_path):
    root, source, _ = saved
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items() if k != "lm_head.weight"}
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name] * 1.5  # relative change exactly 0.5
    state["model.norm.weight"] = torch.ones(8)  # shape mismatch
    state["extra.bias"] = torch.zeros(3)
    del state["model.layers.0.self_attn.q_proj.bias"]
    (tmp_path / "b").mkdir()
    save_file(state, tmp_path / "b" / "model.safetensors")
    diff = diff_checkpoints(root / "source", tmp_path / "b")
    assert diff.only_in_b == ["extra.bias"] and "model.layers.0.self_attn.q_proj.bias" in diff.only_in_a
    assert diff.shape_mismatches["model.norm.weight"] == ((64,), (8,))
    changes = {c.name: c.relative_change for c in diff.changes}
    assert changes[name] == pytest.approx(0.5) and changes["model.embed_tokens.weight"] == 0.0


def test_pickle_only_checkpoint_is_refused_with_a_hint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*--allow-pickle"):
        inspect_checkpoint(tmp_path)


def test_cli_inspect_and_diff(saved, tmp_path):
    root, _, _ = saved
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(root / "hybrid"), str(root / "source"), "--json", str(tmp_path / "i.json")])
    assert result.exit_code == 0, result.output
    assert "mamba2" in result.output and "most changed" in result.output and (tmp_path / "i.json").exists()
    missing = runner.invoke(app, ["inspect", str(tmp_path)])
    assert missing.exit_code == 1 and "config.json" in missing.output
