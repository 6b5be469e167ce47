"""Calibration statistics for the merge methods that need them: AIM's activation scales and RCP's saliencies.

Both are computed once, from models on calibration data, and saved keyed by checkpoint tensor name; the merge
engine then streams checkpoints tensor by tensor and looks each statistic up by the name it is merging (a name
without statistics gets None). The methods' modules (`suture.merge.methods.aim`, `.rcp`) register how a recipe's
statistics are loaded from these files or computed from its `calibration` (`StatisticsSource`).

AIM (`activation_scales`, post-step ``aim``). The *base* model runs on calibration sequences; a forward pre-hook
on every weight-bearing module except embeddings (every ``nn.Linear``, ``lm_head`` included, and every norm with
a 1-D weight) records the mean absolute value of the module's input per input channel over all real tokens. The
sum of |input| over every block is divided by the real-token count (a token-weighted mean, so padding and batch
size change nothing; with the paper's equal-length blocks it equals the paper's sum of per-block means up to the
factor the normalisation removes), then divided by the module's maximum: ``a`` in [0, 1], shape [in_features]
(or [hidden] for a norm), keyed by the module's weight name (``model.layers.0.mlp.up_proj.weight``). Memory: one
float64 vector per module. A module whose forward never runs (a Mamba mixer's ``dt_proj``, applied with
``F.linear`` inside the mixer) gets no entry, so the engine leaves that tensor as merged.
Tied embeddings: the scales of ``lm_head`` stay under ``lm_head.weight``. A tied checkpoint stores the shared
matrix only under the embedding's name, which has no entry, so the engine leaves it unrelaxed: AIM excludes
embeddings, and relaxing the shared matrix would change the input embedding too. An untied ``lm_head.weight``
is relaxed like any other Linear.

RCP (`rcp_statistics`, method ``rcp``). Per floating, trainable parameter (embeddings included):
reasoning prior ``F = mean_s (g^s * w_R)^2`` with g the gradient of the reasoning model's next-token loss on
sample s, and per domain sample ``S^s = g^s * w_D`` from the domain model. Samples run one at a time (no padding);
F accumulates in place in one model-sized fp32 buffer and is written before the domain model is loaded; each S^s
is written tensor by tensor into its own file as it is produced. Peak memory: one model, its gradient and F (the
caller's in-memory models stay resident, of course). Output directory::

    reasoning_prior.safetensors, domain_sensitivity-000.safetensors, domain_sensitivity-001.safetensors, ...

`RcpStatistics.open(dir)` reads them one tensor at a time: the engine passes ``reasoning_prior(name)`` and
``domain_sensitivity(name)`` (a list of S^s) to ``rcp`` for each tensor. A tied ``lm_head`` has its statistics
under the name the checkpoint uses (the embedding's).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..io.checkpoint import CheckpointReader, ShardedSafetensorsWriter
from ..io import atomic_output_dir, atomic_output_file, check_output_dir
from ..data import load_sequences, right_padded

__all__ = [
    "ActivationScales", "RcpStatistics", "activation_scales", "activation_scales_from_checkpoint",
    "load_statistics", "rcp_statistics", "save_statistics",
]

Progress = Callable[[int, int], None] | None
PRIOR_FILE = "reasoning_prior.safetensors"
_ONE_SHARD = 1 << 62  # a shard limit no model reaches: one file per statistic


# ---------------------------------------------------------------------------------------------------- loading
def _load_model(source) -> tuple[nn.Module, Path | None]:
    """An in-memory model as is, or a checkpoint directory loaded in fp32 (returns the directory too)."""
    if isinstance(source, nn.Module):
        return source, None
    from ..io.loading import load_for_scoring

    return load_for_scoring(source, dtype=torch.float32, tokenizer=False)[0], Path(source)


def _tokenizer(tokenizer, *sources):
    if tokenizer is not None:
        return tokenizer
    from ..io.checkpoint import has_tokenizer
    from ..io.loading import load_tokenizer

    for source in sources:
        if not isinstance(source, nn.Module) and has_tokenizer(source):
            return load_tokenizer(source)
    raise ValueError("Pass `tokenizer` (with in-memory models or checkpoints without tokenizer files), or token id "
                     "lists as data; the built-in workload's tokenizer is suture.workload.build_tokenizer().")


def _sequences(data, tokenizer_fn, n: int, max_length: int, seed: int) -> list[list[int]]:
    """`suture.data.load_sequences`, loading the tokenizer only for data that needs one (not token id lists)."""
    tokenizer = tokenizer_fn() if isinstance(data, (str, Path)) else None
    return load_sequences(data, tokenizer, n=n, max_length=max_length, seed=seed)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------- AIM
class ActivationScales(dict):
    """{weight name: a in [0, 1], shape [in_features]} plus where it came from (`source`, `n_tokens`)."""

    def __init__(self, scales: dict[str, torch.Tensor], source: str = "", n_tokens: int = 0):
        super().__init__(scales)
        self.source, self.n_tokens = source, n_tokens


def _aim_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Weight name -> module: every nn.Linear and every norm with a 1-D weight (an embedding is neither)."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        is_norm = "Norm" in type(module).__name__ and isinstance(weight, nn.Parameter) and weight.dim() == 1
        if isinstance(module, nn.Linear) or is_norm:
            found[f"{name}.weight"] = module
    return found


def _real_rows(x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """The input rows of real tokens, (n, in), from x (b, L, ..., in) or (b * L, in); mask (b, L)."""
    b, L = mask.shape
    real = mask.bool()
    if x.dim() >= 3 and tuple(x.shape[:2]) == (b, L):
        rows = x[real]  # (n_real, ..., in)
    elif x.dim() == 2 and x.shape[0] == b * L:
        rows = x[real.reshape(-1)]
    elif real.all():  # no padding: every row is real whatever the layout (e.g. routed MoE experts)
        rows = x
    else:
        raise ValueError(f"The input of {name} has shape {tuple(x.shape)}, which does not line up with the batch "
                         f"({b}, {L}), so padding cannot be excluded; use batch_size=1.")
    return rows.reshape(-1, x.shape[-1])


class _InputAbsMeans:
    """Forward pre-hooks summing |input| per channel over the real tokens of the current batch (`mask`)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}  # name -> (in,) float64
        self.counts = dict.fromkeys(modules, 0)
        self.mask: torch.Tensor | None = None  # (b, L) of the batch being run
        self._handles = []

    def attach(self) -> None:
        for name, module in self.modules.items():
            width = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
            hook = functools.partial(self._record, name, width)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, name: str, width: int, module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
        if not isinstance(x, torch.Tensor) or x.shape[-1] != width:
            raise ValueError(f"{name}: expected an input with {width} channels last, got "
                             f"{getattr(x, 'shape', type(x).__name__)}.")
        rows = _real_rows(x.detach(), self.mask, name)  # (n, in)
        total = rows.abs().sum(0, dtype=torch.float64)  # (in,)
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] += rows.shape[0]

    def normalised(self) -> dict[str, torch.Tensor]:
        """Token-weighted mean |input| over the module's maximum (float32, CPU); modules never run are absent."""
        scales = {}
        for name, total in self.sums.items():
            mean = total / self.counts[name]  # (in,)
            top = mean.max()
            scales[name] = (mean / top if top > 0 else mean).float().cpu()  # x / x == 1 exactly at the maximum
        return scales


