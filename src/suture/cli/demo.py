"""`suture demo [OUT]`: hybridize a teacher, save, reload through AutoModelForCausalLM, generate and compare."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .errors import cli_errors, console


def demo_command(
    out: Path = typer.Argument(Path("demo-output"), help="Directory to write the teacher and hybrid checkpoints."),
    mixer: str = typer.Option("mamba", help="Mixer for replaced layers: mamba (Mamba-1, M1 style) or mamba2."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    contexts: list[int] = typer.Option([128, 512, 2048], "--context", help="Context lengths for decode timing."),
    teacher: Path = typer.Option(None, help="Teacher checkpoint directory (default: a random tiny Llama)."),
    eval_n: int = typer.Option(100, help="Workload test problems per level (workload teachers only)."),
    distill: str = typer.Option(None, "--distill", help="Then distil the hybrid on the workload with this recipe "
                                "(a preset such as default, or a YAML file) and compare it too (workload teachers "
                                "only)."),
    distill_budget: float = typer.Option(None, "--distill-budget", min=0, help="Multiply the distillation "
                                         "recipe's step counts by this factor."),
    ratio: float = typer.Option(None, "--ratio", min=0, help="Replace this fraction of the layers instead of the m1 "
                                "layout: those --probe ranks most replaceable on the workload (workload teachers), "
                                "else evenly spaced."),
    probe: str = typer.Option("mmr", "--probe", help="With --ratio: the importance probe that ranks the layers "
                              "(mmr, loo, mil, ...: see `suture importance`)."),
) -> None:
    """Hybridize a teacher with the m1 preset layout (attention kept at every 5th layer from layer 3 plus the last:
    layers 3 and 7 of the default 8-layer teacher) or a --ratio of its layers, save, reload through
    AutoModelForCausalLM, generate and compare."""
    from ..demo import run_demo
    from ..layer_kinds import mixer_kind_names

    if mixer not in mixer_kind_names():
        raise typer.BadParameter(f"--mixer must be one of {', '.join(mixer_kind_names())}, got {mixer!r}.")
    with (cli_errors(output=out, inputs=[teacher] if teacher else []),
          console.status("building teacher and hybrid, saving, reloading, generating ...") as status):

        def on_log(record: dict) -> None:
            if "loss" in record:
                status.update(f"distilling: stage {record['index']} ({record['stage']}), step {record['step']} / "
                              f"{record['steps']}, loss {record['loss']:.4f}")

        def on_progress(phase: str, done: int, total: int) -> None:
            status.update(f"ranking the layers with the {probe} probe: {done} / {total}")

        report = run_demo(out, mixer=mixer, force=force, contexts=tuple(contexts), teacher=teacher, eval_n=eval_n,
                          preset=None if ratio is not None else "m1", ratio=ratio, probe=probe,
                          distill_recipe=distill, distill_budget=distill_budget, on_log=on_log,
                          on_progress=on_progress)

    layers = Table(title=f"hybrid layers ({out}/hybrid)")
    layers.add_column("layer", justify="right")
    layers.add_column("type")
    for i, kind in enumerate(report.layer_types):
        layers.add_row(str(i), kind)
    console.print(layers)
    layout = report.layout
    console.print(f"layout: {layout['description']}; attention kept at layers {layout['kept_attention']}")

    distilled = "distilled" in report.workload
    summary = Table(title="teacher vs hybrid" + (" vs distilled hybrid" if distilled else ""))
    summary.add_column("")
    summary.add_column("teacher", justify="right")
    summary.add_column("hybrid", justify="right")
    if distilled:
        summary.add_column("distilled", justify="right")
    same = [""] if distilled else []  # the distilled hybrid has the hybrid's architecture
    summary.add_row("parameters", f"{report.teacher_params:,}", f"{report.hybrid_params:,}", *same)
    kv = report.kv_bytes_per_token
    summary.add_row("KV cache bytes / token", f"{kv['teacher']:,}", f"{kv['hybrid']:,}", *same)
    summary.add_row("fixed SSM state bytes / sequence", "0", f"{report.ssm_state_bytes_per_sequence:,}", *same)
    for ctx in report.decode_ms_per_token["teacher"]:
        summary.add_row(
            f"decode ms/token @ {ctx} context",
            f"{report.decode_ms_per_token['teacher'][ctx]:.2f}",
            f"{report.decode_ms_per_token['hybrid'][ctx]:.2f}", *same,
        )
    if report.workload:
        for level in report.workload["teacher"]["levels"]:
            cells = [report.workload[name]["levels"][level] for name in report.workload]
            summary.add_row(f"workload {level}: accuracy / length",
                            *(f"{c['accuracy']:.2f} / {c['mean_response_tokens']:.0f}" for c in cells))
    console.print(summary)
    if distilled:
        stages = report.distillation["stages"]
        console.print(f"distilled with recipe {report.distillation['recipe']!r}: " + ", ".join(
            f"{s['stage']} {s['steps']} steps" for s in stages) + f" in {sum(s['seconds'] for s in stages):.0f} s "
            f"of training ({out}/distilled)")
    elif report.workload:
        console.print("The hybrid is MIL-initialised but not yet distilled, so its workload accuracy starts low "
                      "(--distill default trains it back).")
    console.print(f"reloaded through AutoModelForCausalLM: max |logit diff| = {report.reload_max_abs_diff:.1e}")
    console.print(f"teacher: {report.teacher}")
    if report.generated_teacher:
        console.print(f"teacher greedy output (batch of 2, left padded): {report.generated_teacher}")
    console.print(f"hybrid greedy output{'' if report.generated_teacher else ' (batch of 2, left padded)'}: "
                  f"{report.generated}")
    if report.generated_distilled:
        console.print(f"distilled hybrid, same prompts: {report.generated_distilled}")
    written = [f"{out}/teacher", f"{out}/hybrid"] + ([f"{out}/distilled"] if distilled else [])
    console.print(f"wrote {', '.join(written)} and {out}/demo.json")
