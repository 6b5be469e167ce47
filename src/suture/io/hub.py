"""Publish a checkpoint directory to the Hugging Face Hub: validate it, complete its model card, upload one commit.

The user's folder is never modified: the model card (README.md with hub front matter: `library_name`, `tags`,
`base_model` from the lineage files suture writes) is built in memory and replaces README.md in the commit only.

The token is whatever huggingface_hub resolves (the `token` argument, else HF_TOKEN, else the stored login); it is
never printed, logged or put in an error message: hub errors are re-raised as `PublishError` with any token scrubbed.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import __version__
from .cards import SUTURE_URL, complete_card, load_section, render_card
from .outputs import HUB_ID, is_hub_id, read_json, read_weight_map

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Lineage files, first found wins: suture's merge recipe, then mergekit's, then a JSON recipe.
RECIPE_FILES = ("suture_merge.yaml", "mergekit_config.yml", "merge.json")
# Entries never uploaded: hidden files and folders (.git, .cache, temporary dirs, .env) and Python caches.
SKIPPED_DIRS = ("__pycache__",)
_TOKEN_LIKE = re.compile(r"(hf_[A-Za-z0-9]{6,}|Bearer\s+\S+)")


class PublishError(RuntimeError):
    """The hub refused the upload or could not be reached (the message never contains the token)."""


@dataclass
class PublishResult:
    """What was (or, with `dry_run`, would be) published; `files` are (path in repo, bytes) in upload order."""

    repo_id: str
    url: str
    endpoint: str
    private: bool
    revision: str | None
    files: list[tuple[str, int]]
    skipped: list[str]
    card: str
    base_model: list[str]
    dry_run: bool
    commit_url: str | None = None
    commit_message: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Lineage:
    """Where a checkpoint came from: hub ids of its inputs and the raw lineage records."""

    base_model: list[str]
    surgery: dict | None = None
    recipe_file: str | None = None
    recipe_text: str | None = None
    merge_method: str | None = None


def list_upload_files(folder: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(path in repo, local path) of every file to upload, sorted, and the skipped hidden / cache entries."""
    files, skipped = [], []
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        for name in sorted(dirs):
            if name.startswith(".") or name in SKIPPED_DIRS:
                skipped.append((rel_root / name).as_posix() + "/")
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in sorted(names):
            rel = (rel_root / name).as_posix()
            if name.startswith("."):
                skipped.append(rel)
            else:
                files.append((rel, Path(root) / name))
    return files, skipped


def check_checkpoint(folder: Path, names: set[str]) -> None:
    """Refuse folders that are not a loadable safetensors checkpoint (`names`: the top-level files to upload)."""
    if "config.json" not in names:
        raise ValueError(f"{folder} has no config.json: publish a directory written by save_pretrained, "
                         "`suture hybridize` or `suture merge`.")
    for index in sorted(n for n in names if n.endswith(".safetensors.index.json")):
        missing = sorted(set(read_weight_map(folder / index).values()) - names)
        if missing:
            raise ValueError(f"{folder / index} names shards that are missing: {', '.join(missing)}.")
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(f"{folder} holds only pickle weights ({', '.join(pickles)}), which run code when loaded; "
                         "re-save with save_pretrained(..., safe_serialization=True) and publish the safetensors.")
    raise ValueError(f"{folder} has no weights (*.safetensors or a model.safetensors.index.json).")


def read_lineage(folder: Path) -> Lineage:
    """Hub ids of the inputs from surgery.json (`source.name`) and a merge recipe (`base_model`, `models[].model`)."""
    names: list[str] = []
    lineage = Lineage(base_model=names)
    if (folder / "surgery.json").is_file():
        lineage.surgery = read_json(folder / "surgery.json", "surgery record")
        names.append((lineage.surgery.get("source") or {}).get("name"))
    for recipe_file in RECIPE_FILES:
        if (folder / recipe_file).is_file():
            text = (folder / recipe_file).read_text()
            try:
                recipe = yaml.safe_load(text) or {}  # YAML is a superset of JSON
            except yaml.YAMLError as err:
                raise ValueError(f"{folder / recipe_file} is not valid YAML/JSON: {err}") from None
            lineage.recipe_file, lineage.recipe_text = recipe_file, text
            lineage.merge_method = recipe.get("merge_method") if isinstance(recipe, dict) else None
            if isinstance(recipe, dict):
                names.append(recipe.get("base_model"))
                names += [m.get("model") for m in recipe.get("models") or [] if isinstance(m, dict)]
            break
    lineage.base_model = list(dict.fromkeys(n for n in names if is_hub_id(n, folder)))
    return lineage


def build_model_card(folder: Path, repo_id: str, lineage: Lineage, model_type: str | None) -> str:
    """README.md text: the folder's own card or a minimal one, with suture's tags and the lineage's base models
    added to its metadata; the folder is not touched."""
    readme = folder / "README.md"
    name = repo_id.split("/")[-1]
    text = (readme.read_text(encoding="utf-8") if readme.is_file()
            else render_card(name, _card_body(repo_id, lineage, model_type), tags=[]))
    tags = ["suture"] + (["merge"] if lineage.recipe_file else []) + (["hybrid"] if lineage.surgery else [])
    return complete_card(text, readme, tags=tags, base_model=lineage.base_model)


