"""`hybridize`: checkpoint directory -> hybrid checkpoint directory, streaming one tensor at a time.

The output's tensor list is planned from a meta-device (weightless) hybrid before anything is read: every tensor
of the source is accounted for (copied under its own name, used to seed a mixer, dropped with the replaced
attention, or ignored as a stored copy of a tied weight equal to it, as transformers ignores it), every tensor of
the hybrid has a source (a copy or a fresh MIL-initialised mixer), and any mismatch is an error naming the tensors
before a byte is written. Tensors are then read with positioned reads and written
straight into the planned safetensors shards, so the peak memory is about one layer's mixer plus one tensor,
whatever the model size. The result is bit-identical to `hybridize_model` on the loaded source.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..architectures import HybridConfig, HybridForCausalLM
from ..architectures.families import FAMILIES, get_family
from ..io.checkpoint import DTYPES, CheckpointReader, ShardedSafetensorsWriter, copy_tokenizer_files
from ..io import atomic_output_dir, check_output_dir, is_hub_id, read_json
from ..io.cards import SUTURE_URL, load_section, render_card
from ..io.parse import parse_dtype
from ..layer_kinds import get_layer_kind, mixer_kind_names
from .layers import LayerSelection, SelectionSpec, resolve_selection
from .mil import mil_mixer, mixer_tensor

# Buffers some older checkpoints saved that today's modules recompute (transformers ignores them on load too).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class HybridizeResult:
    out: Path
    layer_types: list[str]
    replaced: list[int]
    surgery: dict = field(repr=False, default_factory=dict)


def load_source_config(src: str | Path):
    """The source's transformers config, after checking that its family is one suture can hybridize."""
    src = Path(src)
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src} has no config.json: pass a Hugging Face checkpoint directory.")
    model_type = read_json(path, "model config").get("model_type")
    if model_type == HybridConfig.model_type:
        raise ValueError(f"{src} is already a suture hybrid; hybridize its teacher (the original transformer).")
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not a family suture can hybridize; supported: "
                         f"{', '.join(FAMILIES)}.")
    return get_family(model_type).config_class.from_pretrained(src)


def _meta_tensors(model_class, config) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, str]]:
    """Names and shapes of the tensors a checkpoint of `model_class(config)` holds (tied copies excluded), and the
    tied copies as {copy: the tensor it shares}, e.g. {"lm_head.weight": "model.embed_tokens.weight"}."""
    with torch.device("meta"):
        model = model_class(config)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items() if n not in tied}, tied


def _resolve_stored_tied_copies(reader: CheckpointReader, source_class, source_config) -> list[dict]:
    """Tied copies the checkpoint stores anyway (e.g. `lm_head.weight` beside a tied embedding), resolved the way
    transformers' `from_pretrained` resolves them, so the hybrid computes what the loaded source computes.

    transformers ties the two only when the stored values are equal (the copy is then ignored); when they differ it
    warns and loads both, untied. A differing copy therefore unties `source_config` (and with it the hybrid, which
    then copies the stored head). Each such pair is read once, whole, to compare it.
    """
    found = []
    for copy, original in _meta_tensors(source_class, source_config)[1].items():
        if copy not in reader or original not in reader:  # nothing stored twice (a missing original: _check_source)
            continue
        equal = _equal_tensors(reader, copy, original)
        resolution = (f"ignored: equal to {original}, which the tied weight uses" if equal else
                      f"copied: differs from {original}, so transformers loads the source untied although config.json "
                      "sets tie_word_embeddings; the hybrid is untied too")
        found.append({"name": copy, "tied_to": original, "equal": equal, "resolution": resolution})
    if not all(entry["equal"] for entry in found):
        source_config.tie_word_embeddings = False
    return found


def _equal_tensors(reader: CheckpointReader, a: str, b: str) -> bool:
    """Bit-identical stored tensors (a different dtype counts as different: copying the stored one is exact)."""
    if (reader.index[a].shape, reader.index[a].dtype) != (reader.index[b].shape, reader.index[b].dtype):
        return False
    return torch.equal(reader.read(a), reader.read(b))


def _check_source(reader: CheckpointReader, expected: dict, src: Path, config, tied_copies=()) -> list[str]:
    """Compare the checkpoint's tensors with what its config describes; returns ignorable extras (old buffers and
    the stored `tied_copies` the source loads tied)."""
    names = set(reader.index)
    missing = sorted(set(expected) - names)
    extra = sorted(n for n in names - set(expected) if not n.endswith(_IGNORABLE_SUFFIXES) and n not in tied_copies)
    where = f"{src} (model_type {config.model_type}, {config.num_hidden_layers} layers in config.json)"
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensors its config requires, e.g. {missing[:5]}. "
                         "Is the checkpoint complete and does config.json belong to it?")
    if extra:
        raise ValueError(f"{where} holds {len(extra)} tensors its config does not describe, e.g. {extra[:5]}. "
                         "Does config.json belong to these weights?")
    for name, (shape, _) in expected.items():
        if reader.index[name].shape != shape:
            raise ValueError(f"{src}: tensor {name!r} has shape {list(reader.index[name].shape)}, but config.json "
                             f"implies {list(shape)}.")
    return sorted(names - set(expected))


