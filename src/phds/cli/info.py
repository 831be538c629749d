"""`phds info MODEL`: the MoE layout of a model and what each k costs."""

from __future__ import annotations

import typer
from rich.table import Table

from phds import dial
from phds.cli import app
from phds.cli.common import console, user_errors
from phds.loading import load, sidecar_of


@app.command()
def info(
    model: str = typer.Argument(..., help="Checkpoint directory, hub name, or tiny:<family> (e.g. tiny:olmoe)."),
    trust_remote_code: bool = typer.Option(False, help="Allow the checkpoint's own modelling code (off by default)."),
) -> None:
    """Print the MoE layout: layers, experts, k_pre, declared ks, shared experts, active parameters per k."""
    with user_errors():
        loaded, _ = load(model, device="cpu", tokenizer=False, trust_remote_code=trust_remote_code)
        layers = dial.moe_layers(loaded)
        sidecar = sidecar_of(loaded)

    total = sum(p.numel() for p in loaded.parameters())
    k_pre, num_experts = dial.k_pre(loaded), dial.num_experts(loaded)
    first = layers[0]  # renormalisation, shared experts and router: read from the first MoE layer
    console.print(f"[bold]{model}[/]  ({type(loaded).__name__})")
    console.print(
        f"MoE layers: {len(layers)} of {loaded.config.num_hidden_layers}  "
        f"(indices {[layer.index for layer in layers]})"
    )
    console.print(
        f"experts per layer: {num_experts}   k_pre: {k_pre}   "
        f"renormalises top-k: {'yes' if first.renormalizes else 'no'}   "
        f"shared experts: {len(first.shared_experts)} per layer   router: {type(first.router).__name__}"
    )
    if sidecar is not None:
        console.print(
            f"declared ks: {sidecar.ks}   default k: {sidecar.default_k}   method: {sidecar.method}"
            + (f"   anchor k: {sidecar.anchor_k}" if sidecar.anchor_k is not None else "")
        )
    else:
        console.print("declared ks: none (a plain MoE checkpoint; loads at k_pre)")
    console.print(f"current k: {dial.get_k(loaded)}   total parameters: {total:,}")

    table = Table(title="active parameters per token")
    table.add_column("k", justify="right")
    table.add_column("active params", justify="right")
    table.add_column("share of total", justify="right")
    table.add_column("vs k_pre", justify="right")
    at_pre = dial.active_parameters(loaded, k_pre)
    declared = set(sidecar.ks) if sidecar is not None else set()
    for k in range(1, num_experts + 1):
        if k > 2 * k_pre and k != num_experts:
            continue
        active = dial.active_parameters(loaded, k)
        marks = ("*" if k in declared else "") + (" (k_pre)" if k == k_pre else "")
        table.add_row(f"{k}{marks}", f"{active:,}", f"{active / total:.1%}", f"{active / at_pre:.2f}x")
    console.print(table)
    if declared:
        console.print("* declared in phds.json")
