"""PEFT LoRA adapters: read "base + adapter" tensor by tensor, and extract an adapter from a fine-tune.

`LoraAppliedReader` has `CheckpointReader`'s interface and presents the model PEFT's ``merge_and_unload()`` would
produce, one tensor at a time: ``W + scaling * B @ A`` (fp32, cast back to W's dtype) for targeted weights, the
saved tensor for ``modules_to_save`` / trained biases, the base tensor otherwise. The merged model never exists.

Key naming, as peft (0.13 - 0.21) saves adapters (``get_peft_model_state_dict``; the adapter name is removed)::

    base_model.model.<module>.lora_A.weight       [r, in]       -> <module>.weight [out, in] += s * B @ A
    base_model.model.<module>.lora_B.weight       [out, r]
    base_model.model.<module>.lora_B.bias         [out]         -> <module>.bias += s * bias   (lora_bias=True)
    base_model.model.<module>.lora_embedding_A    [r, vocab]    -> <module>.weight [vocab, d] += s * (B @ A).T
    base_model.model.<module>.lora_embedding_B    [d, r]
    base_model.model.<module>.weight              (modules_to_save; older peft wrote the same key)  -> replaces
    base_model.model.<module>.base_layer.bias     (bias="lora_only"/"all"; .weight: saved embeddings) -> replaces

with ``s = alpha / r`` (``alpha / sqrt(r)`` under ``use_rslora``); r and alpha come from ``rank_pattern`` /
``alpha_pattern`` when a pattern matches the module name (peft's ``get_pattern_key``: first key k in order with
``re.match(rf"(.*\\.)?({k})$", module)``), else from ``r`` / ``lora_alpha``.

`extract_lora` writes such an adapter from ``finetuned - base``: rank-r SVD factors for the 2-D weights of the
decoder layers, ``modules_to_save`` for other changed modules (embeddings, lm_head, norms).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..io.cards import render_card
from ..io.checkpoint import CheckpointReader, TensorInfo
from ..io import atomic_output_dir, check_output_dir, is_hub_id, read_json
from ..io.parse import COMMON_FLOAT_DTYPES, parse_dtype
from .methods.svd import lora_factors

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"

# LoraConfig fields (peft 0.21) whose truthy value changes what merging means: LoRA variants (DoRA, aLoRA, ...),
# parameter targeting, layer replication, trainable tokens. Each is refused by name.
UNSUPPORTED_FIELDS = (
    "use_dora", "use_qalora", "use_bdlora", "velora_config", "alora_invocation_tokens", "monteclora_config",
    "arrow_config", "kasa_config", "layer_replication", "target_parameters", "trainable_token_indices",
)
# init_lora_weights values that modify the base weights themselves (the adapter applies to a residual model) or
# select a variant; a converted PiSSA/OLoRA/CorDA adapter is saved with init_lora_weights=True and is fine.
UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


# ----------------------------------------------------------------------------------------------- reading adapters


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter's ``adapter_config.json``, checked to be plain LoRA (errors name the offending field)."""
    where = Path(adapter_dir) / ADAPTER_CONFIG
    if not where.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory: {ADAPTER_CONFIG} is missing.")
    config = read_json(where, "PEFT adapter config")
    hint = "merge it with peft's merge_and_unload() and use the merged checkpoint instead."
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r} is not supported (only LORA); {hint}")
    for field in UNSUPPORTED_FIELDS:
        if config.get(field):
            raise ValueError(f"{where}: {field}={config[field]!r} is not supported (plain LoRA only); {hint}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(UNSUPPORTED_INITS):
        raise ValueError(f"{where}: init_lora_weights={init!r} changes the base weights, so the adapter does not apply "
                         "to the original base; save it with path_initial_model_for_weight_conversion, or " + hint)
    return config


def _pattern_value(patterns: dict | None, module: str, default):
    """peft's per-module override (``get_pattern_key``): the first pattern matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_scaling(config: dict, module: str) -> tuple[int, float]:
    """(r, scaling) of one targeted module."""
    r = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@dataclass(frozen=True)
class _Delta:
    """What the adapter adds to one base tensor: ``scaling * B @ A`` (``.T`` if transpose), or ``scaling * bias``."""

    a_key: str | None  # None for a lora_B bias
    b_key: str
    scaling: float
    transpose: bool


class LoraAppliedReader:
    """A base checkpoint with a PEFT LoRA adapter applied, read one tensor at a time (see the module docstring).

    Same interface as `CheckpointReader` (``index``, ``read``, ``close``, ``in``, context manager, ``path``,
    ``files``). ``base`` is a checkpoint directory or an open `CheckpointReader` (which then stays the caller's to
    close). The adapter's tensors are read on demand too, so ``modules_to_save`` embeddings are not held either.
    """

    def __init__(self, base: str | Path | CheckpointReader, adapter_dir: str | Path, allow_pickle: bool = False):
        self.adapter_dir = Path(adapter_dir)
        self.config = read_adapter_config(adapter_dir)
        weights = self.adapter_dir / ADAPTER_WEIGHTS
        if not weights.is_file():
            weights = self.adapter_dir / ADAPTER_PICKLE
            if not weights.is_file():
                raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (nor {ADAPTER_PICKLE}).")
            if not allow_pickle:
                raise ValueError(f"{weights} is a pickle file, which can run arbitrary code when loaded. Pass "
                                 "--allow-pickle (Python: allow_pickle=True) to load it with torch.load(weights_only="
                                 f"True), or re-save the adapter as {ADAPTER_WEIGHTS}.")
        self._owns_base = not isinstance(base, CheckpointReader)
        self.base = CheckpointReader(base, allow_pickle) if self._owns_base else base
        try:
            self._adapter = CheckpointReader(weights, allow_pickle)  # a single file: its suffix picks the loader
            self._replace, self._deltas = self._map_keys()
        except BaseException:
            self.close()
            raise
        self.path, self.files = self.base.path, [*self.base.files, weights]
        self.index: dict[str, TensorInfo] = {
            name: TensorInfo(info.shape, info.dtype, str(weights)) if name in self._replace else info
            for name, info in self.base.index.items()
        }

    def _map_keys(self) -> tuple[dict[str, str], dict[str, _Delta]]:
        """Base tensor name -> adapter key replacing it, and -> delta added to it; every key must find its tensor."""
        lora: dict[str, dict[str, str]] = {}  # module -> {"A"|"B"|"bias"|"emb_A"|"emb_B": key}
        replace: dict[str, str] = {}
        for key in self._adapter.index:
            name = key.removeprefix(PEFT_PREFIX)
            for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias"),
                                 (".lora_embedding_A", "emb_A"), (".lora_embedding_B", "emb_B")):
                if name.endswith(suffix):
                    lora.setdefault(name.removesuffix(suffix), {})[part] = key
                    break
            else:
                if re.search(r"(^|\.)lora_", name):
                    raise ValueError(f"{self.adapter_dir}: adapter tensor {key!r} is not plain LoRA (unsupported).")
                if ".original_module." in name:  # bias="all" saves modules_to_save's frozen original too
                    continue
                # modules_to_save and trained biases: full tensors of the base module
                replace[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = key
        deltas: dict[str, _Delta] = {}
        for module, parts in lora.items():
            deltas.update(self._module_deltas(module, parts))
        unmatched = [replace[n] for n in replace if n not in self.base.index]
        unmatched += [d.b_key for n, d in deltas.items() if n not in self.base.index]
        if unmatched:
            raise ValueError(f"{len(unmatched)} adapter tensors of {self.adapter_dir} match no tensor of "
                             f"{self.base.path}: {', '.join(sorted(unmatched)[:8])}. Is this the adapter's base model?")
        for name, key in replace.items():
            self._check_shape(name, key, self.base.index[name].shape)
        return replace, deltas

    def _module_deltas(self, module: str, parts: dict[str, str]) -> dict[str, _Delta]:
        embedding = "emb_A" in parts or "emb_B" in parts
        a_key, b_key = (parts.get("emb_A"), parts.get("emb_B")) if embedding else (parts.get("A"), parts.get("B"))
        if a_key is None or b_key is None or (embedding and len(parts) > 2):
            raise ValueError(f"{self.adapter_dir}: module {module!r} has an incomplete LoRA pair ({sorted(parts)}).")
        r, scaling = _module_scaling(self.config, module)
        shape_a, shape_b = self._adapter.index[a_key].shape, self._adapter.index[b_key].shape
        if len(shape_a) != 2 or len(shape_b) != 2:
            raise ValueError(f"{self.adapter_dir}: {a_key} has shape {list(shape_a)}; only LoRA on linear and "
                             "embedding layers is supported (not convolutions).")
        if shape_a[0] != r or shape_b[1] != r:
            raise ValueError(f"{self.adapter_dir}: {a_key} / {b_key} have rank {shape_a[0]} / {shape_b[1]} but the "
                             f"config gives r={r} for {module!r} (r / rank_pattern).")
        name = module + ".weight"
        # Linear: W [out, in] += B [out, r] @ A [r, in]; fan_in_fan_out (GPT-2 Conv1D) stores W as [in, out];
        # Embedding: W [vocab, d] += (B [d, r] @ A [r, vocab]).T
        transpose = embedding or bool(self.config.get("fan_in_fan_out"))
        out = {name: _Delta(a_key, b_key, scaling, transpose)}
        if name in self.base.index:
            delta_shape = (shape_a[1], shape_b[0]) if transpose else (shape_b[0], shape_a[1])
            self._check_shape(name, f"{b_key} @ {a_key}", delta_shape)
        if "bias" in parts:  # lora_bias=True: merged bias = bias + scaling * lora_B.bias
            out[module + ".bias"] = _Delta(None, parts["bias"], scaling, False)
            if module + ".bias" in self.base.index:
                self._check_shape(module + ".bias", parts["bias"], self._adapter.index[parts["bias"]].shape)
        return out

    def _check_shape(self, name: str, what: str, shape: tuple[int, ...]) -> None:
        if name in self.base.index and tuple(shape) != self.base.index[name].shape:
            raise ValueError(f"Shape mismatch for {name!r}: the base has {list(self.base.index[name].shape)}, the "
                             f"adapter's {what} gives {list(shape)} ({self.adapter_dir}).")

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def read(self, name: str) -> torch.Tensor:
        tensor = self.base.read(name)
        if name in self._replace:
            tensor = self._adapter.read(self._replace[name]).to(tensor.dtype)
        delta = self._deltas.get(name)
        if delta is None:
            return tensor
        b = self._adapter.read(delta.b_key).float()  # [out, r] (or the bias [out])
        update = b if delta.a_key is None else b @ self._adapter.read(delta.a_key).float()  # [out, in]
        update = update * delta.scaling
        return (tensor.float() + (update.T if delta.transpose else update)).to(tensor.dtype)

    def sha256(self, on_bytes: Callable[[int], None] | None = None) -> dict[str, str]:
        """SHA-256 of the base's weight files and of the adapter's weights file."""
        digests = self.base.sha256(on_bytes)
        h = hashlib.sha256()
        with open(self.files[-1], "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
                if on_bytes:
                    on_bytes(len(block))
        digests[f"adapter:{self.files[-1].name}"] = h.hexdigest()
        return digests

    def close(self) -> None:
        if getattr(self, "_adapter", None) is not None:
            self._adapter.close()
        if self._owns_base and getattr(self, "base", None) is not None:
            self.base.close()

    def __enter__(self) -> LoraAppliedReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """mergekit's ``base+adapter`` syntax -> (base, adapter). Splits on the last '+' only when the right-hand side is
    an existing adapter directory, so paths that contain '+' still work."""
    head, sep, tail = str(ref).rpartition("+")
    if sep and head and is_adapter_dir(tail):
        return head, tail
    return str(ref), None


def open_model(ref: str | Path, allow_pickle: bool = False) -> CheckpointReader | LoraAppliedReader:
    """A tensor source for a model reference: a checkpoint directory, ``base+adapter``, or an adapter directory
    alone whose ``base_model_name_or_path`` is a local directory."""
    base, adapter = parse_model_ref(str(ref))
    if adapter is None and is_adapter_dir(base):
        adapter, base = base, read_adapter_config(base).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise FileNotFoundError(f"{adapter} is a LoRA adapter whose base_model_name_or_path ({base!r}) is not a "
                                    f"local directory; name the base explicitly as BASE+{adapter}.")
    if adapter is None:
        return CheckpointReader(base, allow_pickle)
    return LoraAppliedReader(base, adapter, allow_pickle)


# --------------------------------------------------------------------------------------------------- extraction

# 2-D weights of the decoder layers' linear modules: the LoRA targets.
LORA_TARGET = re.compile(r"^(?:.+\.)?layers\.\d+\..+\.weight$")


def _check_pairs(ft: CheckpointReader, base: CheckpointReader) -> list[str]:
    """Every tensor must exist in both with one shape: an adapter cannot add, drop or resize tensors."""
    problems = [f"{n} (only in {ft.path})" for n in ft.index if n not in base.index]
    problems += [f"{n} (only in {base.path})" for n in base.index if n not in ft.index]
    problems += [f"{n} ({list(base.index[n].shape)} -> {list(i.shape)})" for n, i in ft.index.items()
                 if n in base.index and i.shape != base.index[n].shape]
    if problems:
        raise ValueError(f"{ft.path} and {base.path} differ in tensor names or shapes, which a LoRA adapter cannot "
                         f"express: {', '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}.")
    return list(ft.index)


def _tied_embedding(reader: CheckpointReader) -> str | None:
    """The input embedding's tensor name when the checkpoint ties it to the output embedding (config.json's
    ``tie_word_embeddings``; where the config omits it, a checkpoint without ``lm_head.weight``)."""
    config_path = reader.path / "config.json"
    config = read_json(config_path, "model config") if config_path.is_file() else {}
    tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings"))
    if tied is None:
        tied = "lm_head.weight" not in reader.index
    names = [n for n in reader.index if re.search(r"(^|\.)(embed_tokens|wte|word_embeddings)\.weight$", n)]
    return names[0] if tied and len(names) == 1 else None


def _saved_modules(changed: list[str], targets: set[str], tied: str | None) -> tuple[dict[str, list[str]], list[str]]:
    """Group changed non-LoRA tensors into whole modules for ``modules_to_save`` (peft copies the whole module, so
    it must not be or contain a LoRA target); returns ({module: changed names}, unsupported names)."""
    modules: dict[str, list[str]] = {}
    unsupported = []
    for name in changed:
        module = name.rpartition(".")[0]
        if not module or any(t == module or t.startswith(module + ".") for t in targets):
            unsupported.append(name)  # e.g. the bias of a LoRA-targeted projection
        elif name == tied:  # peft's copy of a tied embedding would leave the output embedding at the base's
            unsupported.append(f"{name} (tied to the output embedding)")
        else:
            modules.setdefault(module, []).append(name)
    return modules, unsupported


@dataclass
class LoraExtraction:
    """What `extract_lora` wrote to `out`; `to_dict()` is its report, extract_lora.json."""

    out: Path
    finetuned: str
    base: str
    rank: int
    lora: list[dict]  # per factorised weight: name, shape, rank, rel_error (of the stored factors)
    modules_to_save: list[str]
    skipped_unsupported: list[str]
    identical: int  # tensors equal in both, left out
    excluded: int  # tensors matching no `include` pattern
    adapter_bytes: int = 0

    @property
    def rel_errors(self) -> list[float]:
        return [entry["rel_error"] for entry in self.lora]

    def to_dict(self) -> dict:
        report = asdict(self)
        del report["out"]
        return report


def extract_lora(
    finetuned: str | Path,
    base: str | Path,
    out: str | Path,
    rank: int = 128,
    *,
    force: bool = False,
    include: Sequence[str] | None = None,
    skip_unsupported: bool = False,
    dtype: str | torch.dtype | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> LoraExtraction:
    """Write a PEFT LoRA adapter to ``out`` approximating ``finetuned - base`` (mergekit-extract-lora's method).

    Each changed 2-D weight [out, in] of the decoder layers gets SVD factors A [k, in], B [out, k] with
    ``k = min(rank, out, in)`` (``lora_alpha = k``: scaling 1). Other changed tensors are saved whole as
    ``modules_to_save`` when their module holds no LoRA target, else they are unsupported: an error listing them,
    or with ``skip_unsupported`` left out and listed in the report. Identical tensors are skipped. ``include``:
    regexes (``re.search``); tensors matching none are left out (counted as excluded). ``dtype``: of the factors,
    one of `COMMON_FLOAT_DTYPES` in any spelling `parse_dtype` reads (default: the fine-tune's). Writes
    adapter_config.json, adapter_model.safetensors, README.md and extract_lora.json (the returned report).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}.")
    dtype = parse_dtype(dtype, what="dtype", allowed=COMMON_FLOAT_DTYPES)
    out = check_output_dir(out, force, [finetuned, base])
    with CheckpointReader(finetuned) as ft, CheckpointReader(base) as bs:
        names = _check_pairs(ft, bs)
        selected = [n for n in names if include is None or any(re.search(p, n) for p in include)]
        tensors, entries, changed = _factorise(ft, bs, selected, rank, dtype, on_progress)
        ranks = {entry["name"].removesuffix(".weight"): entry["rank"] for entry in entries}
        saved, unsupported = _saved_modules(changed, set(ranks), _tied_embedding(bs))
        if unsupported and not skip_unsupported:
            raise ValueError(f"{len(unsupported)} changed tensors cannot be expressed as LoRA factors or "
                             f"modules_to_save: {', '.join(unsupported[:8])}{' ...' if len(unsupported) > 8 else ''}. "
                             "Pass skip_unsupported=True (CLI: --skip-unsupported) to leave them out.")
        for module in saved:  # the whole module, unchanged tensors included, as peft saves it
            for name in (n for n in names if n.startswith(module + ".")):
                tensors[PEFT_PREFIX + name] = ft.read(name)
        if not ranks:  # peft refuses to load an adapter that targets no module (modules_to_save alone)
            what = "differ only outside the decoder layers' 2-D weights" if changed else "are identical"
            raise ValueError(f"{finetuned} and {base} {what}{' on the included tensors' if include else ''}: there "
                             "is no weight to factorise, and peft cannot load an adapter with no LoRA target.")
        report = LoraExtraction(
            out, str(finetuned), str(base), rank, entries, sorted(saved), unsupported,
            identical=len(selected) - len(entries) - len(changed), excluded=len(names) - len(selected),
        )
        _write_adapter(out, force, [finetuned, base], tensors, ranks, str(Path(base).resolve()), report)
    return report


def _factorise(ft: CheckpointReader, base: CheckpointReader, names: list[str], rank: int, dtype: torch.dtype | None,
               on_progress: Callable[[int, int], None] | None) -> tuple[dict[str, torch.Tensor], list[dict], list[str]]:
    """LoRA factors of every changed decoder-layer 2-D weight, keyed as peft saves them; their report entries;
    and the other changed tensors' names. One tensor pair (and its SVD) in memory at a time."""
    # The factors are collected, not streamed to a pre-planned writer: which tensors changed (so the output plan)
    # is only known after reading them, and the factors are small (k * (in + out) per weight, ~5% of a 7B model
    # at rank 128). Only modules_to_save tensors are full-size, and those are few and output anyway.
    tensors: dict[str, torch.Tensor] = {}
    entries, changed = [], []
    for done, name in enumerate(names, start=1):
        x, x0 = ft.read(name), base.read(name)
        delta = x.float() - x0.float()  # fp32 task vector
        if not delta.any():
            pass  # identical: nothing to store
        elif x.dim() == 2 and LORA_TARGET.match(name):
            module = name.removesuffix(".weight")
            a, b = lora_factors(delta, rank)  # A [k, in], B [out, k], k = min(rank, out, in)
            a, b = a.to(dtype or x.dtype).contiguous(), b.to(dtype or x.dtype).contiguous()
            err = torch.linalg.norm(delta - b.float() @ a.float()) / torch.linalg.norm(delta)  # of what is stored
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
            entries.append({"name": name, "shape": list(x.shape), "rank": a.shape[0], "rel_error": float(err)})
        else:
            changed.append(name)
        del x, x0, delta
        if on_progress:
            on_progress(done, len(names))
    return tensors, entries, changed


def _adapter_config(ranks: dict[str, int], modules_to_save: list[str], base: str) -> dict:
    r = max(ranks.values(), default=1)
    thinner = {m: k for m, k in ranks.items() if k != r}  # rank capped by min(out, in): alpha = rank keeps scaling 1
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": r, "lora_alpha": r, "rank_pattern": thinner, "alpha_pattern": dict(thinner),
        "target_modules": sorted(ranks), "modules_to_save": modules_to_save or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
    }


