"""Mamba mixers that replace attention inside a hybrid, in the "Mamba-in-Llama" (MIL) layout.

Both mixers produce x and B at the attention's KV width and C at its query width, so a mixer can be seeded
from the attention layer it replaces (V -> x, K -> B, Q -> C, O -> out_proj: the transfer table of the `mamba` and
`mamba2` layer kinds, `suture.layer_kinds.mamba`, which finds the row blocks in each mixer's `row_blocks`).

- `HybridMambaMixer` (Mamba-1, as in M1 and Apriel-H1): d_state 16, d_inner = heads * head_dim, a low-rank dt
  projection, A per channel and state. x is widened to d_inner before the conv by repeating d_state-wide
  slices, B is shared by the same slice groups (the published layout).
- `HybridMamba2Mixer` (Mamba-2, as in MambaInLlama's mamba2): one SSM head per attention head with
  head_dim = d_state = the attention head_dim, A one scalar per head, a conv over [x | B | C] and a gated
  RMSNorm (normalised per head, gate applied before the norm) before out_proj.

The in_proj row order is `[z | x | B | C | dt]` for both (`row_blocks["in_proj.weight"]`). Decoding state lives
in transformers' cache (`LinearAttentionLayer`): the conv state holds the last `d_conv` conv inputs, the SSM state
is kept in fp32.

A mixer whose layer is the config's `memory_layer` (SambaY) also hands its scan output, after the D skip and
before the z gate, to the later GMU layers of the same forward (`shared.memory`, `cross_decoder.SharedStates`), at
prefill for every position and at decode for the new token; Mamba-1 then applies the z gate outside the scan.

Packed rows (several documents in one row, position ids restarting at 0 for each): without a padding mask and
without a cache, the mixers read the document index from `position_ids` exactly as transformers' mask builders do for
attention (`find_packed_sequence_indices`), and pass it to the kernels as `seq_idx`, so every document starts from a
fresh conv and SSM state.

Deliberate differences from transformers' `MambaMixer` (Mamba-1): B, C and dt are projected from the layer
input (not from the conv output through `x_proj`), x and B are at KV width, and B/C are grouped per
d_state-wide slice. Mamba-2 layers with as many KV heads as query heads coincide exactly with transformers'
`Mamba2Mixer` (n_groups = n_heads, state_size = head_dim), which the tests check.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import find_packed_sequence_indices
from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

from .. import kernels
from .configuration_hybrid import HybridConfig


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded positions of x (b, L, c) given a 2D padding mask (b, L), or of one decode token x (b, c) given
    its mask (b, 1): padding never enters a state."""
    if mask is None:
        return x
    mask = mask.to(x.dtype)
    return x * (mask if x.dim() == 2 else mask[:, :, None])


def _document_index(position_ids, attention_mask, cache, batch: int) -> torch.Tensor | None:
    """seq_idx (b, L) of packed rows, or None when the rows are not packed. Read from the position ids only without
    a padding mask and without a cache: the same rule and function as transformers' attention mask builders, so
    Mamba and attention layers see the same documents."""
    if position_ids is None or attention_mask is not None or cache is not None:
        return None
    return find_packed_sequence_indices(position_ids.expand(batch, -1))


