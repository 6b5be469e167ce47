"""The merge engine: plan, then stream every tensor through a method on worker threads into sharded safetensors.

1. **Plan** (`plan_merge`), before anything is written: open every input (header reads only), take the union of
   tensor names and shapes, and decide per tensor: merged (present everywhere with one shape), taken from the base
   (`tensor_policy: base`), vocabulary rows aligned by token to the `tokenizer_source` (`suture.merge.vocabulary`)
   or by index to the base (`vocab_policy: base`), copied (non-floating tensors), or an error. The config and
   tokenizer sources must exist, the tokenizer written must fit the vocabulary rows, a `chat_template` must resolve.
   Errors name the tensors and fields; `--dry-run` prints the plan. The engine knows no architecture: suture hybrids,
   GraniteMoeHybrid, Mamba, Llama, ... merge alike, and the output tensor set equals the input set.
2. **Stream** (`merge`): worker threads read a tensor from every input (positioned reads release the GIL), stop at
   one holding NaN or inf unless `allow_nonfinite`, resolve its parameters (mergekit's gradients and filters), run
   the method in fp32 (float64 where the method or the recipe's `dtype` says so) on the chosen device, apply the
   post-steps, cast to the output dtype and write it at its planned offset. A memory budget bounds the bytes in
   flight. Random methods get a generator seeded by (seed, tensor name), so the result does not depend on thread
   order. A method with a fused block kernel for the tensor's parameters (linear, task arithmetic, TIES, DARE,
   slerp; see `suture.merge.blocks`) never holds it whole: each block of entries is read, checked, merged and
   written in buffers that stay in cache, with the same bits as the generic path (`FUSED = False` runs that path
   only); what a kernel does hold whole (TIES' magnitudes, DARE's bool masks) its method says.
3. **Finish**: config (from the donor, its vocab_size set to the rows written, with overrides), tokenizer and
   generation config, the chat template, the recipe and a model card, all in a temporary directory renamed into
   place when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..io.checkpoint import (
    DTYPES,
    TOKENIZER_VOCAB_FILES,
    CheckpointReader,
    ShardedSafetensorsWriter,
    copy_tokenizer_files,
    has_tokenizer,
    parse_size,
)
from ..io import atomic_output_dir, check_output_dir, read_json
from ..io.parse import parse_dtype
from . import blocks
from .chat_templates import resolve_chat_template
from .methods import REQUIRED, MergeMethod, get_method
from .params import gradient_position, layer_index, resolve_parameter
from .recipe import MergeRecipe, load_recipe
from .vocabulary import (
    HINTS,
    TokenAlignment,
    config_vocab_size,
    is_vocabulary_tensor,
    token_alignment,
    tokenizer_vocab,
)


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    # "merge", "base" (taken from the base), "copy" (non-floating, from the donor), "vocab" (rows aligned to the
    # base's by index), "tokens" (rows aligned by token to the written tokenizer, see `suture.merge.vocabulary`)
    action: str
    note: str = ""


@dataclass
class MergePlan:
    recipe: MergeRecipe
    inputs: list[str]  # the method's models, in order
    tensors: list[PlannedTensor]
    num_layers: int
    problems: list[str] = field(default_factory=list)
    tokens: TokenAlignment | None = None  # for "tokens" tensors
    vocab_size: int | None = None  # rows of the written vocabulary tensors (the written config says so)
    chat_template: str | None = None  # the template text to write, resolved from the recipe's chat_template

    @property
    def total_bytes(self) -> int:
        return sum(torch.Size(t.shape).numel() * t.dtype.itemsize for t in self.tensors)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.action] = out.get(t.action, 0) + 1
        return out

    def check(self) -> None:
        if self.problems:
            shown = "\n  ".join(self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise ValueError(f"The merge cannot be planned ({len(self.problems)} problems):\n  {shown}{more}")


class _Inputs:
    """Every distinct model of a recipe, opened once (checkpoint directories or base+LoRA references)."""

    def __init__(self, recipe: MergeRecipe, allow_pickle: bool):
        self.readers: dict[str, CheckpointReader] = {}
        refs = [m.model for m in recipe.models] + ([recipe.base_model] if recipe.base_model else [])
        try:
            for ref in dict.fromkeys(refs):
                self.readers[ref] = open_model(ref, allow_pickle)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def open_model(ref: str, allow_pickle: bool = False):
    """A tensor source for a recipe's model reference: a checkpoint directory, `base+adapter` (PEFT LoRA applied
    tensor by tensor) or an adapter directory whose base is local."""
    from .lora import open_model as open_with_lora

    return open_with_lora(ref, allow_pickle=allow_pickle)


def config_dir(ref: str) -> Path:
    """The directory holding a model reference's config.json (the base's for `base+adapter` references)."""
    path = Path(ref)
    if (path / "config.json").is_file():
        return path
    from .lora import is_adapter_dir, parse_model_ref, read_adapter_config

    base, _ = parse_model_ref(ref)
    if is_adapter_dir(base):  # an adapter alone: its config names the base
        return Path(read_adapter_config(base).get("base_model_name_or_path") or base)
    return Path(base)


def _num_layers(donor: str, names) -> int:
    config = config_dir(donor) / "config.json"
    if config.is_file():
        n = read_json(config, "model config").get("num_hidden_layers")
        if isinstance(n, int) and n > 0:
            return n
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 1


def plan_merge(recipe, allow_pickle: bool = False, _inputs: _Inputs | None = None) -> MergePlan:
    """Decide what happens to every tensor (see the module docstring); problems are collected, not raised."""
    recipe = load_recipe(recipe)
    inputs = _inputs or _Inputs(recipe, allow_pickle)
    try:
        return _plan(recipe, inputs)
    finally:
        if _inputs is None:
            inputs.close()


def _plan(recipe: MergeRecipe, inputs: _Inputs) -> MergePlan:
    models = [m.model for m in recipe.method_inputs]
    base = recipe.base_model
    involved = list(dict.fromkeys(models + ([base] if base else [])))
    donor = inputs.readers[base if base else models[0]].index
    out_dtype = parse_dtype(recipe.out_dtype or recipe.dtype)
    names = list(dict.fromkeys([n for ref in involved for n in inputs.readers[ref].index]))
    problems = _source_problems(recipe)
    tokens = None
    if recipe.tokenizer_source and not problems:
        try:
            tokens = token_alignment(config_dir(recipe.tokenizer_donor), {ref: config_dir(ref) for ref in involved},
                                     base or models[0])
        except ValueError as err:
            problems.append(str(err))
    vocab_sizes = {ref: config_vocab_size(config_dir(ref)) for ref in involved}
    method = get_method(recipe.merge_method)
    tensors, vocabulary = [], []
    for name in names:
        infos = {ref: inputs.readers[ref].index.get(name) for ref in involved}
        rows = {ref: info.shape[0] for ref, info in infos.items() if info is not None and info.shape}
        is_vocab = len(rows) == len(infos) and is_vocabulary_tensor(name, rows, vocab_sizes)
        planned = _plan_tensor(name, infos, recipe, donor, out_dtype, tokens if is_vocab else None, method)
        if isinstance(planned, str):
            problems.append(planned)
            continue
        tensors.append(planned)
        if is_vocab:
            vocabulary.append(planned)
    problems += _parameter_problems(recipe)
    problems += _tokenizer_problems(recipe, vocabulary, tokens)
    template = _chat_template(recipe, [config_dir(ref) for ref in ([base] if base else []) + models], problems)
    vocab_size = vocabulary[0].shape[0] if vocabulary else None
    return MergePlan(recipe, models, tensors, _num_layers(recipe.donor, names), problems, tokens=tokens,
                     vocab_size=vocab_size, chat_template=template)


def _plan_tensor(name: str, infos: dict, recipe: MergeRecipe, donor: dict, out_dtype: torch.dtype | None,
                 tokens: TokenAlignment | None, method: MergeMethod) -> PlannedTensor | str:
    """What happens to tensor `name` (`infos`: its header in each model, None where missing), or the problem.
    `tokens` is given for a vocabulary tensor when the recipe has a `tokenizer_source`."""
    base = recipe.base_model
    missing = [ref for ref, info in infos.items() if info is None]
    reference = donor.get(name) or next(info for info in infos.values() if info is not None)
    dtype = DTYPES[reference.dtype]
    final = out_dtype if out_dtype is not None and dtype.is_floating_point else dtype
    if missing:
        if recipe.tensor_policy == "base" and base and name in donor:
            return PlannedTensor(name, donor[name].shape, final, "base", f"missing in {missing}")
        return (f"{name}: missing in {', '.join(missing)} (present in "
                f"{', '.join(r for r in infos if r not in missing)}); set tensor_policy: base to take it from the "
                "base model")
    shapes = {info.shape for info in infos.values()}
    same_rest = len({s[1:] for s in shapes}) == 1  # only dim 0 (rows) may differ
    if tokens is not None and dtype.is_floating_point and same_rest and (
            not tokens.identity or len(shapes) > 1 or min(s[0] for s in shapes) < tokens.size):
        assumed = "".join(f"; {ref} has no tokenizer: taken to use {path}'s" for ref, path in tokens.assumed.items())
        return PlannedTensor(name, (tokens.size, *reference.shape[1:]), final, "tokens",
                             f"rows aligned by token to the tokenizer of {tokens.source} ({tokens.size} rows){assumed}")
    if len(shapes) > 1:
        vocab_like = any(h in name for h in HINTS) and same_rest
        if vocab_like and recipe.vocab_policy == "base" and base:
            return PlannedTensor(name, donor[name].shape, final, "vocab",
                                 f"rows aligned to the base ({donor[name].shape[0]})")
        if not method.same_shape and same_rest:
            return PlannedTensor(name, reference.shape, final, "merge", f"rows differ: {method.name} aligns them")
        listed = ", ".join(f"{ref}: {list(info.shape)}" for ref, info in infos.items())
        return f"{name}: shapes differ ({listed}){_vocabulary_hint(base) if vocab_like else ''}"
    if not dtype.is_floating_point:
        return PlannedTensor(name, reference.shape, dtype, "copy", "non-floating: copied from the donor")
    return PlannedTensor(name, reference.shape, final, "merge")


def _chat_template(recipe: MergeRecipe, model_dirs: list[Path], problems: list[str]) -> str | None:
    """The chat template text to write (None: the tokenizer donor's stays); a problem is appended, not raised."""
    try:
        template = resolve_chat_template(recipe.chat_template, model_dirs)
    except ValueError as err:
        problems.append(str(err))
        return None
    donor = config_dir(recipe.tokenizer_donor)
    if template is not None and donor.is_dir() and not has_tokenizer(donor):
        problems.append(f"chat_template: no tokenizer is written with the merge ({donor} has no tokenizer files), "
                        "so the template would belong to none; set tokenizer_source to a model that has a tokenizer")
    return template


def _vocabulary_hint(base: str | None) -> str:
    fix = "set tokenizer_source: MODEL to align the rows by token to that model's tokenizer, as mergekit does"
    return f" (a vocabulary mismatch: {fix}{', or vocab_policy: base to cut or pad them to the base' if base else ''})"


def _source_problems(recipe: MergeRecipe) -> list[str]:
    """config_source / tokenizer_source that name nothing usable (checked before any tensor is planned)."""
    problems = []
    if recipe.config_source:
        where = config_dir(recipe.config_source)
        if not (where / "config.json").is_file():
            state = "does not exist" if not where.exists() else "has no config.json"
            problems.append(f"config_source: {where} {state}; name a model directory with a config.json, or remove "
                            "config_source to take the base model's config")
    if recipe.tokenizer_source:
        where = config_dir(recipe.tokenizer_donor)
        label = "tokenizer_source" + (f" ({recipe.tokenizer_source})" if str(where) != recipe.tokenizer_source else "")
        if not where.is_dir():
            problems.append(f"{label}: {where} does not exist; name a model directory that has a tokenizer")
        elif not has_tokenizer(where):
            problems.append(f"{label}: {where} has no tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES)}); name a model "
                            "that has its tokenizer, or remove tokenizer_source")
    return problems


def _tokenizer_problems(recipe: MergeRecipe, vocabulary: list[PlannedTensor], tokens: TokenAlignment | None
                        ) -> list[str]:
    """The tokenizer written must fit the vocabulary rows written, and a model's tokenizer must not be dropped."""
    donor = config_dir(recipe.tokenizer_donor)
    if recipe.tokenizer_source is not None or tokens is not None:
        return []  # checked by _source_problems; the rows are aligned to it
    if not has_tokenizer(donor):
        refs = [ref for ref in dict.fromkeys([recipe.base_model, *(m.model for m in recipe.models)]) if ref]
        holders = [ref for ref in refs if has_tokenizer(config_dir(ref))]
        return [f"tokenizer: the config donor {donor} has no tokenizer files, so the merge would be written without "
                f"a tokenizer although {', '.join(holders)} has one; set tokenizer_source to that model"] if holders \
            else []
    if not vocabulary:
        return []
    try:
        size = max(tokenizer_vocab(donor).values()) + 1
    except ValueError:  # a tokenizer transformers cannot load without its remote code: copied as is, not checked
        return []
    return [f"{t.name}: {t.shape[0]} rows, but the tokenizer written with the merge (from {donor}) has token ids up "
            f"to {size - 1}; set tokenizer_source: {donor} to align the rows to it by token, as mergekit does"
            for t in vocabulary if t.shape[0] < size]


def _parameter_problems(recipe: MergeRecipe) -> list[str]:
    method = get_method(recipe.merge_method)
    known = set(method.per_model) | set(method.shared)
    problems = [f"parameters.{key}: {recipe.merge_method} has no parameter {key!r} (it takes {sorted(known)})"
                for key in (recipe.parameters or {}) if key not in known]
    for entry in recipe.models:
        for key in entry.parameters or {}:
            if key not in method.per_model:
                problems.append(f"models[{entry.model}].parameters.{key}: not a per-model parameter of "
                                f"{recipe.merge_method} (those are {sorted(method.per_model)})")
    top = recipe.parameters or {}
    for key, default in method.per_model.items():
        lacking = [e.model for e in recipe.method_inputs if default is REQUIRED and key not in (e.parameters or {})
                   and key not in top]
        if lacking:
            problems.append(f"{recipe.merge_method} needs parameter {key!r} for {', '.join(lacking)}: set it in "
                            "the model's `parameters` or the top-level `parameters`")
    problems += [f"{recipe.merge_method} needs parameter {key!r}: set it in the top-level `parameters`"
                 for key, default in method.shared.items() if default is REQUIRED and key not in top]
    return problems


# -------------------------------------------------------------------------------------------------- execution
def recipe_sources(recipe: MergeRecipe) -> list[str]:
    """Every local file or directory a merge of `recipe` reads: its models and base (for `base+adapter` references
    both, for an adapter alone also the base its config names), config and tokenizer sources, statistics and
    calibration files. The output checks refuse an output that is, holds or lies inside any of them; entries that
    name no local path (hub ids, `workload`) are skipped by those checks."""
    from .lora import parse_model_ref

    refs = [m.model for m in recipe.models] + [recipe.base_model, recipe.config_source, recipe.tokenizer_donor]
    paths = []
    for ref in filter(None, refs):
        paths += [*parse_model_ref(ref), config_dir(ref)]  # base, adapter, and the base an adapter alone names
    paths += [*recipe.statistics.values(), recipe._file]  # the recipe file itself, if it was read from one
    if recipe.calibration is not None:
        paths += [recipe.calibration.data, recipe.calibration.domain_data]
    return [str(path) for path in dict.fromkeys(filter(None, paths))]


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan = field(repr=False)
    seconds: float = 0.0
    bytes_written: int = 0


class _Budget:
    """Bytes in flight across worker threads; a task larger than the budget runs alone."""

    def __init__(self, limit: int):
        self.limit, self.used, self.cond = limit, 0, threading.Condition()

    def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        with self.cond:
            self.cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def merge(
    recipe,
    out: str | Path,
    *,
    force: bool = False,
    workers: int | None = None,
    memory_budget: int | str = "4GB",
    device: str = "cpu",
    allow_pickle: bool = False,
    max_shard_size: int | str = "5GB",
    statistics: dict | None = None,
    on_progress: Callable[[int, int, int, int], None] | None = None,
) -> MergeResult:
    """Merge the models of `recipe` (a YAML path, a dict or a `MergeRecipe`) into the checkpoint directory `out`.

    Args:
        workers: worker threads, each merging one tensor at a time (default: one per core; torch's own threads
            are set to cores // workers for the run, so the cores are neither idle nor oversubscribed).
        memory_budget: bound on the bytes of tensors in flight (inputs and fp32 work copies), e.g. "4GB".
        device: where the math runs ("cpu", "cuda", "cuda:1"); reads and writes stay on the host.
        statistics: per-method statistic providers overriding the recipe's (see `suture.merge.statistics`).
        on_progress: called as (tensors_done, tensors_total, bytes_done, bytes_total).

    `out` is written atomically (`suture.io.atomic_output_dir`) and refused, with or without `force`, when it is,
    holds or lies inside an input (the recipe file or any of `recipe_sources`).
    """
    recipe = load_recipe(recipe)
    sources = recipe_sources(recipe)
    out = check_output_dir(out, force, sources)
    budget = parse_size(memory_budget, "memory_budget")  # before any work
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available; use --device cpu.")
    start = time.perf_counter()
    inputs = _Inputs(recipe, allow_pickle)
    try:
        plan = plan_merge(recipe, _inputs=inputs)
        plan.check()
        with atomic_output_dir(out, force, sources) as tmp:
            work = tmp / ".statistics"  # statistics computed for this merge: inside the output, removed before the end
            work.mkdir()
            providers = statistics if statistics is not None else _statistics(recipe, work)
            with ShardedSafetensorsWriter(tmp, [(t.name, t.shape, t.dtype) for t in plan.tensors],
                                          max_shard_size) as writer:
                _run(plan, inputs, writer, providers, workers, budget, device, on_progress)
            shutil.rmtree(work)
            _finish(recipe, plan, tmp, out.name)
    finally:
        inputs.close()
    return MergeResult(out, plan, time.perf_counter() - start, plan.total_bytes)


def _run(plan, inputs, writer, providers, workers, budget_bytes, device, on_progress) -> None:
    """Merge and write every planned tensor on `workers` threads; the first error stops the run and is raised.

    However the run ends (an error, Ctrl-C, SIGTERM), no worker is left running when this returns: the queued tasks
    are dropped and the running ones finish their tensor, so nothing writes into the output after its writer is
    closed and no thread is still inside torch when the interpreter exits (such a thread aborts the process)."""
    method = get_method(plan.recipe.merge_method)
    posts = [(get_method(step.method), step.parameters or {}) for step in plan.recipe.post_steps]
    budget, tasks, errors = _Budget(budget_bytes), _Tasks(), []
    lock, progress = threading.Lock(), [0, 0]  # tensors, bytes written

    def task(planned: PlannedTensor, reserved: int) -> None:
        try:
            with tasks.running() as go:
                if not go:
                    return
                if not (FUSED and _merge_fused(planned, plan, inputs, method, posts, device, writer)):
                    tensor = _merge_one(planned, plan, inputs, method, posts, providers, device)
                    writer.write(planned.name, tensor.to(planned.dtype))
                    del tensor
                with lock:
                    progress[0] += 1
                    progress[1] += torch.Size(planned.shape).numel() * planned.dtype.itemsize
                    if on_progress:
                        on_progress(progress[0], len(plan.tensors), progress[1], plan.total_bytes)
        except BaseException as err:  # noqa: BLE001 - re-raised on the main thread below
            errors.append(err)
            tasks.stop()
        finally:
            budget.release(reserved)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, workers or cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cores // workers))  # restored below
    pool, futures = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="suture-merge"), []
    try:
        # largest first: the workers finish together instead of one merging the last large tensor (an lm_head)
        # alone while the others wait; the writer's offsets are fixed, so the order does not change the files
        for planned in sorted(plan.tensors, key=lambda t: torch.Size(t.shape).numel(), reverse=True):
            if tasks.stopped:
                break
            # the main thread blocks here while the tensors in flight fill the budget: inputs and output, plus fp32
            # work copies of the whole tensor unless the method is elementwise (row blocks; an estimate, not a bound)
            numel = torch.Size(planned.shape).numel()
            cost = numel * (planned.dtype.itemsize * (len(plan.inputs) + 2) + 4 * (len(plan.inputs) + 3))
            futures.append(pool.submit(task, planned, budget.acquire(cost)))
        # Not `with ThreadPoolExecutor`: its exit joins the threads, and a Ctrl-C inside Thread.join can mark a
        # thread that is still running as finished (CPython gh-90882), so the interpreter would exit under it.
        wait(futures)
    finally:
        tasks.stop_and_wait()
        pool.shutdown(wait=False, cancel_futures=True)  # the workers are idle; queued tasks would do nothing
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]