def _card_body(repo_id: str, lineage: Lineage, model_type: str | None) -> str:
    made = f"A checkpoint published with [suture]({SUTURE_URL})."
    if lineage.surgery:
        source = lineage.surgery.get("source") or {}
        made = (f"An attention + Mamba hybrid of `{source.get('name')}` made with [suture]({SUTURE_URL}) "
                f"`hybridize` (mixer: `{lineage.surgery.get('mixer')}`); `surgery.json` records the layer selection "
                "and weight transfer.")
    elif lineage.recipe_file:
        made = (f"A `{lineage.merge_method}` merge made with [suture]({SUTURE_URL}) `merge`, from the recipe below "
                f"(`{lineage.recipe_file}`).")
    lines = [made, "", load_section(repo_id, hybrid=model_type == "suture_hybrid"), ""]
    if lineage.recipe_text:
        fence = "json" if lineage.recipe_file.endswith(".json") else "yaml"
        lines += ["## Recipe", "", f"```{fence}", lineage.recipe_text.rstrip(), "```"]
    return "\n".join(lines)


def publish(folder: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False, token: str | None = None,
            commit_message: str | None = None, revision: str | None = None,
            endpoint: str | None = None) -> PublishResult:
    """Upload checkpoint `folder` to the model repo `repo_id` (created if missing) in one commit.

    `private` only applies when the repo is created (without it, the namespace's default visibility applies).
    `endpoint` defaults to HF_ENDPOINT (read now, not at import) or huggingface.co. `dry_run` validates and builds
    the plan and the model card without any network access. Raises FileNotFoundError / ValueError for a folder
    that is not a publishable checkpoint, PublishError when the hub refuses or cannot be reached.
    """
    from huggingface_hub import constants

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory: pass a checkpoint directory.")
    if not HUB_ID.match(repo_id) or ".." in repo_id:
        raise ValueError(f"REPO_ID must look like owner/name (letters, digits, '-', '_', '.'), got {repo_id!r}.")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    local, skipped = list_upload_files(folder)
    check_checkpoint(folder, {rel for rel, _ in local if "/" not in rel})
    lineage = read_lineage(folder)
    model_type = read_json(folder / "config.json", "model config").get("model_type")
    card = build_model_card(folder, repo_id, lineage, model_type)
    local = [(rel, path) for rel, path in local if rel != "README.md"]
    files = [(rel, path.stat().st_size) for rel, path in local] + [("README.md", len(card.encode()))]
    result = PublishResult(
        repo_id=repo_id, url=f"{endpoint}/{repo_id}" + (f"/tree/{revision}" if revision else ""), endpoint=endpoint,
        private=private, revision=revision, files=files, skipped=skipped, card=card, base_model=lineage.base_model,
        dry_run=dry_run, commit_message=commit_message or f"Upload {folder.resolve().name} with suture {__version__}")
    if skipped:
        result.notes.append(f"not uploaded (hidden or cache entries): {', '.join(skipped)}")
    if not dry_run:
        result.commit_url = _upload(local, card, result, token)
    return result


def _upload(local: list[tuple[str, Path]], card: str, plan: PublishResult, token: str | None) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=plan.endpoint, token=token)
    repo_id, revision = plan.repo_id, plan.revision
    with _hub_errors("creating the repository", plan, token):
        # private=None leaves the namespace's default visibility (an org may default to private) in charge
        api.create_repo(repo_id, repo_type="model", private=True if plan.private else None, exist_ok=True)
    if revision and revision != "main" and not revision.startswith("refs/"):
        with _hub_errors(f"creating branch {revision!r}", plan, token):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in local]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    with _hub_errors("uploading the files", plan, token):
        info = api.create_commit(repo_id, operations, commit_message=plan.commit_message, repo_type="model",
                                 revision=revision)
    return info.commit_url


@contextlib.contextmanager
def _hub_errors(step: str, plan: PublishResult, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub / HTTP client errors into a PublishError that names the step and never the token;
    `from None` keeps the original (whose request carries the Authorization header) out of the traceback."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    secret = token or get_token()
    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        detail = _scrub((err.server_message or "").strip()[:300], secret)
        message = f"{plan.endpoint} refused {step} for {plan.repo_id} (HTTP {status})"
        message += f": {detail}" if detail else "."
        raise PublishError(message + _hint(status, plan)) from None
    except OfflineModeIsEnabled:
        raise PublishError(f"HF_HUB_OFFLINE is set, so {step} cannot reach {plan.endpoint}; unset it or use "
                           "--dry-run.") from None
    except _network_errors() as err:
        raise PublishError(f"could not reach {plan.endpoint} while {step} ({type(err).__name__}); check the "
                           "network and HF_ENDPOINT.") from None


def _hint(status: int | None, plan: PublishResult) -> str:
    owner = plan.repo_id.split("/")[0]
    if status == 401:
        return " The token was not accepted: set HF_TOKEN or run `hf auth login` with a write token."
    if status == 403:
        return f" The token cannot write to {owner!r}: use a token with write access to that namespace."
    if status == 404:
        return f" Check that {plan.repo_id} and revision {plan.revision or 'main'!r} exist and are visible to you."
    return ""


def _scrub(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    return _TOKEN_LIKE.sub("***", text)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(__import__(module), name))
    return tuple(found)