def hybridize(
    src: str | Path,
    out: str | Path,
    selection: SelectionSpec | LayerSelection | list[int],
    mixer: str = "mamba",
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int | str = "5GB",
    checksum: bool = True,
    scores: dict | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    **mixer_overrides,
) -> HybridizeResult:
    """Write a hybrid of the checkpoint `src` to `out`, replacing `selection.replace` by `mixer` layers.

    Args:
        selection: how to choose the layers to replace (a `SelectionSpec`, e.g. ``SelectionSpec(ratio=0.5,
            select="importance", data="calib.jsonl")``, resolved against `src`), the layers chosen already
            (`suture.surgery.select_layers`), or a plain list of indices.
        mixer: the layer kind of the replaced layers: "mamba" (Mamba-1, M1 / Apriel-H1 style), "mamba2"
            (MambaInLlama Mamba-2 style) or any registered kind with a transfer table.
        seed: seeds the fresh init of each mixer (with the layer index; see `mil_mixer`).
        dtype: cast every floating tensor to this dtype (default: keep the source's; new mixers take the dtype of
            the attention they replace).
        allow_pickle: accept pickle `.bin` weights (loaded with `torch.load(weights_only=True)`).
        checksum: record the SHA-256 of every source weight file in surgery.json.
        scores: per-layer importance scores to record with a `LayerSelection` (`ImportanceReport.to_dict()`); a
            `SelectionSpec` by importance records the report it selected by.
        on_progress: called as (phase, done, total) with phase "importance" (probe preparations and forward
            passes, when a `SelectionSpec` scores the layers), "checksum" (bytes) or "tensors" (bytes written).
        mixer_overrides: `HybridConfig` mixer fields (e.g. ``mamba_d_state=16``).
    """
    if mixer not in mixer_kind_names():
        raise ValueError(f"mixer must be one of {', '.join(mixer_kind_names())}, got {mixer!r}.")
    src, out = Path(src), check_output_dir(out, force, [src])
    cast = parse_dtype(dtype, what="dtype")
    source_config = load_source_config(src)
    n = source_config.num_hidden_layers
    selection, scores = resolve_selection(selection, src, n, mixer, seed, scores, on_progress)
    bad = [i for i in selection.replace if not 0 <= i < n]
    if bad:
        raise ValueError(f"Layer indices {bad} are out of range: {src} has {n} layers (0..{n - 1}).")
    if not selection.replace:
        raise ValueError(f"The selection replaces none of the {n} layers of {src}, so the hybrid would be the source "
                         "itself: pass at least one layer index (see suture.surgery.select_layers).")
    replaced = set(selection.replace)
    source_class = get_family(source_config.model_type).causal_lm_class

    with CheckpointReader(src, allow_pickle=allow_pickle) as reader:
        tied_copies = _resolve_stored_tied_copies(reader, source_class, source_config)
        ignored = _check_source(reader, _meta_tensors(source_class, source_config)[0], src, source_config,
                                {entry["name"] for entry in tied_copies if entry["equal"]})
        config = HybridConfig.from_source(source_config, [mixer if i in replaced else None for i in range(n)],
                                          **mixer_overrides)
        config.architectures = ["HybridForCausalLM"]
        plan, fresh_dtype = _plan(config, reader, cast)
        config.dtype = fresh_dtype
        total = sum(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in plan)
        digests = _checksums(reader, on_progress) if checksum else {}
        with atomic_output_dir(out, force, [src]) as tmp:
            with ShardedSafetensorsWriter(tmp, plan, max_shard_size) as writer:
                _stream(reader, config, plan, writer, seed, total, on_progress)
            config.save_pretrained(tmp)
            copied = copy_tokenizer_files(src, tmp)
            used = {name for name, _, _ in plan if mixer_tensor(config, name) is None}
            surgery = _surgery_record(src, source_config, config, selection, mixer, seed, mixer_overrides,
                                      digests, scores, reader, used, ignored, copied, tied_copies)
            (tmp / "surgery.json").write_text(json.dumps(surgery, indent=2) + "\n")
            (tmp / "README.md").write_text(model_card(surgery, out.name))
    return HybridizeResult(out, list(config.layer_types), sorted(replaced), surgery)


