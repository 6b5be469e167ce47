"""`hybridize`: checkpoint directory -> hybrid checkpoint directory, streaming one tensor at a time.

The output's tensor list is planned from a meta-device (weightless) hybrid before anything is read: every tensor
of the source is accounted for (copied under its own name, used to seed a mixer, dropped with the replaced
attention, or ignored as a stored copy of a tied weight equal to it, as transformers ignores it), every tensor of
the hybrid has a source (a copy or a fresh MIL-initialised mixer), and any mismatch is an error naming the tensors
before a byte is written. Tensors are then read with positioned reads and written
straight into the planned safetensors shards, so the peak memory is about one layer's mixer plus one tensor,
whatever the model size. The result is bit-identical to `hybridize_model` on the loaded source.

The source may be a suture hybrid (`suture.surgery.rehybrid`): its mixers are carried over like every other kept
tensor, and the new mixers are built from the `teacher` checkpoint's attention (only those layers' tensors are
read) or, without one, from the hybrid's own attention at those layers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..architectures import HybridConfig, HybridForCausalLM
from ..architectures.families import FAMILIES, get_family
from ..io.checkpoint import DTYPES, CheckpointReader, ShardedSafetensorsWriter, copy_tokenizer_files
from ..io import atomic_output_dir, check_output_dir, read_json
from ..io.parse import parse_dtype
from ..layer_kinds import mixer_kind_names
from .layers import LayerSelection, SelectionSpec, resolve_selection
from .mil import mixer_tensor
from .record import checkpoint_facts, lineage_record, model_card, sambay_record, surgery_record
from .rehybrid import check_teacher, hybrid_config, is_hybrid, new_mixer_layers
from .sambay import DEFAULT_WINDOW, LAYOUTS
from .seeds import DEFAULT_GMU_INIT, get_gmu_seed, new_mixer, new_mixer_sources

# Buffers some older checkpoints saved that today's modules recompute (transformers ignores them on load too).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class HybridizeResult:
    out: Path
    layer_types: list[str]
    replaced: list[int]  # the layers replaced now
    carried: list[int] = field(default_factory=list)  # a hybrid source's mixer layers, carried over
    surgery: dict = field(repr=False, default_factory=dict)


def load_source_config(src: str | Path):
    """The source's config: a transformers config of a family suture can hybridize, or a suture hybrid's."""
    src = Path(src)
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{src} has no config.json: pass a Hugging Face checkpoint directory.")
    model_type = read_json(path, "model config").get("model_type")
    if model_type == HybridConfig.model_type:
        return HybridConfig.from_pretrained(src)
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not a family suture can hybridize; supported: "
                         f"{', '.join(FAMILIES)}, or a suture hybrid.")
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
    selection: SelectionSpec | LayerSelection | list[int] | None = None,
    mixer: str = "mamba",
    teacher: str | Path | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int | str = "5GB",
    checksum: bool = True,
    scores: dict | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    layout: str | None = None,
    window: int | None = None,
    gmu_init: str | None = None,
    **mixer_overrides,
) -> HybridizeResult:
    """Write a hybrid of the checkpoint `src` to `out`, replacing `selection.replace` by `mixer` layers, or laid out
    as `layout` says.

    `src` is a transformer (llama, qwen2, qwen3, mistral) or a suture hybrid. A hybrid's mixer layers are carried
    over, as are its MLPs, norms, embeddings and kept attention, and only its attention layers can be replaced
    (`suture.surgery.rehybrid`); the selection is resolved against its layers (`resolve_selection`).

    Args:
        selection: how to choose the layers to replace (a `SelectionSpec`, e.g. ``SelectionSpec(ratio=0.5,
            select="importance", data="calib.jsonl")``, resolved against `src`), the layers chosen already
            (`suture.surgery.select_layers`), or a plain list of indices. Leave it out with a `layout`.
        mixer: the layer kind of the replaced layers: "mamba" (Mamba-1, M1 / Apriel-H1 style), "mamba2"
            (MambaInLlama Mamba-2 style) or any registered kind with a transfer table.
        teacher: with a hybrid `src`, the checkpoint directory of the original transformer: its attention at the
            newly replaced layers initialises their mixers (default: the hybrid's own attention there). Only those
            layers' tensors are read; its config and tensor shapes are checked against the hybrid first.
        seed: seeds the fresh init of each mixer (with the layer index; see `suture.surgery.seeds`).
        dtype: cast every floating tensor to this dtype (default: keep the source's; new mixers take the dtype of
            the source's attention they replace).
        allow_pickle: accept pickle `.bin` weights (loaded with `torch.load(weights_only=True)`).
        checksum: record the SHA-256 of every source (and teacher) weight file in surgery.json.
        scores: per-layer importance scores to record with a `LayerSelection` (`ImportanceReport.to_dict()`); a
            `SelectionSpec` by importance records the report it selected by.
        on_progress: called as (phase, done, total) with phase "importance" (probe preparations and forward
            passes, when a `SelectionSpec` scores the layers), "checksum" (bytes) or "tensors" (bytes written).
        layout: "sambay" (`suture.surgery.sambay`): every layer's kind is set by the layout (Mamba layers of kind
            `mixer`, sliding-window attention, the memory layer, the KV source, GMU and cross-attention layers), in
            place of a selection; transformer sources only.
        window: with `layout="sambay"`, the sliding window of the self-decoder's attention layers (default
            `suture.surgery.sambay.DEFAULT_WINDOW`).
        gmu_init: with `layout="sambay"`, how GMU layers are seeded (`suture.surgery.seeds.GMU_SEEDS`; default
            `DEFAULT_GMU_INIT`).
        mixer_overrides: `HybridConfig` mixer fields (e.g. ``mamba_d_state=16``); with a hybrid `src` only its own
            values.
    """
    if mixer not in mixer_kind_names():
        raise ValueError(f"mixer must be one of {', '.join(mixer_kind_names())}, got {mixer!r}.")
    src, teacher = Path(src), None if teacher is None else Path(teacher)
    out = check_output_dir(out, force, [src, teacher])
    cast = parse_dtype(dtype, what="dtype")
    source_config = load_source_config(src)
    from_hybrid = is_hybrid(source_config)
    if teacher is not None and not from_hybrid:
        raise ValueError(f"A teacher applies to a hybrid source only; {src} is a {source_config.model_type} "
                         "transformer, whose own attention initialises the mixers: leave the teacher out.")
    n = source_config.num_hidden_layers
    layer_types, selection, scores, layout_fields = _layer_types(
        src, source_config, selection, layout, window, gmu_init, mixer, seed, scores, on_progress)
    gmu_init = layout_fields.get("gmu_init", DEFAULT_GMU_INIT)
    clash = sorted(set(mixer_overrides) & set(layout_fields))
    if clash:
        raise ValueError(f"--layout {layout} sets {', '.join(clash)}: leave {'them' if len(clash) > 1 else 'it'} out "
                         "of the mixer overrides (the window is --window).")
    config = hybrid_config(source_config, layer_types, **mixer_overrides,
                           **{k: v for k, v in layout_fields.items() if k != "gmu_init"})
    config.architectures = ["HybridForCausalLM"]
    new = new_mixer_layers(source_config, config)
    if not new:
        what = f"the {len(config.attention_layer_indices)} attention layers" if from_hybrid else f"the {n} layers"
        raise ValueError(f"The selection replaces none of {what} of {src}, so the hybrid would be the source "
                         "itself: pass at least one layer index (see suture.surgery.select_layers).")
    source_class = HybridForCausalLM if from_hybrid else get_family(source_config.model_type).causal_lm_class

    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(CheckpointReader(src, allow_pickle=allow_pickle))
        teacher_reader, teacher_config = None, None
        if teacher is not None:
            teacher_config = load_source_config(teacher)
            teacher_reader = stack.enter_context(CheckpointReader(teacher, allow_pickle=allow_pickle))
            check_teacher(config, teacher_config, {name: t.shape for name, t in teacher_reader.index.items()}, new,
                          str(teacher))
        tied_copies = _resolve_stored_tied_copies(reader, source_class, source_config)
        ignored = _check_source(reader, _meta_tensors(source_class, source_config)[0], src, source_config,
                                {entry["name"] for entry in tied_copies if entry["equal"]})
        config.tie_word_embeddings = source_config.tie_word_embeddings  # untied above if a stored head differs
        plan, fresh_dtype = _plan(config, reader, cast, new)
        config.dtype = fresh_dtype
        total = sum(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in plan)
        readers = [r for r in (reader, teacher_reader) if r is not None]
        digests = _checksums(readers, on_progress) if checksum else [{} for _ in readers]
        with atomic_output_dir(out, force, [src, teacher]) as tmp:
            with ShardedSafetensorsWriter(tmp, plan, max_shard_size) as writer:
                _stream(reader, teacher_reader or reader, config, plan, new, writer, seed, total, on_progress,
                        gmu_init)
            config.save_pretrained(tmp)
            copied = copy_tokenizer_files(src, tmp)
            used = {name for name, _, _ in plan if mixer_tensor(config, name, new) is None}
            lineage = None
            if from_hybrid:
                teacher_facts = checkpoint_facts(teacher, teacher_config, digests[1]) if teacher else None
                lineage = lineage_record(src, source_config, new, selection.reasons, teacher_facts)
            dropped = sorted(name for name in reader.index if name not in used and name not in ignored)
            surgery = surgery_record(checkpoint_facts(src, source_config, digests[0]), config, selection, mixer,
                                     seed, mixer_overrides, scores, dropped, ignored, copied, tied_copies, lineage,
                                     layout=sambay_record(layout_fields) if layout else None)
            (tmp / "surgery.json").write_text(json.dumps(surgery, indent=2) + "\n")
            (tmp / "README.md").write_text(model_card(surgery, out.name))
    carried = source_config.mixer_layer_indices if from_hybrid else []
    return HybridizeResult(out, list(config.layer_types), new, list(carried), surgery)


def _layer_types(src: Path, source_config, selection, layout, window, gmu_init, mixer, seed, scores, on_progress):
    """(`layer_types` for `hybrid_config`, the `LayerSelection` to record, the scores to record, the layout's config
    fields and GMU seed) from a selection or a layout; errors when both, neither, or layout options without one."""
    n = source_config.num_hidden_layers
    from_hybrid = is_hybrid(source_config)
    if layout is None:
        if window is not None or gmu_init is not None:
            raise ValueError("--window and --gmu-init apply to a layout only (--layout sambay).")
        if selection is None:
            raise ValueError("Choose the layers to replace (--mamba-layers, --keep-attention, --ratio, --preset) or "
                             "a layout (--layout sambay).")
        selection, scores = resolve_selection(selection, src, n, mixer, seed, scores, on_progress,
                                              layer_types=source_config.layer_types if from_hybrid else None)
        bad = [i for i in selection.replace if not 0 <= i < n]
        if bad:
            raise ValueError(f"Layer indices {bad} are out of range: {src} has {n} layers (0..{n - 1}).")
        replaced = set(selection.replace)
        return [mixer if i in replaced else None for i in range(n)], selection, scores, {}
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    if selection is not None:
        raise ValueError(f"--layout {layout} sets the kind of every layer: leave out the layer selection "
                         "(--mamba-layers, --keep-attention, --ratio, --preset).")
    if from_hybrid:
        raise ValueError(f"--layout {layout} converts a transformer; {src} is a suture hybrid: convert the original "
                         "transformer it was made from.")
    gmu_init = DEFAULT_GMU_INIT if gmu_init is None else get_gmu_seed(gmu_init).name
    plan = LAYOUTS[layout](source_config, mixer=mixer, window=DEFAULT_WINDOW if window is None else window)
    return plan.layer_types, plan.selection(gmu_init), scores, {**plan.config_fields, "gmu_init": gmu_init}


def _plan(config: HybridConfig, reader: CheckpointReader, cast: torch.dtype | None, new: list[int]):
    """(name, shape, dtype) of every output tensor, in model order, and the dtype of the new mixers (that of the
    source's attention weights they replace)."""
    seed_tensor = f"model.layers.{new[0]}.self_attn.o_proj.weight"  # every family's attention has it
    fresh_dtype = cast or DTYPES[reader.index[seed_tensor].dtype]
    plan = []
    for name, (shape, _) in _meta_tensors(HybridForCausalLM, config)[0].items():
        if mixer_tensor(config, name, new) is not None:
            plan.append((name, shape, fresh_dtype))
            continue
        source_dtype = DTYPES[reader.index[name].dtype]
        plan.append((name, shape, cast if cast is not None and source_dtype.is_floating_point else source_dtype))
    return plan, fresh_dtype


def _checksums(readers: list[CheckpointReader], on_progress) -> list[dict[str, str]]:
    """SHA-256 of every weight file of each reader's checkpoint, with one progress total for all of them."""
    total = sum(Path(f).stat().st_size for reader in readers for f in reader.files)
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if on_progress:
            on_progress("checksum", done, total)

    return [reader.sha256(advance) for reader in readers]


def _stream(reader, init_reader, config, plan, new, writer, seed, total, on_progress, gmu_init) -> None:
    """Write every planned tensor; a new mixer is built once, when its first tensor comes up, from the tensors of its
    layer in `init_reader` (the source's own, or the teacher's) that its seed reads (`new_mixer_sources`)."""
    mixer_layer, mixer_state, done = None, {}, 0
    for name, shape, dtype in plan:
        fresh = mixer_tensor(config, name, new)
        if fresh is not None:
            i, key = fresh
            if i != mixer_layer:
                sources = new_mixer_sources(config, i, gmu_init)
                weights = {source: init_reader.read(f"model.layers.{i}.{source}") for source in sources}
                mixer = new_mixer(config, i, weights, seed=seed, dtype=dtype, gmu_init=gmu_init)
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
