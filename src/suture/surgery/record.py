"""What `hybridize` writes beside the weights: `surgery.json` (the record) and `README.md` (the model card).

The record names the source (path, checksums), the selection and the reason for each replaced layer, the weight
transfer, and every source tensor dropped or ignored. When the source is itself a suture hybrid, `lineage` adds
where it came from: the source hybrid's layer types and its own surgery.json, the layers carried over, the layers
newly replaced (with their reason) and the teacher whose attention initialised them.
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import __version__
from ..io import is_hub_id, read_json
from ..io.cards import SUTURE_URL, load_section, render_card
from ..layer_kinds import get_layer_kind


def checkpoint_facts(path: Path, config, digests: dict[str, str]) -> dict:
    """How surgery.json names a checkpoint it read: path, name, model_type, layers, SHA-256 of its weight files."""
    return {
        "path": str(path.resolve()),
        "name": hub_name(config) or path.name,
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "sha256": digests,
    }


def lineage_record(src: Path, source_config, new: list[int], reasons: dict[int, str],
                   teacher: dict | None) -> dict:
    """The `lineage` of a hybrid made from the hybrid `src`; `teacher` is its `checkpoint_facts`, None when the
    source's own attention initialised the new mixers."""
    own_record = src / "surgery.json"
    return {
        "source_hybrid": {
            "path": str(src.resolve()),
            "layer_types": list(source_config.layer_types),
            "surgery": read_json(own_record, "surgery record") if own_record.is_file() else None,
        },
        "carried_over": list(source_config.mixer_layer_indices),
        "newly_replaced": [{"index": i, "reason": reasons.get(i)} for i in new],
        "mil_init_from": "teacher" if teacher is not None else "source",
        "teacher": teacher,
    }


def sambay_record(fields: dict) -> dict:
    """surgery.json's `layout` of a SambaY conversion, from the layout's config fields and GMU seed (`gmu_init`)."""
    from .seeds import get_gmu_seed

    return {
        "name": "sambay",
        **fields,
        "gmu_seed": get_gmu_seed(fields["gmu_init"]).description,
        "cross_attention": "self_attn.q_proj, self_attn.o_proj (and q_norm, biases) kept; k_proj, v_proj dropped",
    }


def surgery_record(source: dict, config, selection, mixer, seed, overrides, scores, dropped, ignored, copied,
                   tied_copies, lineage: dict | None = None, layout: dict | None = None) -> dict:
    """surgery.json; `source` is the source's `checkpoint_facts`, `lineage` the `lineage_record` of a hybrid source,
    `layout` the `sambay_record` of a layout conversion (None for a selection)."""
    carried = set(lineage["carried_over"]) if lineage else set()
    return {
        "suture_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "mixer": mixer,
        "seed": seed,
        "mixer_overrides": overrides,
        "selection": {"method": selection.method, **selection.detail},
        "layout": layout,
        "layers": [
            {"index": i, "type": kind, "replaced": not get_layer_kind(kind).is_attention, "carried_over": i in carried,
             "reason": f"carried over from {source['name']}" if i in carried else selection.reasons.get(i)}
            for i, kind in enumerate(config.layer_types)
        ],
        "scores": scores,
        "weight_transfer": get_layer_kind(mixer).transfer_description(),
        "fresh_init": get_layer_kind(mixer).fresh_init,
        "dropped_source_tensors": dropped,
        "ignored_source_tensors": ignored,
        "stored_tied_copies": tied_copies,
        "copied_files": copied,
        "lineage": lineage,
    }


def hub_name(config) -> str | None:
    name = getattr(config, "_name_or_path", "") or ""
    return name if is_hub_id(name) else None