def _plan(config: HybridConfig, reader: CheckpointReader, cast: torch.dtype | None):
    """(name, shape, dtype) of every output tensor, in model order, and the dtype of the fresh mixers (that of the
    attention weights they are built from)."""
    first = config.mixer_layer_indices[0]
    seed_tensor = f"model.layers.{first}.{next(iter(get_layer_kind(config.layer_types[first]).transfer))}"
    fresh_dtype = cast or DTYPES[reader.index[seed_tensor].dtype]
    plan = []
    for name, (shape, _) in _meta_tensors(HybridForCausalLM, config)[0].items():
        if mixer_tensor(config, name) is not None:
            plan.append((name, shape, fresh_dtype))
            continue
        source_dtype = DTYPES[reader.index[name].dtype]
        plan.append((name, shape, cast if cast is not None and source_dtype.is_floating_point else source_dtype))
    return plan, fresh_dtype


def _checksums(reader: CheckpointReader, on_progress) -> dict[str, str]:
    total = sum(Path(f).stat().st_size for f in reader.files)
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if on_progress:
            on_progress("checksum", done, total)

    return reader.sha256(advance)


def _stream(reader, config, plan, writer, seed, total, on_progress) -> None:
    """Write every planned tensor; a replaced layer's mixer is built once, when its first tensor comes up."""
    mixer_layer, mixer_state, done = None, {}, 0
    for name, shape, dtype in plan:
        fresh = mixer_tensor(config, name)
        if fresh is not None:
            i, key = fresh
            if i != mixer_layer:
                sources = get_layer_kind(config.layer_types[i]).transfer
                weights = {source: reader.read(f"model.layers.{i}.{source}") for source in sources}
                mixer = mil_mixer(config, i, weights, seed=seed, dtype=dtype)
                mixer_layer, mixer_state = i, mixer.state_dict()
                del weights, mixer
            tensor = mixer_state.pop(key)
        else:
            tensor = reader.read(name)
        writer.write(name, tensor.to(dtype))
        done += tensor.numel() * dtype.itemsize
        del tensor
        if on_progress:
            on_progress("tensors", done, total)


def _surgery_record(src, source_config, config, selection, mixer, seed, overrides, digests, scores, reader, used,
                    ignored, copied, tied_copies) -> dict:
    dropped = sorted(n for n in reader.index if n not in used and n not in ignored)
    return {
        "suture_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "path": str(src.resolve()),
            "name": _hub_name(source_config) or src.name,
            "model_type": source_config.model_type,
            "num_hidden_layers": source_config.num_hidden_layers,
            "sha256": digests,
        },
        "mixer": mixer,
        "seed": seed,
        "mixer_overrides": overrides,
        "selection": {"method": selection.method, **selection.detail},
        "layers": [
            {"index": i, "type": kind, "replaced": not get_layer_kind(kind).is_attention,
             "reason": selection.reasons.get(i)}
            for i, kind in enumerate(config.layer_types)
        ],
        "scores": scores,
        "weight_transfer": get_layer_kind(mixer).transfer_description(),
        "fresh_init": get_layer_kind(mixer).fresh_init,
        "dropped_source_tensors": dropped,
        "ignored_source_tensors": ignored,
        "stored_tied_copies": tied_copies,
        "copied_files": copied,
    }


def _hub_name(config) -> str | None:
    name = getattr(config, "_name_or_path", "") or ""
    return name if is_hub_id(name) else None


def model_card(surgery: dict, title: str) -> str:
    """README.md for a hybrid checkpoint: hub metadata, the layer layout and how to load it."""
    source = surgery["source"]
    replaced = [row["index"] for row in surgery["layers"] if row["replaced"]]
    n = len(surgery["layers"])
    rows = "\n".join(f"| {r['index']} | {r['type']} | {r['reason'] or ''} |" for r in surgery["layers"])
    transfer = ", ".join(f"`{source}` -> `{target}`" for source, target in surgery["weight_transfer"].items())
    body = "\n".join([
        f"An attention + Mamba hybrid of `{source['name']}` ({source['model_type']}, {n} layers) made with "
        f"[suture]({SUTURE_URL}) {surgery['suture_version']}: {len(replaced)} of {n} attention "
        f"layers were replaced by `{surgery['mixer']}` mixers initialised from the attention weights they replace "
        f"({transfer}; MLPs, norms and embeddings copied).",
        "", "The replaced layers are initialised, not trained: distill the hybrid from its source before use.", "",
        f"Layer selection: `{surgery['selection']['method']}`.", "",
        "| layer | type | why replaced |", "|---|---|---|", rows, "",
        load_section(title, hybrid=True), "",
        "`surgery.json` records the source checksums, the selection, the scores (if any) and every dropped tensor."])
    return render_card(title, body, tags=["suture", "hybrid", "mamba", surgery["mixer"]], base_model=[source["name"]])