def activation_scales(
    model, data, *, tokenizer=None, n: int = 100, max_length: int = 512, seed: int = 0, batch_size: int = 8,
    on_progress: Progress = None,
) -> ActivationScales:
    """AIM's per-input-channel activation scales of the base `model` (see the module docstring).

    Args:
        model: the base model, in memory or a checkpoint directory (loaded in fp32 with its tokenizer).
        data: "workload", a .jsonl file (`suture.data.JSONL_FIELDS`), token id lists, or
            right-padded `(input_ids, attention_mask)` batches, both (b, L).
        n, max_length, seed: how many sequences, cut to what length, which workload problems.
        batch_size: sequences per forward pass (padding never counts, so it changes nothing but speed).
    Returns: {weight name: float32 [in_features] in [0, 1], maximum exactly 1 unless the input is all zero}.
    """
    source = model
    model, path = _load_model(model)
    given = [] if isinstance(data, (str, Path)) else list(data)
    if given and isinstance(given[0], tuple):  # (input_ids, attention_mask) batches
        batches = given
    else:
        sequences = _sequences(given or data, lambda: _tokenizer(tokenizer, source), n, max_length, seed)
        batches = right_padded(sequences, batch_size, 0, _device(model))  # pad id is irrelevant: masked out
    means = _InputAbsMeans(_aim_modules(model))
    was_training = model.training
    try:
        means.attach()
        model.eval()
        with torch.no_grad():
            for done, (ids, mask) in enumerate(batches, start=1):
                means.mask = mask
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                if on_progress is not None:
                    on_progress(done, len(batches))
    finally:
        means.detach()
        model.train(was_training)
    scales = means.normalised()
    n_tokens = int(sum(int(mask.sum()) for _, mask in batches))
    return ActivationScales(scales, str(path or _describe(model)), n_tokens)


