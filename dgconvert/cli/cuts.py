"""``dgconvert cuts``: list a backbone's single-tensor cut points with FLOPs share and shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dgconvert.cli.common import friendly_errors, parse_ints, parse_json_object, write_json


@click.command("cuts", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--arch", default=None,
              help="Architecture 'module:callable' for a plain state_dict (e.g. "
                   "torchvision.models:resnet18).")
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments for --arch / MODEL.")
@click.option("--input-shape", default=None,
              help="One sample's shape C,H,W, e.g. 3,224,224 (default: what the checkpoint "
                   "records).")
@click.option("--all", "all_modules", is_flag=True,
              help="Also list torch's own layers inside blocks (Conv2d, ReLU, …).")
@click.option("--auto", "auto_k", type=int, default=None,
              help="Also show the K cut points `--cut auto:K` would pick.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow a whole pickled model (runs code from the file: trusted files only).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the list as JSON.")
@friendly_errors
def cuts_cmd(
    model: str, arch: str | None, arch_kwargs: str | None, input_shape: str | None,
    all_modules: bool, auto_k: int | None, trust_pickle: bool, json_path: Path | None,
) -> None:  # fmt: skip
    """List where MODEL can be cut: every module whose output is the only tensor crossing it,
    in execution order, with the cumulative FLOPs share up to it and its output shape.

    MODEL is a checkpoint (dgconvert backbone or gated checkpoint, a state_dict with --arch)
    or an importable constructor 'module:callable' (random weights), e.g.
    torchvision.models:vit_b_16.
    """
    import torch

    from dgconvert.gating.checkpoint import build_arch, load_backbone
    from dgconvert.gating.cut import auto_cuts, cut_points
    from dgconvert.gating.network import detect_layout

    kwargs = parse_json_object(arch_kwargs, "--arch-kwargs")
    recorded: list[int] | None = None
    if Path(model).is_file():
        net, info = load_backbone(model, arch=arch, arch_kwargs=kwargs, trust_pickle=trust_pickle)
        recorded = (info.get("input") or {}).get("shape")
    elif ":" in model:
        net = build_arch({"factory": model, "kwargs": kwargs or {}}).eval()
    else:
        raise click.BadParameter(
            f"{model!r} is neither a file nor a 'module:callable' constructor; expected e.g. "
            "backbone.pt or torchvision.models:resnet18", param_hint="MODEL")  # fmt: skip
    shape = parse_ints(input_shape, "--input-shape") if input_shape else recorded
    if not shape:
        raise click.UsageError(
            "the input shape is unknown (the model does not record it); expected "
            "--input-shape C,H,W, e.g. --input-shape 3,224,224"
        )
    points, total = cut_points(net, torch.zeros(1, *shape), all_modules=all_modules)
    rows: list[dict[str, Any]] = []
    for p in points:
        layout = detect_layout([1, *(p.shape or [])], None, p.name) if p.shape else "?"
        rows.append({"name": p.name, "aliases": p.aliases, "share": p.share, "flops": p.flops,
                     "shape": p.shape, "layout": layout})  # fmt: skip
    width = max([len(r["name"]) for r in rows] + [8])
    click.echo(f"{type(net).__name__}, input {list(shape)}: {total / 1e6:.2f} MFLOPs per sample; "
               f"{len(rows)} single-tensor cut points")  # fmt: skip
    click.echo(f"{'cut point':<{width}}  {'FLOPs share':>11}  {'MFLOPs':>9}  {'layout':<7} shape")
    for r in rows:
        alias = f"  (= {', '.join(r['aliases'])})" if r["aliases"] else ""
        click.echo(f"{r['name']:<{width}}  {100 * r['share']:>10.1f}%  {r['flops'] / 1e6:>9.2f}  "
                   f"{r['layout']:<7} {r['shape']}{alias}")  # fmt: skip
    picked = None
    if auto_k:
        picked = auto_cuts(net, auto_k, torch.zeros(1, *shape))
        click.echo(f"--cut auto:{auto_k} picks: {','.join(picked)}")
    if json_path is not None:
        write_json(json_path, {"model": model, "input_shape": list(shape), "flops": total,
                               "cut_points": rows, "auto": picked})  # fmt: skip
