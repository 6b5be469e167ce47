"""One error path for every command: a bad file, option or field is one `error:` line on stderr naming it, exit code 1
(bad option values: a usage error naming the option, exit code 2), no traceback and no output left behind."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
import yaml
from conftest import tiny_source
from typer.testing import CliRunner

from suture.io import checkpoint
from suture.io.checkpoint import CheckpointReader, ShardedSafetensorsWriter, parse_size
from suture.cli import app
from suture.cli.errors import cli_errors
from suture.merge import merge
from suture.merge.lora import read_adapter_config
from suture.surgery.importance import ImportanceReport
from suture.surgery.mil import hybridize_model
from suture.workload import build_tokenizer, load_manifest

runner = CliRunner()
BROKEN_JSON = '{"model_type": "llama",\n "hidden_size": 64,,\n}'  # the second comma: line 2, column 20
AT = "line 2, column 20"
WIDE = {"COLUMNS": "1000"}  # no wrapping, so that paths can be searched for in the output


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> SimpleNamespace:
    """`good` (with the workload tokenizer), `other` (another seed) and `broken` (good, with BROKEN_JSON as its
    config.json), all tiny Llamas."""
    root = tmp_path_factory.mktemp("ckpts")
    tokenizer = build_tokenizer()
    for name, seed in (("good", 0), ("other", 1)):
        tiny_source("llama", seed=seed, vocab_size=len(tokenizer)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    shutil.copytree(root / "good", root / "broken")
    (root / "broken" / "config.json").write_text(BROKEN_JSON)
    return SimpleNamespace(good=root / "good", other=root / "other", broken=root / "broken")


def fails(args: list, code: int = 1) -> str:
    """Run the command, check it ended with `code` and no traceback; return its one `error:` line (code 1) or its
    usage error flattened to one line (code 2)."""
    result = runner.invoke(app, [str(a) for a in args], env=WIDE)
    assert isinstance(result.exception, SystemExit), f"{result.exception!r}\n{result.output}"
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "error:" not in result.stdout
    if code == 2:
        return " ".join(result.stderr.split())
    lines = result.stderr.splitlines()  # above the error, transformers may have drawn a progress bar
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, result.stderr
    return lines[-1]


def _recipe(path: Path, models: list[dict], method: str = "linear", **fields) -> Path:
    path.write_text(yaml.safe_dump({"merge_method": method, "models": models, **fields}))
    return path


def _only_children(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --------------------------------------------------------------------------------------------- broken config.json
@pytest.mark.parametrize("command", ["inspect", "export", "hybridize", "merge", "extract-lora", "publish", "demo",
                                     "importance", "workload eval"])
def test_a_broken_config_json_is_named_with_its_line_and_column(ckpts, tmp_path, command):
    """suture reads config.json itself (inspect, export, ...) or through transformers (demo, importance, workload
    eval): either way the line names the file and the position of the fault."""
    broken, out = ckpts.broken, tmp_path / "out"
    args = {
        "inspect": ["inspect", broken],
        "export": ["export", broken, out],
        "hybridize": ["hybridize", broken, out, "--mamba-layers", "1"],
        "merge": ["merge", _recipe(tmp_path / "r.yaml", [{"model": str(broken), "parameters": {"weight": 1.0}}]), out],
        # the base's config.json says whether the embeddings are tied
        "extract-lora": ["extract-lora", ckpts.other, broken, out, "--include", r"layers\.0\.self_attn\.q_proj"],
        "publish": ["publish", broken, "alice/tiny", "--dry-run"],
        "demo": ["demo", out, "--teacher", broken],
        "importance": ["importance", broken, "--n", "2"],
        "workload eval": ["workload", "eval", broken, "--n", "1"],
    }[command]
    error = fails(args)
    assert str(broken / "config.json") in error and AT in error
    assert not out.exists() and _only_children(tmp_path) <= {"r.yaml"}


def test_every_json_file_suture_reads_is_named_with_its_line_and_column(ckpts, tmp_path):
    (tmp_path / "zoo.json").write_text(BROKEN_JSON)
    with pytest.raises(ValueError, match=rf"zoo.json \(workload zoo manifest\) is not valid JSON: .* {AT}"):
        load_manifest(tmp_path)
    (tmp_path / "adapter_config.json").write_text(BROKEN_JSON)
    with pytest.raises(ValueError, match=rf"adapter_config.json \(PEFT adapter config\) is not valid JSON: .* {AT}"):
        read_adapter_config(tmp_path)
    (tmp_path / "report.json").write_text(BROKEN_JSON)
    with pytest.raises(ValueError, match=rf"report.json \(importance report\) is not valid JSON: .* {AT}"):
        ImportanceReport.load_json(tmp_path / "report.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json .* should hold a JSON object, found a list"):
        ImportanceReport.load_json(tmp_path / "list.json")


def test_a_broken_shard_index_is_named(ckpts, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(ckpts.other, sharded)
    (sharded / "model.safetensors.index.json").write_text(BROKEN_JSON)
    error = fails(["extract-lora", sharded, ckpts.good, tmp_path / "out"])
    assert str(sharded / "model.safetensors.index.json") in error and "shard index" in error and AT in error
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match='index.json has no "weight_map" object'):
        CheckpointReader(sharded)
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    error = fails(["publish", sharded, "alice/tiny", "--dry-run"])  # publish reads the index the same way
    assert error == f'error: {sharded / "model.safetensors.index.json"} has no "weight_map" object of tensor name -> ' \
                    'shard file; write it again.'
    assert not (tmp_path / "out").exists()


def test_a_config_json_that_is_not_utf8_is_named(ckpts, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpts.good, folder)
    (folder / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    error = fails(["publish", folder, "alice/tiny", "--dry-run"])
    assert str(folder / "config.json") in error and "not UTF-8 text (byte 21" in error


# --------------------------------------------------------------------------------------------- corrupt safetensors
def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_corrupt_or_truncated_safetensors_name_the_file_and_tensor(ckpts, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpts.good, folder)
    weights = folder / "model.safetensors"
    header, data = _header(weights)
    del header["lm_head.weight"]["data_offsets"]
    _write_header(weights, header, data)
    error = fails(["inspect", folder])
    assert str(weights) in error and "'lm_head.weight' is malformed" in error

    header["lm_head.weight"]["data_offsets"] = [0, 12]
    _write_header(weights, header, data)
    assert "'lm_head.weight' has data offsets [0, 12] that do not match its shape" in fails(["inspect", folder])

    shutil.copy(ckpts.good / "model.safetensors", weights)
    with open(weights, "r+b") as f:  # an interrupted download: the data stops short
        f.truncate(weights.stat().st_size - 1000)
    # loaded through transformers, whose safetensors error names no file: the line still names it
    error = fails(["workload", "eval", folder, "--n", "1"])
    assert f"{weights} is truncated: tensor" in error
    with open(weights, "r+b") as f:
        f.truncate(100)  # inside the header
    error = fails(["inspect", folder])
    assert f"{weights} is not a safetensors file or is truncated" in error


# --------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("command, option", [
    ("hybridize", "--max-shard-size"), ("merge", "--max-shard-size"), ("merge", "--memory-budget"),
    ("long-short", "--memory-budget"),
])
def test_a_bad_size_is_a_usage_error_naming_the_option(ckpts, tmp_path, command, option):
    out = tmp_path / "out"
    args = {
        "hybridize": ["hybridize", ckpts.good, out, "--mamba-layers", "1"],
        "merge": ["merge", _recipe(tmp_path / "r.yaml", [{"model": str(ckpts.good), "parameters": {"weight": 1}}]),
                  out],
        "long-short": ["merge", "long-short", out, "--long", ckpts.other, "--short", ckpts.good],
    }[command]
    usage = fails([*args, option, "1.5GB"], code=2)
    assert f"Invalid value for '{option}'" in usage and "'1.5GB' is not a size" in usage and "'5GB'" in usage
    assert not out.exists()


def test_library_size_parameters_name_the_parameter(ckpts, tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1000") == 1000
    assert parse_size(24) == 24
    with pytest.raises(ValueError, match="max_shard_size must be a positive size.*'5GB'.*got 'lots'"):
        ShardedSafetensorsWriter(tmp_path, [], max_shard_size="lots")
    with pytest.raises(ValueError, match="memory_budget must be a positive size.*got '-4GB'"):
        merge({"merge_method": "linear", "models": [{"model": str(ckpts.good), "parameters": {"weight": 1.0}}]},
              tmp_path / "out", memory_budget="-4GB")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- failed writes
class _FullDisk:
    """`os` as the checkpoint writer sees it on a full disk."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def pwrite(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_naming_the_output(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "os", _FullDisk())
    out = tmp_path / "hybrid"
    error = fails(["hybridize", ckpts.good, out, "--mamba-layers", "1"])
    assert error == (f"error: could not write {out} (model.safetensors): No space left on device; free space on "
                     "that disk or write to another one.")
    assert _only_children(tmp_path) == set()  # neither the output nor its temporary sibling