def model_card(surgery: dict, title: str) -> str:
    """README.md for a hybrid checkpoint: hub metadata, the layer layout (and lineage) and how to load it."""
    source, lineage = surgery["source"], surgery.get("lineage")
    rows = surgery["layers"]
    n = len(rows)
    table = "\n".join(f"| {r['index']} | {r['type']} | {r['reason'] or ''} |" for r in rows)
    transfer = ", ".join(f"`{source}` -> `{target}`" for source, target in surgery["weight_transfer"].items())
    mixers = [r["type"] for r in rows if r["replaced"]]
    if surgery.get("layout"):
        made, untrained = _layout_paragraph(surgery, transfer), ("The new layers are initialised, not trained: "
                                                                 "distill the hybrid from its source before use.")
        base_models = [source["name"]]
    elif lineage is None:
        made = (f"An attention + Mamba hybrid of `{source['name']}` ({source['model_type']}, {n} layers) made with "
                f"[suture]({SUTURE_URL}) {surgery['suture_version']}: {len(mixers)} of {n} attention layers were "
                f"replaced by `{surgery['mixer']}` mixers initialised from the attention weights they replace "
                f"({transfer}; MLPs, norms and embeddings copied).")
        untrained = "The replaced layers are initialised, not trained: distill the hybrid from its source before use."
        base_models = [source["name"]]
    else:
        made, base_models = _lineage_paragraph(surgery, lineage, transfer)
        untrained = ("The newly replaced layers are initialised, not trained: distill the hybrid from the original "
                     "transformer before use.")
    body = "\n".join([
        made, "", untrained, "", f"Layer selection: `{surgery['selection']['method']}`.", "",
        "| layer | type | why replaced |", "|---|---|---|", table, "",
        load_section(title, hybrid=True), "",
        "`surgery.json` records the source checksums, the selection, the scores (if any) and every dropped tensor"
        + (", and the lineage: the source hybrid's layer types and own surgery.json, the layers carried over and "
           "newly replaced, and the teacher." if lineage else ".")])
    tags = list(dict.fromkeys(["suture", "hybrid", "mamba", surgery["mixer"], *mixers,
                               *(["sambay"] if surgery.get("layout") else [])]))
    return render_card(title, body, tags=tags, base_model=base_models)


def _layout_paragraph(surgery: dict, transfer: str) -> str:
    """The card's first paragraph for a SambaY conversion."""
    source, layout = surgery["source"], surgery["layout"]
    n = len(surgery["layers"])
    opening = (f"A SambaY hybrid of `{source['name']}` ({source['model_type']}, {n} layers) made with "
               f"[suture]({SUTURE_URL}) {surgery['suture_version']}: a self-decoder of `{surgery['mixer']}` layers "
               f"(MIL-initialised: {transfer}) and sliding-window attention (window {layout['sliding_window']}, "
               "weights kept), ")
    if layout["memory_layer"] is None:  # 4 layers: no cross-decoder
        return (opening + f"then one more `{surgery['mixer']}` layer and one full-attention layer, kept; a 4-layer "
                "model has no room for the cross-decoder. MLPs, norms and embeddings are copied.")
    return (opening + f"the memory layer {layout['memory_layer']}, the full-attention KV source "
            f"{layout['kv_source_layer']}, and a cross-decoder of GMU layers ({layout['gmu_init']} seed: "
            f"{layout['gmu_seed']}) and cross-attention layers ({layout['cross_attention']}). MLPs, norms and "
            "embeddings are copied.")


def _lineage_paragraph(surgery: dict, lineage: dict, transfer: str) -> tuple[str, list[str | None]]:
    """The card's first paragraph for a hybrid made from a hybrid, and the models it derives from."""
    source, teacher = surgery["source"], lineage["teacher"]
    original = ((lineage["source_hybrid"]["surgery"] or {}).get("source") or {}).get("name")
    new = [entry["index"] for entry in lineage["newly_replaced"]]
    init = (f"the attention of `{teacher['name']}` (the original transformer) at those layers" if teacher
            else "the source hybrid's own attention at those layers")
    made = (f"An attention + Mamba hybrid made with [suture]({SUTURE_URL}) {surgery['suture_version']} from the "
            f"suture hybrid `{source['name']}`" + (f" (itself made from `{original}`)" if original else "")
            + f": its {len(lineage['carried_over'])} mixer layers {lineage['carried_over']}, MLPs, norms, embeddings "
            f"and kept attention were carried over bit for bit, and {len(new)} more attention layers {new} were "
            f"replaced by `{surgery['mixer']}` mixers initialised from {init} ({transfer}).")
    return made, list(dict.fromkeys([source["name"], teacher["name"] if teacher else None, original]))