def _inverse_softplus_dt(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """dt ~ log-uniform in [dt_min, dt_max] (floored), returned as softplus^-1(dt) for use as a bias."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def _is_decode_step(cache, layer_idx: int, seq_len: int) -> bool:
    """One new token on top of an existing state: use the single-step conv and state-update kernels."""
    return (
        cache is not None
        and seq_len == 1
        and cache.get_conv_state(layer_idx) is not None
        and not cache.is_recording_past(layer_idx)  # assisted decoding keeps past conv inputs for rollback
    )


class _NegExpCache:
    """-exp(A_log) in fp32, computed once per value of A_log while autograd is off (decoding), again after any change:
    the key is the parameter object itself, its storage and its version counter (every in-place update bumps it).
    Inference tensors keep no version counter, and a compiled step cannot read one (the graph computes it, fused):
    both compute it every time."""

    def __init__(self):
        self.key, self.value = None, None

    def __call__(self, A_log: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or A_log.is_inference():
            return -torch.exp(A_log.float())
        key = self.key
        if key is None or key[0] is not A_log or key[1:] != (A_log.data_ptr(), A_log._version):
            self.key, self.value = (A_log, A_log.data_ptr(), A_log._version), -torch.exp(A_log.float())
        return self.value


def _reset_conv(conv1d: nn.Conv1d) -> None:
    """PyTorch's default Conv1d init, through transformers' flag-respecting init functions."""
    init.kaiming_uniform_(conv1d.weight, a=math.sqrt(5))
    if conv1d.bias is not None:
        bound = 1.0 / math.sqrt(conv1d.weight.shape[1] * conv1d.weight.shape[2])
        init.uniform_(conv1d.bias, -bound, bound)


class _CachedConv:
    """Causal depthwise conv over (b, c, L) that reads and writes the layer's conv state in the cache (a prefill or a
    chunk; one decode token goes through the mixers' `_step`)."""

    @staticmethod
    def run(conv1d: nn.Conv1d, x: torch.Tensor, cache, layer_idx: int, seq_idx=None) -> torch.Tensor:
        weight = conv1d.weight.squeeze(1)  # (c, w)
        seq_len = x.shape[-1]
        if cache is not None:
            # With a previous state this is [state | x], so the conv sees the true left context.
            x = cache.update_conv_state(x, layer_idx, conv_kernel_size=weight.shape[-1])
        out = kernels.causal_conv1d_fn(x, weight, conv1d.bias, activation="silu", seq_idx=seq_idx)
        return out[..., -seq_len:]


class HybridMambaMixer(nn.Module):
    """Mamba-1 mixer in the MIL layout (M1 / Apriel-H1)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.d_inner = config.resolved_mamba_d_inner
        self.d_xb = config.resolved_mamba_d_xb
        self.d_state = config.mamba_d_state
        self.d_conv = config.mamba_d_conv
        self.dt_rank = config.resolved_mamba_dt_rank
        self.repeat = self.d_inner // self.d_xb  # query heads per KV head
        self.is_memory = layer_idx == config.memory_layer  # hands its scan output to the GMU layers
        self._dt_init = (config.mamba_dt_min, config.mamba_dt_max, config.mamba_dt_init_floor)

        self.row_blocks = {"in_proj.weight": {"z": self.d_inner, "x": self.d_xb, "B": self.d_xb, "C": self.d_inner,
                                              "dt": self.dt_rank}}
        self._in_sizes = list(self.row_blocks["in_proj.weight"].values())
        self._neg_exp = _NegExpCache()  # A at decode
        self.in_proj = nn.Linear(self.hidden_size, sum(self._in_sizes), bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=self.d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=config.mamba_proj_bias)
        if self.D.device.type != "meta":
            self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Fresh init of the parameters attention has no counterpart for: dt projection, A (S4D-real), D = 1 and
        the conv (PyTorch's default). Parameters loaded from a checkpoint are left alone."""
        std = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -std, std)
        init.copy_(self.dt_proj.bias, _inverse_softplus_dt(self.d_inner, *self._dt_init))
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.d_inner, -1)
        init.copy_(self.A_log, torch.log(A))
        init.ones_(self.D)
        _reset_conv(self.conv1d)

    def _widen_x(self, x: torch.Tensor) -> torch.Tensor:
        """(b, L, d_xb) -> (b, L, d_inner): repeat each d_state-wide slice `repeat` times (MIL's repeat_kv)."""
        if self.repeat == 1:
            return x
        b, L, _ = x.shape
        x = x.view(b, L, self.d_xb // self.d_state, 1, self.d_state)
        return x.expand(-1, -1, -1, self.repeat, -1).reshape(b, L, self.d_inner)

    def _widen_groups(self, t: torch.Tensor) -> torch.Tensor:
        """(b, d_xb / n, ...) -> (b, d_inner / n, ...): each KV slice group serves `repeat` C groups (MIL's
        repeat_kv on B). The CUDA kernels need B and C with the same number of groups."""
        if self.repeat == 1:
            return t
        return t.repeat_interleave(self.repeat, dim=1)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
        position_ids: torch.LongTensor | None = None, shared=None,
    ) -> torch.Tensor:
        """hidden_states (b, L, hidden) -> (b, L, hidden). `attention_mask` (b, L), the 2D padding mask, zeroes
        padded positions. `position_ids` (b or 1, L) that restart inside a row mark packed documents (module doc).
        The memory layer writes its scan output to `shared.memory` (b, L, d_inner)."""
        b, L, _ = hidden_states.shape
        if _is_decode_step(cache, self.layer_idx, L):
            return self._step(hidden_states, attention_mask, cache, shared)
        seq_idx = _document_index(position_ids, attention_mask, cache, b)  # (b, L) or None
        zxbcdt = self.in_proj(hidden_states)  # (b, L, d_in_proj)
        z, x, B, C, dt = zxbcdt.split(self._in_sizes, dim=-1)
        x = self._widen_x(_masked(x, attention_mask))  # (b, L, d_inner)
        x = _CachedConv.run(self.conv1d, x.transpose(1, 2), cache, self.layer_idx, seq_idx)  # (b, d_in, L)
        x = _masked(x.transpose(1, 2), attention_mask)  # (b, L, d_inner)
        dt = F.linear(dt, self.dt_proj.weight)  # (b, L, d_inner); the bias is applied inside the scan
        A = -torch.exp(self.A_log.float())  # (d_inner, n)
        n_b, n_c = self.d_xb // self.d_state, self.d_inner // self.d_state
        gate = None if self.is_memory else z  # the memory is taken before the gate
        initial_state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        B = self._widen_groups(B.view(b, L, n_b, self.d_state).transpose(1, 2))  # (b, g, L, n)
        B = B.transpose(2, 3)  # (b, g, n, L): group j reads KV slice j // repeat
        C = C.view(b, L, n_c, self.d_state).permute(0, 2, 3, 1)  # (b, g, n, L)
        out = kernels.selective_scan_fn(
            x.transpose(1, 2), dt.transpose(1, 2), A, B, C, D=self.D.float(),
            z=None if gate is None else gate.transpose(1, 2), delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True, return_last_state=cache is not None, initial_state=initial_state,
            seq_idx=seq_idx,
        )
        if cache is not None:
            out, last_state = out
            cache.update_recurrent_state(last_state.float(), self.layer_idx)
        y = out.transpose(1, 2)  # (b, L, d_inner)
        if self.is_memory:
            if shared is not None:
                shared.memory = y  # (b, L, d_inner): after the D skip, before the gate
            y = y * F.silu(z)
        return self.out_proj(y)  # (b, L, hidden)

    def _step(self, hidden_states, attention_mask, cache, shared) -> torch.Tensor:
        """One decode token (b, 1, hidden) -> (b, 1, hidden): the single-step conv and state update, on (b, c) tensors
        (no sequence axis, no transposes), with A computed once while A_log is unchanged. At batch 1 on a CPU the
        step's cost beside its three matmuls is the Python of its small ops, so it takes views by shape."""
        b = hidden_states.shape[0]
        n, g_x, g_c = self.d_state, self.d_xb // self.d_state, self.d_inner // self.d_state
        z, x, B, C, dt = self.in_proj(hidden_states.view(b, -1)).split(self._in_sizes, dim=-1)  # (b, *)
        x = _masked(x, attention_mask)  # attention_mask (b, 1)
        if self.repeat > 1:  # MIL's repeat_kv: each d_state-wide slice of x serves `repeat` C groups
            x = x.view(b, g_x, 1, n).expand(b, g_x, self.repeat, n).reshape(b, self.d_inner)
        conv_update, state_update = kernels.decode_kernels(x.device)
        conv_state = cache.get_conv_state(self.layer_idx)  # (b, d_inner, w), updated in place
        x = conv_update(x, conv_state, self.conv1d.weight.view(self.d_inner, -1), self.conv1d.bias,
                        activation="silu")  # (b, d_inner)
        x = _masked(x, attention_mask)
        dt = F.linear(dt, self.dt_proj.weight)  # (b, d_inner); the bias is applied inside the update
        y = state_update(
            cache.get_recurrent_state(self.layer_idx), x, dt, self._neg_exp(self.A_log),
            B.view(b, g_x, n), C.view(b, g_c, n),  # B's groups serve `repeat` C groups each, as widened in forward
            D=self.D, z=None if self.is_memory else z, dt_bias=self.dt_proj.bias, dt_softplus=True,
        )  # (b, d_inner); the state (b, d_inner, n) fp32 is updated in place
        if self.is_memory:
            if shared is not None:
                shared.memory = y.view(b, 1, -1)  # (b, 1, d_inner): after the D skip, before the gate
            y = y * F.silu(z)
        return self.out_proj(y).view(b, 1, -1)  # (b, 1, hidden)