def calibration_checkpoint(ref: str, role: str) -> Path:
    """The checkpoint directory a method's statistics are computed from when a recipe's `calibration` asks for them.
    A LoRA reference (`base+adapter`, or an adapter alone) is refused: its config and weights on disk are the base
    model's, so statistics computed from them would silently describe the base, not the adapted model."""
    from .lora import is_adapter_dir, parse_model_ref

    base, adapter = parse_model_ref(str(ref))
    if adapter is not None or is_adapter_dir(base):
        raise ValueError(f"{role} {ref} is a LoRA adapter reference: statistics computed from `calibration` need a "
                         "full checkpoint (the base alone is not the adapted model). Merge the adapter into its base "
                         "first (peft's merge_and_unload), or compute the statistics from the adapted model and give "
                         "them under `statistics:` in the recipe.")
    return Path(ref)


def activation_scales_from_checkpoint(path, data="workload", **kwargs) -> ActivationScales:
    """`activation_scales` of a checkpoint directory: what the ``aim`` method's statistics source computes from a
    recipe's `calibration` (`suture.merge.methods.aim`)."""
    return activation_scales(Path(path), data, **kwargs)


def save_statistics(stats: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write AIM scales to one safetensors file (metadata: kind="aim", source, n_tokens); atomic."""
    path = Path(path)
    metadata = {"kind": "aim", "source": str(getattr(stats, "source", "")),
                "n_tokens": str(getattr(stats, "n_tokens", 0))}
    with atomic_output_file(path) as partial:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in stats.items()}, str(partial),
                  metadata=metadata)


def load_statistics(path: str | Path) -> ActivationScales:
    """AIM scales written by `save_statistics` (small: one vector per module, read whole)."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("kind") != "aim":
            raise ValueError(f"{path} holds no AIM statistics (metadata kind={metadata.get('kind')!r}); "
                             "compute them with suture.merge.statistics.activation_scales.")
        scales = {name: f.get_tensor(name) for name in f.keys()}
    return ActivationScales(scales, metadata.get("source", ""), int(metadata.get("n_tokens", 0)))


# ---------------------------------------------------------------------------------------------------- RCP
def _named_trainable(model: nn.Module, ckpt: Path | None) -> dict[str, nn.Parameter]:
    """Checkpoint name -> parameter, for floating parameters that require grad; a tied parameter appears once,
    under the name its checkpoint stores (the first alias, as save_pretrained keeps it, or the one `ckpt` has)."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    stored = None
    if ckpt is not None:
        with CheckpointReader(ckpt) as reader:
            stored = set(reader.index)
    named = {}
    for name, p in model.named_parameters():
        if not (p.is_floating_point() and p.requires_grad):
            continue
        if stored is not None and name not in stored:
            name = next((a for a in aliases[id(p)] if a in stored), None)
            if name is None:
                raise KeyError(f"{ckpt} stores none of the names {aliases[id(p)]} of a model parameter.")
        named[name] = p
    return named


def _lm_loss(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """Mean next-token cross-entropy over one sequence (no padding), in fp32."""
    x = torch.tensor([ids], device=_device(model))  # (1, L)
    logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()  # (L - 1, vocab)
    return F.cross_entropy(logits, x[0, 1:])


def _saliency_passes(model, params: dict[str, nn.Parameter], sequences, visit, tick) -> None:
    """For each sequence: forward, backward, then `visit(s, name -> g * w)` while the gradient exists."""
    was_training = model.training
    model.eval()  # no dropout
    try:
        for s, ids in enumerate(sequences):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                _lm_loss(model, ids).backward()

            def saliency(name: str) -> torch.Tensor:  # (*shape) fp32; an unused parameter has zero gradient
                p = params[name]
                return torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float() * p.float()

            with torch.no_grad():
                visit(s, saliency)
            tick()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _write_file(path: Path, plan, tensors, metadata: dict[str, str]) -> None:
    """One safetensors file, each tensor written at its offset as `tensors` yields it (never all in memory)."""
    scratch = Path(tempfile.mkdtemp(prefix=".writing.", dir=path.parent))
    try:
        with ShardedSafetensorsWriter(scratch, plan, _ONE_SHARD, metadata) as writer:
            for name, tensor in tensors:
                writer.write(name, tensor.cpu())
        (scratch / "model.safetensors").rename(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _checked(sequences: list[list[int]], asked: int, what: str) -> list[list[int]]:
    if len(sequences) < asked:
        raise ValueError(f"{what}: only {len(sequences)} usable records for {asked} samples; pass fewer or more data.")
    if any(len(ids) < 2 for ids in sequences):
        raise ValueError(f"{what}: every sample needs at least 2 tokens (one next-token prediction).")
    return sequences


def rcp_statistics(
    reasoning_model, domain_model, reasoning_data, domain_data, out_dir: str | Path, *, tokenizer=None,
    n_reasoning: int = 5, n_domain: int = 6, max_length: int = 512, seed: int = 0, force: bool = False,
    on_progress: Progress = None,
) -> RcpStatistics:
    """RCP-Merging's reasoning prior and per-sample domain sensitivities, written to `out_dir` (atomically).

    Args:
        reasoning_model, domain_model: in memory, or checkpoint directories (loaded in fp32, one at a time).
        reasoning_data, domain_data: "workload", a .jsonl file, or token id lists; prompt + answer per record.
        tokenizer: needed unless the data are token ids or a checkpoint directory holds tokenizer files.
        n_reasoning, n_domain: samples used (the authors: 5 and 6); fewer usable records is an error.
        on_progress: called as `on_progress(done, n_reasoning + n_domain)`, once per sample.
    """
    sources = [x for x in (reasoning_model, domain_model, reasoning_data, domain_data) if isinstance(x, (str, Path))]
    check_output_dir(out_dir, force, sources)
    get_tokenizer = lambda: _tokenizer(tokenizer, reasoning_model, domain_model)  # noqa: E731  (only if needed)
    reasoning = _checked(_sequences(reasoning_data, get_tokenizer, n_reasoning, max_length, seed), n_reasoning,
                         "reasoning_data")
    domain = _checked(_sequences(domain_data, get_tokenizer, n_domain, max_length, seed), n_domain, "domain_data")
    total, done = len(reasoning) + len(domain), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    with atomic_output_dir(out_dir, force, sources) as tmp:
        shapes = _write_prior(reasoning_model, reasoning, tmp / PRIOR_FILE, tick)
        _write_sensitivities(domain_model, domain, tmp, shapes, tick)
    return RcpStatistics.open(out_dir)


def _write_prior(source, sequences, path: Path, tick) -> dict[str, tuple[int, ...]]:
    model, ckpt = _load_model(source)
    params = _named_trainable(model, ckpt)
    prior = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}  # one model in fp32

    def accumulate(s: int, saliency) -> None:
        for name, buf in prior.items():
            gw = saliency(name)
            buf.addcmul_(gw, gw)  # += (g * w)^2, in place

    _saliency_passes(model, params, sequences, accumulate, tick)
    plan = [(name, tuple(buf.shape), torch.float32) for name, buf in prior.items()]
    metadata = {"kind": "rcp_reasoning_prior", "source": _describe(source), "n_samples": str(len(sequences)),
                "n_tokens": str(sum(map(len, sequences)))}
    _write_file(path, plan, ((name, buf.div_(len(sequences))) for name, buf in prior.items()), metadata)
    return {name: shape for name, shape, _ in plan}  # a model loaded here is freed on return, before the next


def _write_sensitivities(source, sequences, out: Path, shapes: dict[str, tuple[int, ...]], tick) -> None:
    model, ckpt = _load_model(source)
    params = _named_trainable(model, ckpt)
    own = {name: tuple(p.shape) for name, p in params.items()}
    if own != shapes:
        differ = sorted(set(own) ^ set(shapes)) or [n for n in own if own[n] != shapes[n]]
        raise ValueError(f"The domain and reasoning models have different parameters (e.g. {differ[:5]}): RCP "
                         "merges models fine-tuned from one base.")
    plan = [(name, shape, torch.float32) for name, shape in own.items()]

    def write(s: int, saliency) -> None:
        metadata = {"kind": "rcp_domain_sensitivity", "source": _describe(source), "sample": str(s),
                    "n_tokens": str(len(sequences[s]))}
        _write_file(out / f"domain_sensitivity-{s:03d}.safetensors", plan,
                    ((name, saliency(name)) for name in own), metadata)

    _saliency_passes(model, params, sequences, write, tick)


def _describe(source) -> str:
    if isinstance(source, nn.Module):
        return getattr(getattr(source, "config", None), "_name_or_path", "") or type(source).__name__
    return str(source)


class RcpStatistics:
    """The statistics `rcp_statistics` wrote to `out_dir`, read one tensor at a time."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir)
        if not (self.path / PRIOR_FILE).is_file():
            raise FileNotFoundError(f"{self.path} has no {PRIOR_FILE}: not an RCP statistics directory "
                                    "(compute one with suture.merge.statistics.rcp_statistics).")
        self._prior = CheckpointReader(self.path / PRIOR_FILE)
        files = sorted(self.path.glob("domain_sensitivity-*.safetensors"))
        expected = [f"domain_sensitivity-{s:03d}.safetensors" for s in range(len(files))]
        if not files or [f.name for f in files] != expected:
            raise ValueError(f"{self.path}: expected domain sensitivity files {expected[:2]}..., "
                             f"found {[f.name for f in files]}.")
        self._domain = [CheckpointReader(f) for f in files]
        for reader in self._domain:
            if set(reader.index) != set(self._prior.index):
                raise ValueError(f"{reader.path} and {PRIOR_FILE} hold different tensors; recompute the statistics.")

    @classmethod
    def open(cls, out_dir: str | Path) -> RcpStatistics:
        return cls(out_dir)

    @property
    def names(self) -> list[str]:
        return list(self._prior.index)

    @property
    def n_domain(self) -> int:
        return len(self._domain)

    def reasoning_prior(self, name: str) -> torch.Tensor | None:
        """F for tensor `name` (its shape, fp32), or None when it has no statistics."""
        return self._prior.read(name) if name in self._prior else None

    def domain_sensitivity(self, name: str) -> list[torch.Tensor] | None:
        """[S^0, S^1, ...] for tensor `name` (each its shape, fp32), or None when it has no statistics."""
        return [reader.read(name) for reader in self._domain] if name in self._prior else None

    def close(self) -> None:
        for reader in (self._prior, *self._domain):
            reader.close()

    def __enter__(self) -> RcpStatistics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