@pytest.mark.parametrize("command", ["merge", "export"])
def test_a_file_size_limit_is_one_line_naming_the_output(ckpts, tmp_path, command):
    """A real write failure: the process may not write files larger than 64 KB (SIGXFSZ is ignored by Python).
    merge writes with suture's writer, export with the safetensors library (whose error is text naming no file)."""
    out, inputs = tmp_path / "out", tmp_path / "inputs"
    if command == "merge":
        args = ["merge", _recipe(inputs, [{"model": str(ckpts.other), "parameters": {"weight": 1.0}}]), out]
    else:
        hybridize_model(tiny_source("llama"), ["mamba2", None, "mamba2", None]).save_pretrained(inputs)
        args = ["export", inputs, out]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, hard))
    try:
        error = fails(args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    file = " (model.safetensors)" if command == "merge" else ""
    assert error.startswith(f"error: could not write {out}{file}: File too large; ") and "ulimit -f" in error
    assert ("--max-shard-size" in error) == (command == "merge")  # export writes one file, whatever its size
    assert _only_children(tmp_path) == {"inputs"}


# --------------------------------------------------------------------------------------------- markup and fields
def test_a_typo_in_a_per_model_merge_parameter_is_one_line(ckpts, tmp_path):
    recipe = _recipe(tmp_path / "r.yaml", [{"model": str(ckpts.other), "parameters": {"wieght": 1.0}}],
                     method="task_arithmetic", base_model=str(ckpts.good))
    error = fails(["merge", recipe, tmp_path / "out"])
    assert f"models[{ckpts.other}].parameters.wieght: not a per-model parameter of task_arithmetic" in error
    assert not (tmp_path / "out").exists()


def test_a_bad_long_short_field_is_one_line(ckpts, tmp_path):
    error = fails(["merge", "long-short", tmp_path / "out", "--long", ckpts.other, "--short", ckpts.good,
                   "--out-dtype", "int8"])
    assert error == ("error: recipe: out_dtype: Unknown floating dtype 'int8'; use float32 (fp32, f32, float), "
                     "bfloat16 (bf16), float16 (fp16, f16, half), float64 (fp64, f64, double) or another torch "
                     "floating dtype by name (e.g. float8_e4m3fn).")  # worded as for a recipe file: one formatter


def test_paths_with_brackets_print_as_they_are(ckpts, tmp_path):
    zoo = tmp_path / "zoo[/x]"
    zoo.mkdir(parents=True)
    error = fails(["workload", "build", zoo, "--size", "test"])
    assert error == f"error: {zoo} already exists; pass force=True (CLI: --force) to replace it."
    missing = tmp_path / "[bold]ckpt"
    assert fails(["inspect", missing]) == f"error: {missing} has no config.json: pass a Hugging Face checkpoint " \
                                          "directory."
    bracketed = tmp_path / "good[/x]"
    shutil.copytree(ckpts.good, bracketed)
    result = runner.invoke(app, ["inspect", str(bracketed), "--json", str(tmp_path / "[i].json")], env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"{bracketed} (llama)" in result.output and f"wrote {tmp_path / '[i].json'}" in result.output


# --------------------------------------------------------------------------------------------- what stays a traceback
def test_bugs_keep_their_traceback_and_interrupts_pass_through(ckpts, monkeypatch, capsys):
    import suture.io.inspect as inspect_module

    for bug in (RuntimeError("a bug"), KeyError("model.norm.weight"), AttributeError("x")):
        def raise_bug(*args, bug=bug):
            raise bug

        monkeypatch.setattr(inspect_module, "inspect_checkpoint", raise_bug)
        result = runner.invoke(app, ["inspect", str(ckpts.good)])
        assert result.exception is bug and "error:" not in result.output
    with pytest.raises(KeyboardInterrupt), cli_errors():
        raise KeyboardInterrupt
    with pytest.raises(typer.Exit), cli_errors():
        raise KeyError("Tensor 'x' is not in the output plan.")  # a sentence: shown as an error line
    assert capsys.readouterr().err == "error: Tensor 'x' is not in the output plan.\n"