class HybridMamba2Mixer(nn.Module):
    """Mamba-2 mixer in the MIL layout (MambaInLlama mamba2): one SSM head per attention head."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = self.d_state = config.head_dim
        self.d_inner = self.num_heads * self.head_dim
        self.d_xb = self.num_kv_heads * self.head_dim
        self.d_conv = config.mamba2_d_conv
        self.chunk_size = config.mamba2_chunk_size
        self._dt_init = (config.mamba_dt_min, config.mamba_dt_max, config.mamba_dt_init_floor)
        self._a_init_range = tuple(config.mamba2_a_init_range)
        self.is_memory = layer_idx == config.memory_layer  # hands its scan output to the GMU layers

        self.conv_dim = 2 * self.d_xb + self.d_inner  # [x | B | C]
        self.row_blocks = {"in_proj.weight": {"z": self.d_inner, "x": self.d_xb, "B": self.d_xb, "C": self.d_inner,
                                              "dt": self.num_heads}}
        d_in_proj = sum(self.row_blocks["in_proj.weight"].values())
        self.in_proj = nn.Linear(self.hidden_size, d_in_proj, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, padding=self.d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self._neg_exp = _NegExpCache()  # A at decode
        self.norm = MambaRMSNormGated(self.d_inner, group_size=self.head_dim, eps=config.mamba2_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=config.mamba_proj_bias)
        if self.D.device.type != "meta":
            self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Fresh init of the parameters attention has no counterpart for: dt bias, A ~ U(a_init_range) per head,
        D = 1, norm = 1 and the conv (PyTorch's default). Parameters loaded from a checkpoint are left alone."""
        init.copy_(self.dt_bias, _inverse_softplus_dt(self.num_heads, *self._dt_init))
        init.copy_(self.A_log, torch.log(torch.empty(self.num_heads).uniform_(*self._a_init_range)))
        init.ones_(self.D)
        init.ones_(self.norm.weight)
        _reset_conv(self.conv1d)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
        position_ids: torch.LongTensor | None = None, shared=None,
    ) -> torch.Tensor:
        """hidden_states (b, L, hidden) -> (b, L, hidden). `attention_mask` (b, L), the 2D padding mask, zeroes
        padded positions. `position_ids` (b or 1, L) that restart inside a row mark packed documents (module doc).
        The memory layer writes its scan output to `shared.memory` (b, L, d_inner)."""
        b, L, _ = hidden_states.shape
        h, kv, p, n = self.num_heads, self.num_kv_heads, self.head_dim, self.d_state
        if _is_decode_step(cache, self.layer_idx, L):
            return self._step(hidden_states, attention_mask, cache, shared)
        seq_idx = _document_index(position_ids, attention_mask, cache, b)  # (b, L) or None
        zxbcdt = self.in_proj(hidden_states)  # (b, L, d_in_proj)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)  # x, B, C adjacent
        xBC = _masked(xBC, attention_mask)
        xBC = _CachedConv.run(self.conv1d, xBC.transpose(1, 2), cache, self.layer_idx, seq_idx)  # (b, c, L)
        xBC = _masked(xBC.transpose(1, 2), attention_mask)  # (b, L, conv_dim)
        x, B, C = xBC.split([self.d_xb, self.d_xb, self.d_inner], dim=-1)
        # KV head -> the query heads it serves (MIL's repeat_kv); the kernels need B and C with equal groups.
        x = x.view(b, L, kv, p).repeat_interleave(h // kv, dim=2)  # (b, L, h, p)
        B = B.view(b, L, kv, n).repeat_interleave(h // kv, dim=2)  # (b, L, h, n)
        C = C.view(b, L, h, n)  # (b, L, h, n)
        A = -torch.exp(self.A_log.float())  # (h,)
        initial_state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        out = kernels.mamba_chunk_scan_combined(
            x, dt, A, B, C, self.chunk_size, D=self.D,
            dt_bias=self.dt_bias, initial_states=initial_state, seq_idx=seq_idx, dt_softplus=True,
            return_final_states=cache is not None,
        )
        if cache is not None:
            out, final_state = out
            cache.update_recurrent_state(final_state.float(), self.layer_idx)
        y = out.reshape(b, L, self.d_inner)
        if self.is_memory and shared is not None:
            shared.memory = y  # (b, L, d_inner): after the D skip, before the gated norm
        y = self.norm(y, z)  # gated RMSNorm: norm(y * silu(z)) per head
        return self.out_proj(y.to(hidden_states.dtype))

    def _step(self, hidden_states, attention_mask, cache, shared) -> torch.Tensor:
        """One decode token (b, 1, hidden) -> (b, 1, hidden): the single-step conv and the per-head state update on
        (b, h, p) tensors, with one dt and one A per head (expanded views, so the update computes each once) and A
        computed once while A_log is unchanged; B stays per KV head (the update broadcasts it over its query heads).
        """
        b = hidden_states.shape[0]
        h, kv, p, n = self.num_heads, self.num_kv_heads, self.head_dim, self.d_state
        z, xBC, dt = self.in_proj(hidden_states.view(b, -1)).split([self.d_inner, self.conv_dim, h], dim=-1)
        xBC = _masked(xBC, attention_mask)  # attention_mask (b, 1)
        conv_update, state_update = kernels.decode_kernels(xBC.device)
        xBC = conv_update(xBC, cache.get_conv_state(self.layer_idx), self.conv1d.weight.view(self.conv_dim, -1),
                          self.conv1d.bias, activation="silu")  # (b, conv_dim); the conv state is updated in place
        xBC = _masked(xBC, attention_mask)
        x, B, C = xBC.split([self.d_xb, self.d_xb, self.d_inner], dim=-1)
        x = x.view(b, kv, 1, p).expand(b, kv, h // kv, p).reshape(b, h, p)  # KV head -> its query heads
        y = state_update(
            cache.get_recurrent_state(self.layer_idx), x, dt.view(b, h, 1).expand(b, h, p),
            self._neg_exp(self.A_log).view(h, 1, 1).expand(h, p, n), B.view(b, kv, n), C.view(b, h, n),
            D=self.D.view(h, 1).expand(h, p), dt_bias=self.dt_bias.view(h, 1).expand(h, p), dt_softplus=True,
        ).view(b, 1, self.d_inner)  # the state (b, h, p, n) fp32 is updated in place
        if self.is_memory and shared is not None:
            shared.memory = y  # (b, 1, d_inner): after the D skip, before the gated norm
        y = self.norm(y, z.view(b, 1, self.d_inner))  # gated RMSNorm: norm(y * silu(z)) per head
        return self.out_proj(y.to(hidden_states.dtype))  # (b, 1, hidden)