def _write_adapter(out: Path, force: bool, sources: list, tensors: dict[str, torch.Tensor], ranks: dict[str, int],
                   base: str, report: LoraExtraction) -> None:
    from safetensors.torch import save_file

    config = _adapter_config(ranks, report.modules_to_save, base)
    with atomic_output_dir(out, force, sources) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        report.adapter_bytes = (tmp / ADAPTER_WEIGHTS).stat().st_size
        (tmp / "extract_lora.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (tmp / "README.md").write_text(adapter_card(report))


def adapter_card(report: LoraExtraction) -> str:
    """README.md of an extracted adapter: hub metadata (peft), what was factorised and how to load it."""
    errors = report.rel_errors
    base = report.base if is_hub_id(report.base) else str(Path(report.base).resolve())
    body = (f"Rank-{report.rank} SVD factors of `{report.finetuned}` - `{base}` for {len(errors)} weights (relative "
            f"error mean {sum(errors) / max(len(errors), 1):.3g}, max {max(errors, default=0):.3g}); "
            f"modules_to_save: {', '.join(report.modules_to_save) or 'none'}. Per-tensor details: "
            "`extract_lora.json`.\n\n"
            "```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, this_dir)\n```")
    return render_card("LoRA adapter extracted by suture", body, tags=["suture", "lora", "peft"],
                       base_model=[report.base], library_name="peft")