class _Tasks:
    """The merge tasks at work. Once stopped, a task that has not started does nothing, and `stop_and_wait` returns
    when the started ones have finished."""

    def __init__(self):
        self.cond, self.busy, self.stopped = threading.Condition(), 0, False

    @contextlib.contextmanager
    def running(self) -> Iterator[bool]:
        """Wraps one task; yields whether it should run (False once stopped)."""
        with self.cond:
            go = not self.stopped
            self.busy += go
        try:
            yield go
        finally:
            with self.cond:
                self.busy -= go
                self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True

    def stop_and_wait(self) -> None:
        """Stop, then wait for the tasks at work. Ctrl-C or SIGTERM meanwhile do not cut the wait short (a task
        left running would go on writing, and a thread inside torch when the interpreter exits aborts the process
        with SIGABRT); the first of them is raised once the tasks are done."""
        interrupt = None
        while True:
            try:
                with self.cond:
                    self.stopped = True
                    self.cond.wait_for(lambda: self.busy == 0)
                break
            except (KeyboardInterrupt, SystemExit) as err:
                interrupt = interrupt or err
        if interrupt is not None:
            raise interrupt


BLOCK_ELEMENTS = 1 << 20  # entries per row block of an elementwise merge: the block's work stays in cache
FUSED = True  # merge with the methods' fused block kernels where they have one (False: `_merge_one` only)


