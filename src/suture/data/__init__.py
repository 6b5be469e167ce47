"""Calibration and training data: named sources, JSONL records or saved datasets, token sequences and padded batches.

One data layer serves every job that reads text: layer importance, merge statistics (AIM, RCP) and distillation.

    from suture.data import load_sequences, right_padded
    sequences = load_sequences("traces.jsonl", tokenizer, n=64, max_length=512)   # or a named source: "workload"
    sequences = load_sequences("traces/", tokenizer)   # a directory written by datasets' Dataset.save_to_disk
    batches = right_padded(sequences, batch_size=8, pad_id=tokenizer.pad_token_id, device="cpu")
    examples = load_examples("traces.jsonl", tokenizer, n=64, max_length=512)    # + response masks (distillation)

Packed rows (several whole documents per row, each starting from a fresh state; `suture.data.packing`):

    rows = pack_sequences(sequences, max_length=512)
    batch = packed_batch(rows, pad_id=tokenizer.pad_token_id)   # input_ids, position_ids, labels

Named sources are registered with `register_data_source` or, from an installed package, under the entry-point group
`suture.data_sources` (the built-in workload registers itself there as "workload").
"""

from .records import JSONL_FIELDS, check_data, encode_record, load_sequences
from .batching import IGNORE_INDEX, Batch, right_padded
from .examples import Example, encode_example, load_examples
from .packing import PackedBatch, PackedRow, pack_sequences, packed_batch
from .sources import ENTRY_POINT_GROUP, DataSource, data_source_names, get_data_source, register_data_source

__all__ = [
    "ENTRY_POINT_GROUP", "IGNORE_INDEX", "JSONL_FIELDS", "Batch", "DataSource", "Example", "PackedBatch", "PackedRow", "check_data",
    "data_source_names", "encode_example", "encode_record", "get_data_source", "load_examples", "load_sequences",
    "pack_sequences", "packed_batch", "register_data_source", "right_padded",
]
