"""`suture publish` against a local fake of the hub routes huggingface_hub's create_repo / create_commit call."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import socket
import threading
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import huggingface_hub
import pytest
import torch
import typer
import yaml
from huggingface_hub import ModelCard
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from suture.cli.publish import publish_command
from suture.io.hub import PublishError, publish

TOKEN = "hf_sutureTestToken0123456789"  # recognisable, so any leak into output is found
BAD_TOKEN = "hf_sutureBadToken9876543210"
SOURCE = "meta-llama/Llama-3.2-1B"


@dataclass
class Commit:
    repo: str
    revision: str
    header: dict
    files: dict[str, bytes]


class FakeHub:
    """Records every request; answers "regular" upload mode for every file so the commit carries all bytes inline."""

    def __init__(self, url: str):
        self.url = url
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.created: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.commits: list[Commit] = []

    def route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if "/forbidden/" in path or (path == "/api/repos/create" and json.loads(body)["organization"] == "forbidden"):
            return 403, {"error": "You don't have the rights to create a model under the namespace forbidden"}
        if (method, path) == ("POST", "/api/repos/create"):
            payload = json.loads(body)
            self.created.append(payload)
            return 200, {"url": f"{self.url}/{payload['organization']}/{payload['name']}"}
        if (method, path) == ("POST", "/api/validate-yaml"):
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if method == "POST" and match and match[2] == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]}
        if method == "POST" and match and match[2] == "commit":  # NDJSON: a header line, then one line per file
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"]) for item in lines if item["key"] == "file"}
            self.commits.append(Commit(match[1], unquote(match[3]), lines[0]["value"], files))
            return 200, {"commitUrl": f"{self.url}/{match[1]}/commit/{'a' * 40}", "commitOid": "a" * 40}
        if method == "POST" and match and match[2] == "branch":
            self.branches.append((match[1], unquote(match[3])))
            return 200, {}
        return 404, {"error": f"fake hub has no route {method} {path}"}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest's captured stderr for the client's output
            pass

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path, auth = urlparse(self.path).path, self.headers.get("Authorization")
            hub.requests.append((self.command, path, auth))
            if auth != f"Bearer {TOKEN}":  # echo the credential like a careless server: the client must scrub it
                status, payload = 401, {"error": f"Invalid credentials in Authorization header: {auth}"}
            else:
                status, payload = hub.route(self.command, path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """The hub client reads offline mode at import; force it on here so only the fake (or nothing) is reached."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), None)
    fake = FakeHub(f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(fake)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("source") / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def ckpt(tiny_llama, tmp_path) -> Path:
    """A copy with hybridize's lineage file, plus a hidden temp dir and a dotfile that must never be uploaded."""
    out = tmp_path / "tiny-hybrid"
    shutil.copytree(tiny_llama, out)
    (out / "surgery.json").write_text(json.dumps({"source": {"name": SOURCE, "path": "/models/src"}, "mixer": "mamba"}))
    (out / ".tiny-hybrid.x1y2").mkdir()
    (out / ".tiny-hybrid.x1y2" / "model.safetensors").write_bytes(b"partial")
    (out / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (out / "extra").mkdir()
    (out / "extra" / "notes.txt").write_text("nested files keep their path\n")
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _invoke(args: list[str]):
    app = typer.Typer()
    app.command("publish")(publish_command)

    @app.callback()
    def _root() -> None:  # keeps `publish` a subcommand, as in the real app
        pass

    return CliRunner().invoke(app, ["publish", *args])


def test_publish_uploads_every_file_in_one_commit(hub, ckpt, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    before = _snapshot(ckpt)
    result = publish(ckpt, "alice/tiny-hybrid", private=True, token=TOKEN, endpoint=hub.url)

    assert hub.created == [{"name": "tiny-hybrid", "organization": "alice", "visibility": "private", "type": "model"}]
    (commit,) = hub.commits
    assert (commit.repo, commit.revision) == ("alice/tiny-hybrid", "main")
    expected = {rel: data for rel, data in before.items() if not rel.startswith(".")}
    assert set(commit.files) == set(expected) | {"README.md"}
    assert {"model.safetensors", "config.json", "surgery.json", "extra/notes.txt"} <= set(commit.files)
    for rel, data in expected.items():
        assert commit.files[rel] == data, rel
    card = ModelCard(commit.files["README.md"].decode())
    assert card.data.base_model == SOURCE
    assert card.data.library_name == "transformers" and "suture" in card.data.tags
    assert result.commit_url.startswith(f"{hub.url}/alice/tiny-hybrid/commit/")
    assert result.skipped == [".tiny-hybrid.x1y2/", ".env"]

    assert hub.requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    assert _snapshot(ckpt) == before  # no README.md written into the user's folder
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text + result.card


def test_cli_uses_env_endpoint_and_token_and_commits_to_a_branch(hub, ckpt, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read at call time, after huggingface_hub was imported
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    res = _invoke([str(ckpt), "alice/tiny-hybrid", "--revision", "dev", "--message", "first upload"])
    assert res.exit_code == 0, res.output
    assert f"{hub.url}/alice/tiny-hybrid/tree/dev" in res.output
    assert "visibility" not in hub.created[0]  # not --private: the namespace default decides
    assert hub.branches == [("alice/tiny-hybrid", "dev")]
    assert [(c.revision, c.header["summary"]) for c in hub.commits] == [("dev", "first upload")]
    assert TOKEN not in res.output


def test_dry_run_makes_no_request(hub, ckpt, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # any request at all would raise
    res = _invoke([str(ckpt), "alice/tiny-hybrid", "--dry-run", "--private"])
    assert res.exit_code == 0, res.output
    assert hub.requests == []
    assert "model.safetensors" in res.output and "private" in res.output and hub.url in res.output
    assert f"base_model: {SOURCE}" in res.output and "- suture" in res.output
    assert "not uploaded" in res.output and "nothing was uploaded" in res.output


def test_card_keeps_the_readme_and_adds_merge_lineage(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)  # looks like a hub id but is a local path
    (ckpt / "surgery.json").unlink()
    readme = "---\nlicense: mit\ntags: [math]\n---\n\n# My merge\n\nHand-written notes.\n"
    (ckpt / "README.md").write_text(readme)
    recipe = {"merge_method": "ties", "base_model": "Qwen/Qwen2.5-Math-7B",
              "models": [{"model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}, {"model": str(tmp_path / "m")},
                         {"model": "./ckpts/mine"}, {"model": "org/local"}, {"model": "Qwen/Qwen2.5-Math-7B"}]}
    (ckpt / "suture_merge.yaml").write_text(yaml.safe_dump(recipe))

    result = publish(ckpt, "alice/merged", dry_run=True)
    card = ModelCard(result.card)
    assert card.data.base_model == ["Qwen/Qwen2.5-Math-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"]
    assert card.data.license == "mit" and card.data.tags[0] == "math" and "suture" in card.data.tags
    assert card.text.strip().endswith("Hand-written notes.")
    assert (ckpt / "README.md").read_text() == readme
    assert [path for path, _ in result.files].count("README.md") == 1  # the card replaces the folder's README
    assert dict(result.files)["README.md"] == len(result.card.encode())


@pytest.mark.parametrize("model_type", ["suture_hybrid", "llama"])
def test_minimal_card_says_how_to_load(ckpt, model_type):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    (ckpt / "mergekit_config.yml").write_text("merge_method: linear\nmodels:\n  - model: a/b\n")
    card = publish(ckpt, "alice/h", dry_run=True).card
    assert ('from_pretrained("alice/h")' in card) and (("import suture" in card) == (model_type == "suture_hybrid"))
    assert "merge_method: linear" in card  # the recipe inline
    assert ModelCard(card).data.base_model == [SOURCE, "a/b"]


def _damage(folder: Path, kind: str) -> Path:
    if kind == "missing":
        return folder / "nope"
    if kind == "no_config":
        (folder / "config.json").unlink()
    if kind in ("no_weights", "pickle_only", "hidden_weights_only"):
        (folder / "model.safetensors").unlink()
    if kind == "pickle_only":
        (folder / "pytorch_model.bin").write_bytes(b"pickle")
    if kind == "missing_shard":
        index = {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("kind, match", [
    ("missing", "is not a directory"), ("no_config", "no config.json"), ("no_weights", "no weights"),
    ("pickle_only", "only pickle weights"), ("hidden_weights_only", "no weights"),
    ("missing_shard", "missing: model-00002-of-00002.safetensors"),
])
def test_folders_that_are_not_publishable_are_refused(hub, ckpt, kind, match):
    folder = _damage(ckpt, kind)
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        publish(folder, "alice/x", token=TOKEN, endpoint=hub.url)
    res = _invoke([str(folder), "alice/x", "--dry-run"])
    assert res.exit_code == 1 and "error:" in res.output
    assert hub.requests == []


@pytest.mark.parametrize("token, repo_id, status, hint", [
    (BAD_TOKEN, "alice/x", 401, "HF_TOKEN"), (TOKEN, "forbidden/x", 403, "write access"),
])
def test_hub_errors_are_clear_and_never_show_the_token(hub, ckpt, caplog, capfd, monkeypatch, token, repo_id,
                                                       status, hint):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PublishError) as info:
        publish(ckpt, repo_id, token=token, endpoint=hub.url)
    message = str(info.value)
    assert f"HTTP {status}" in message and hint in message and "creating the repository" in message
    assert hub.requests[0][2] == f"Bearer {token}" and hub.commits == []
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", token)
    res = _invoke([str(ckpt), repo_id])
    assert res.exit_code == 1 and "error:" in res.output and f"HTTP {status}" in res.output
    captured = capfd.readouterr()
    for text in ("".join(traceback.format_exception(info.value)), res.output, captured.out, captured.err, caplog.text):
        assert token not in text


def test_unreachable_hub_is_a_clear_error(ckpt):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PublishError, match=f"could not reach http://127.0.0.1:{port}"):
        publish(ckpt, "alice/x", token=TOKEN, endpoint=f"http://127.0.0.1:{port}")


def test_repo_id_must_be_owner_slash_name(ckpt):
    with pytest.raises(ValueError, match="owner/name"):
        publish(ckpt, "just-a-name", dry_run=True)