def _merge_fused(planned: PlannedTensor, plan: MergePlan, inputs: _Inputs, method: MergeMethod, posts,
                 device: str, writer: ShardedSafetensorsWriter) -> bool:
    """Merge and write `planned` through its method's fused block kernel (`suture.merge.blocks`): equal to
    `_merge_one` bit for bit, with no whole-tensor copy. False, with nothing done, where no kernel applies (another
    action, post-steps, another device, a method or parameters without a kernel)."""
    recipe, name = plan.recipe, planned.name
    numel = torch.Size(planned.shape).numel()
    if planned.action != "merge" or posts or device != "cpu" or not numel or (method.needs_base
                                                                             and not recipe.base_model):
        return False
    generator = torch.Generator().manual_seed(_tensor_seed(recipe.seed, name)) if method.random else None
    kernel = method.block_kernel(_resolve(method, recipe, name, gradient_position(name, plan.num_layers),
                                          len(plan.inputs)), len(plan.inputs), generator)
    if kernel is None:
        return False
    refs = plan.inputs + ([recipe.base_model] if method.needs_base else [])
    readers, dtypes = [], []
    for ref in refs:
        reader = inputs.readers[ref]
        if isinstance(reader, CheckpointReader):  # positioned block reads from the file
            readers.append(lambda start, out, reader=reader: reader.read_into(name, start, out))
            dtypes.append(DTYPES[reader.index[name].dtype])
        else:  # a tensor computed on reading (LoRA applied): read whole once, checked whole
            whole = _read(inputs, ref, name, recipe).reshape(-1)
            readers.append(lambda start, out, whole=whole: out.copy_(whole[start : start + out.numel()]))
            dtypes.append(whole.dtype)

    def nonfinite() -> None:  # the whole-tensor check raises, naming the first model at fault and the count
        for ref in dict.fromkeys(refs):
            _read(inputs, ref, name, recipe)
        raise ValueError(f"Tensor {name}: an input changed while it was merged (a block held NaN or inf).")

    blocks.stream(numel, readers, dtypes, kernel, len(plan.inputs), _compute_dtype(recipe, method), planned.dtype,
                  lambda start, part: writer.write_part(name, start, part),
                  None if recipe.allow_nonfinite else nonfinite)
    return True


