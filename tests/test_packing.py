"""Sequence packing: rows of whole documents, each document computed as if it ran alone (attention inside the
document, Mamba conv and SSM state reset at its start), so a packed batch gives every document's own logits,
per-token losses and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_source
from transformers.masking_utils import find_packed_sequence_indices

from suture.data import PackedRow, pack_sequences, packed_batch
from suture.data import IGNORE_INDEX
from suture.surgery import hybridize_model

LAYOUTS = {  # None: the llama teacher itself
    "llama-teacher": None,
    "mamba": ["mamba", None, "mamba", None],
    "mamba2": [None, "mamba2", None, "mamba2"],
    "mixed": ["mamba", "mamba2", None, "mamba"],
    "all-mamba": ["mamba2", "mamba", "mamba2", "mamba"],
}
LENGTHS = [5, 1, 9, 7, 3, 12, 2]  # packed into rows of at most 20 tokens: several rows, padding, 1-token document


def _model(layout, attn="sdpa"):
    teacher = tiny_source("llama")
    model = teacher if layout is None else hybridize_model(teacher, layout).eval()
    model.set_attn_implementation(attn)
    return model


def _documents(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=gen).tolist() for n in LENGTHS]


def _token_losses(logits, targets):
    """Per-token next-token CE: logits (..., T, V) predict targets (..., T) shifted by one -> (..., T - 1)."""
    shifted = targets[..., 1:]
    losses = F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(shifted.shape)


# ---------------------------------------------------------------------------------------------------------------
# Packing itself.


def test_first_fit_rows_spans_and_restarting_positions():
    seqs = [[1] * 5, [2] * 8, [3] * 3, [4] * 6, [5] * 2]
    rows = pack_sequences(seqs, max_length=10)
    assert [r.documents for r in rows] == [[0, 2, 4], [1], [3]]  # 3 and 2 fill row 0; 6 fits in no open row
    assert rows[0] == PackedRow(input_ids=[1] * 5 + [3] * 3 + [5] * 2, position_ids=[0, 1, 2, 3, 4, 0, 1, 2, 0, 1],
                                spans=[(0, 5), (5, 8), (8, 10)], documents=[0, 2, 4])
    assert rows[1].position_ids == list(range(8)) and rows[2].spans == [(0, 6)]
    assert pack_sequences(seqs, max_length=10) == rows  # deterministic
    for row in rows:  # every document is whole and in order
        assert [row.input_ids[s:e] for s, e in row.spans] == [seqs[k] for k in row.documents]


def test_pack_errors_name_the_sequence():
    with pytest.raises(ValueError, match=r"sequence 1 has 11 tokens, more than max_length=10"):
        pack_sequences([[1] * 3, [1] * 11], max_length=10)
    with pytest.raises(ValueError, match="sequence 2 is empty"):
        pack_sequences([[1], [2], []], max_length=10)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        pack_sequences([[1]], max_length=0)
    with pytest.raises(ValueError, match="pad_id must be a token id"):
        packed_batch(pack_sequences([[1]], max_length=4), pad_id=None)


def test_packed_batch_padding_is_a_document_of_its_own():
    rows = pack_sequences([[7, 8, 9], [10, 11], [12, 13, 14, 15]], max_length=5)
    batch = packed_batch(rows, pad_id=0)
    assert batch.input_ids.tolist() == [[7, 8, 9, 10, 11], [12, 13, 14, 15, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.labels.tolist() == [[-100, 8, 9, -100, 11], [-100, 13, 14, 15, -100]]
    # what transformers' mask builders and suture's mixers read: documents 0, 1 and the padding
    assert find_packed_sequence_indices(batch.position_ids).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]


# ---------------------------------------------------------------------------------------------------------------
# Packed == every document run alone.


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@torch.no_grad()
def test_packed_batch_equals_documents_run_one_by_one(layout, attn):
    model = _model(layout, attn)
    docs = _documents()
    rows = pack_sequences(docs, max_length=20)
    assert len(rows) >= 2 and any(len(r.spans) >= 3 for r in rows)
    batch = packed_batch(rows, pad_id=0)
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels, use_cache=False)
    packed_losses = _token_losses(out.logits, batch.labels)  # (b, L - 1)
    alone_losses = []
    for i, row in enumerate(rows):
        for (s, e), k in zip(row.spans, row.documents):
            ids = torch.tensor([docs[k]])
            logits = model(input_ids=ids, use_cache=False).logits[0]  # (n, V)
            torch.testing.assert_close(out.logits[i, s:e], logits, rtol=1e-4, atol=1e-4)
            losses = _token_losses(logits, ids[0])  # (n - 1,)
            torch.testing.assert_close(packed_losses[i, s : e - 1], losses, rtol=1e-4, atol=1e-5)
            alone_losses.append(losses)
        ends = [e - 1 for _, e in row.spans if e < batch.labels.shape[1]]  # positions that predict the next document
        assert (packed_losses[i, ends] == 0).all()  # no loss across a boundary
    torch.testing.assert_close(out.loss, torch.cat(alone_losses).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["mixed", "mamba2"])
def test_packed_gradients_equal_the_sum_over_documents(layout):
    model = _model(LAYOUTS[layout])
    docs = _documents(seed=1)
    rows = pack_sequences(docs, max_length=20)
    batch = packed_batch(rows, pad_id=0)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    _token_losses(logits, batch.labels).sum().backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for doc in docs:
        ids = torch.tensor(doc)
        _token_losses(model(input_ids=ids[None], use_cache=False).logits[0], ids).sum().backward()
    for name, p in model.named_parameters():  # fp32 sums in another order: tolerance relative to the largest entry
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-4, atol=2e-4 * p.grad.abs().max().item(),
                                   msg=lambda m: f"grad {name}: {m}")


@torch.no_grad()
def test_packing_is_read_only_without_a_mask_and_a_cache():
    """As in transformers: with a padding mask (even all ones) or a cache, restarting position ids split nothing, in
    attention and Mamba layers alike."""
    docs = _documents()
    rows = pack_sequences(docs, max_length=40)
    batch = packed_batch(rows, pad_id=0)
    ones = torch.ones_like(batch.input_ids)
    mixed = _model(LAYOUTS["mixed"])
    packed = mixed(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    with_mask = mixed(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=ones,
                      use_cache=False).logits
    with_cache = mixed(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=True).logits
    torch.testing.assert_close(with_mask, with_cache, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_mask, packed, atol=1e-3)
    mamba_only = _model(LAYOUTS["all-mamba"])  # no position embeddings: unsplit == one long sequence
    torch.testing.assert_close(
        mamba_only(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=ones,
                   use_cache=False).logits,
        mamba_only(input_ids=batch.input_ids, use_cache=False).logits, rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize("use_cache", [False, None], ids=["use_cache=False", "default-use_cache"])
def test_gradient_checkpointing_splits_documents_as_a_plain_pass(use_cache):
    """Gradient checkpointing drops the cache inside the layers; whether documents are split is still decided as for
    attention (from the model's inputs), so the loss and gradients equal those of a plain pass."""
    model = _model(LAYOUTS["mixed"]).train()  # no dropout in the tiny models: train() changes nothing else
    batch = packed_batch(pack_sequences(_documents(), max_length=20), pad_id=0)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels,
                     use_cache=use_cache).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    plain_loss, plain = loss_and_grads()
    model.gradient_checkpointing_enable()
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, plain_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], msg=lambda m: f"grad {name}: {m}")