def _merge_one(planned: PlannedTensor, plan: MergePlan, inputs: _Inputs, method: MergeMethod, posts, providers,
               device: str) -> torch.Tensor:
    """The merged tensor `planned.name`, in its output dtype on the host."""
    recipe, name = plan.recipe, planned.name
    base_ref = recipe.base_model
    if planned.action in ("base", "copy"):
        return _read(inputs, base_ref if planned.action == "base" else (base_ref or plan.inputs[0]), name, recipe)
    wants_base = bool(base_ref) and (method.needs_base or any(p.needs_base for p, _ in posts))
    tensors, base = _read_inputs(planned, plan, inputs, wants_base)  # source dtype (aligned rows: fp32), host
    t = gradient_position(name, plan.num_layers)
    params = _resolve(method, recipe, name, t, len(tensors))
    stats = {s: _statistic(providers, method.name, s, name) for s in method.statistics}
    post_steps = [(post, {k: resolve_parameter(k, [given], tensor_name=name, t=t, default=v)
                          for k, v in post.shared.items()},
                   {s: _statistic(providers, post.name, s, name) for s in post.statistics}) for post, given in posts]

    def run(rows: slice) -> torch.Tensor:
        """Merge rows `rows` (all rows: slice(None)) on `device`; statistics of the tensor's shape are sliced too."""
        def cut(x):
            if isinstance(x, list):
                return [cut(v) for v in x]
            if x is None:
                return None
            return (x[rows] if x.dim() and x.shape == tuple(planned.shape) else x).to(device)  # 0-d: whole

        generator = None
        if method.random:
            generator = torch.Generator(device=device).manual_seed(_tensor_seed(recipe.seed, name))
        block_base = cut(base)
        try:
            merged = method(cut(tensors), block_base if method.needs_base else None, generator=generator, **params,
                            compute_dtype=_compute_dtype(recipe, method), **{k: cut(v) for k, v in stats.items()})
            for post, post_params, post_stats in post_steps:
                merged = post([merged], block_base, **post_params, compute_dtype=_compute_dtype(recipe, post),
                              **{k: cut(v) for k, v in post_stats.items()})
        except (ValueError, torch.linalg.LinAlgError) as err:
            raise ValueError(f"Tensor {name}: {err}") from err
        return merged.to("cpu", planned.dtype)

    numel = torch.Size(planned.shape).numel()
    blockwise = (len(planned.shape) >= 1 and numel > BLOCK_ELEMENTS and method.is_elementwise(params)
                 and all(post.is_elementwise(pp) for post, pp, _ in post_steps))
    if not blockwise:
        return run(slice(None))
    out = torch.empty(planned.shape, dtype=planned.dtype)
    step = max(1, BLOCK_ELEMENTS // max(1, numel // planned.shape[0]))  # rows per block
    for start in range(0, planned.shape[0], step):
        out[start : start + step] = run(slice(start, start + step))
    return out


def _resolve(method: MergeMethod, recipe: MergeRecipe, name: str, t: float, n: int) -> dict:
    shared = recipe.parameters or {}
    params = {}
    for key, default in method.per_model.items():
        values = [resolve_parameter(key, [entry.parameters, shared], tensor_name=name, t=t, default=default,
                                    cast=float if isinstance(default, (int, float)) or default is None else None)
                  for entry in recipe.method_inputs]
        params[key] = values
    for key, default in method.shared.items():
        params[key] = resolve_parameter(key, [shared], tensor_name=name, t=t, default=default)
    return params


def _read_inputs(planned: PlannedTensor, plan: MergePlan, inputs: _Inputs, wants_base: bool
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The method's input tensors of `planned` and the base's (None unless `wants_base`), with rows aligned for the
    "vocab" and "tokens" actions (mergekit aligns the base model's rows too, and takes its rows for missing tokens)."""
    base_ref = plan.recipe.base_model
    aligns = planned.action in ("vocab", "tokens")
    refs = dict.fromkeys(plan.inputs + ([base_ref] if base_ref and (wants_base or aligns) else []))
    raw = {ref: _read(inputs, ref, planned.name, plan.recipe) for ref in refs}
    if planned.action == "vocab":
        raw = {ref: _aligned(x, planned.shape, raw[base_ref]) for ref, x in raw.items()}
    elif planned.action == "tokens":
        raw = plan.tokens.align(raw, base_ref)
    return [raw[ref] for ref in plan.inputs], raw[base_ref] if wants_base else None


def _read(inputs: _Inputs, ref: str, name: str, recipe: MergeRecipe) -> torch.Tensor:
    """Tensor `name` of model `ref`; one holding NaN or inf stops the merge unless the recipe allows it."""
    tensor = inputs.readers[ref].read(name)
    if not recipe.allow_nonfinite:
        check_finite(tensor, name, ref)
    return tensor


def check_finite(tensor: torch.Tensor, name: str, model: str) -> None:
    """Raise, naming the tensor and the model, when a floating `tensor` holds NaN or inf. One reduction pass
    (`aminmax` propagates NaN) and no tensor-sized temporary unless it fails."""
    if not tensor.is_floating_point() or not tensor.numel():
        return
    low, high = torch.aminmax(tensor if tensor.dtype.itemsize > 1 else tensor.half())  # float8: no aminmax kernel
    if torch.isfinite(low) and torch.isfinite(high):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise ValueError(f"Tensor {name} of {model} has {bad} non-finite value(s) (NaN or inf) in {tensor.numel()}: a "
                     "merge would spread them into the output. Repair or replace that checkpoint, or set "
                     "`allow_nonfinite: true` in the recipe (--allow-nonfinite) to merge them as they are.")


def _compute_dtype(recipe: MergeRecipe, method: MergeMethod) -> torch.dtype:
    """The method's dtype, widened to the recipe's `dtype` (mergekit's compute dtype) where that is wider."""
    wanted = parse_dtype(recipe.dtype) or method.dtype
    return wanted if wanted.itemsize > method.dtype.itemsize else method.dtype


def _aligned(tensor: torch.Tensor, shape: tuple[int, ...], base: torch.Tensor) -> torch.Tensor:
    """Rows of `tensor` aligned to the base's vocabulary: missing rows from the base, extra rows dropped."""
    rows = min(tensor.shape[0], shape[0])
    out = base.clone()
    out[:rows] = tensor[:rows]
    return out


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _statistic(providers: dict, method: str, stat: str, name: str):
    provider = providers.get(method)
    if provider is None:
        raise ValueError(f"Method {method!r} needs statistics ({stat}); pass a provider for it in `statistics` "
                         f"(`{{{method!r}: provider}}`, provider(stat, tensor_name) -> tensor or None).")
    return provider(stat, name)


def _statistics(recipe: MergeRecipe, workdir: Path) -> dict:
    """Statistic providers `(stat, tensor_name) -> tensor | None` for the methods of the recipe that take
    statistics, from each method's own source (loaded from the recipe's `statistics`, or computed from its
    `calibration` into `workdir`)."""
    names = dict.fromkeys([recipe.merge_method, *(step.method for step in recipe.post_steps)])
    methods = [get_method(name) for name in names]
    return {m.name: m.statistics_source.provider(m.name, recipe, workdir) for m in methods if m.statistics}


def merge_state_dicts(
    merge_method: str,
    models: list[dict[str, torch.Tensor]],
    base: dict[str, torch.Tensor] | None = None,
    parameters: dict | None = None,
    model_parameters: list[dict | None] | None = None,
    num_layers: int | None = None,
    seed: int = 0,
    statistics: dict | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, torch.Tensor]:
    """In-memory merge of small models (or a notebook's hand-picked tensors) with the same semantics as `merge`.

    Args:
        models: the method's inputs (not including `base`), as state dicts with identical names and shapes.
        parameters / model_parameters: the recipe's top-level `parameters` and each model's `parameters`
            (scalars, layer gradients and `{filter, value}` conditions, as in YAML).
        num_layers: for layer gradients (default: inferred from the tensor names).
        statistics: providers `(stat, tensor_name) -> tensor` per method name, for the methods that take
            statistics.
        allow_nonfinite: merge tensors holding NaN or inf (by default an error names the tensor and the model).
    Returns the merged state dict (each tensor in its first model's dtype).
    """
    refs = [f"model_{i}" for i in range(len(models))]
    entries = [{"model": ref, "parameters": p} for ref, p in zip(refs, model_parameters or [None] * len(models))]
    recipe = load_recipe({"merge_method": merge_method, "models": entries, "parameters": parameters,
                                         "base_model": "base" if base is not None else None, "seed": seed})
    method = get_method(merge_method)
    problems = _parameter_problems(recipe)
    if problems:
        raise ValueError("; ".join(problems))
    names = list(models[0])
    missing = [n for sd in [*models, *([base] if base is not None else [])] for n in names if n not in sd]
    if missing:
        raise ValueError(f"Tensors missing from some inputs: {sorted(set(missing))[:10]}.")
    layers = num_layers or max([i for i in map(layer_index, names) if i is not None], default=0) + 1
    if not allow_nonfinite:
        for ref, sd in [*zip(refs, models), *([("base", base)] if base is not None else [])]:
            for name in names:
                check_finite(sd[name], name, ref)
    merged = {}
    for name in names:
        t = gradient_position(name, layers)
        params = _resolve(method, recipe, name, t, len(models))
        stats = {s: _statistic(statistics or {}, method.name, s, name) for s in method.statistics}
        generator = torch.Generator().manual_seed(_tensor_seed(seed, name)) if method.random else None
        out = method([sd[name] for sd in models], base[name] if base is not None and method.needs_base else None,
                     generator=generator, **params, **stats)
        merged[name] = out.to(models[0][name].dtype)
    return merged


# -------------------------------------------------------------------------------------------------- outputs
def _finish(recipe: MergeRecipe, plan: MergePlan, tmp: Path, title: str) -> None:
    donor = config_dir(recipe.donor)
    if (donor / "config.json").is_file():
        config = read_json(donor / "config.json", "model config")
        _set_vocab_size(config, plan.vocab_size)
        config.update(recipe.config_overrides)
        dtypes = {t.dtype for t in plan.tensors if t.dtype.is_floating_point}
        if len(dtypes) == 1:
            config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
            config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    elif recipe.config_overrides:
        raise ValueError(f"config_overrides given but the config donor {donor} has no config.json.")
    tokenizer_donor = config_dir(recipe.tokenizer_donor)
    if tokenizer_donor.is_dir():
        copy_tokenizer_files(tokenizer_donor, tmp)
    if plan.chat_template:  # transformers reads chat_template.jinja before tokenizer_config.json's template
        (tmp / "chat_template.jinja").write_text(plan.chat_template)
    (tmp / "suture_merge.yaml").write_text(recipe.to_yaml())
    (tmp / "README.md").write_text(model_card(recipe, plan, title))


def _set_vocab_size(config: dict, rows: int | None) -> None:
    """The config's vocab_size (top level, or its text_config's) = the rows of the written vocabulary tensors."""
    if rows is None:
        return
    holder = config if "vocab_size" in config or not isinstance(config.get("text_config"), dict) else \
        config["text_config"]
    holder["vocab_size"] = rows


def model_card(recipe: MergeRecipe, plan: MergePlan, title: str) -> str:
    """README.md for a merge: hub metadata (the inputs on the hub as `base_model`), the models and the recipe."""
    from ..io.cards import render_card

    counts = ", ".join(f"{n} {action}" for action, n in plan.counts().items())
    lineage = "\n".join(f"- `{m.model}`" + (f" ({m.parameters})" if m.parameters else "") for m in recipe.models)
    body = "\n".join([
        f"A `{recipe.merge_method}` merge made with suture {__version__}"
        + (f" on the base `{recipe.base_model}`" if recipe.base_model else "") + ".", "",
        "## Models", "", lineage, "", f"Tensors: {len(plan.tensors)} ({counts}).", "",
        "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", "",
        "Reproduce with `suture merge suture_merge.yaml OUT`."])
    return render_card(recipe.name or title, body, tags=["suture", "merge", recipe.merge_method],
                       base_model=list(dict.fromkeys([recipe.base_model, *(m.model for m in recipe.models)])))
