"""``dgconvert export``: gated checkpoint (or a multi-exit model with ``--exits``) ->
verified staged ONNX bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dgconvert.cli.common import (
    friendly_errors,
    parse_ints,
    parse_json_object,
    prune_multiple_option,
)
from dgconvert.core.gates import DEFAULT_EXIT_SCORE, EXIT_SCORES


@click.command("export")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Bundle directory to write (default: MODEL with suffix .dg).")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow a whole pickled GatedNetwork (runs code from the file: trusted files only).")
@click.option("--data", default=None,
              help="Real inputs to verify against PyTorch, e.g. fashion-mnist:test (default: random inputs).")
@click.option("--verify-samples", type=int, default=256, show_default=True,
              help="How many samples of --data to verify on.")
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--no-verify", is_flag=True, help="Skip the comparison with PyTorch (not recommended).")
@click.option("--exits", default=None,
              help="MODEL is a multi-exit model trained elsewhere (forward returns one entry per "
                   "exit, the final classifier's last): comma-separated names of its exit-head "
                   "modules in execution order, e.g. exit1,exit2.")
@click.option("--score", type=click.Choice(EXIT_SCORES), default=None,
              help=f"With --exits: the exit score rule (default {DEFAULT_EXIT_SCORE}; confidence = "
                   "the exit's own (logits, confidence) output, EENets).")
@click.option("--arch", default=None,
              help="With --exits and a state_dict MODEL: the architecture 'module:callable'.")
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments for --arch.")
@click.option("--input-shape", default=None,
              help="With --exits: one input's shape C,H,W (default: the checkpoint's, else "
                   "--data's, e.g. 1,28,28).")
@click.option("--normalization", default=None,
              help='With --exits: uint8 -> float normalization as JSON, e.g. \'{"scale": 255, '
                   '"mean": [0.286], "std": [0.353]}\' (default: the checkpoint\'s, else none).')
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
              show_default=True,
              help="ONNX exporter: auto = torch.export-based, falling back to TorchScript-based "
                   "for a stage it fails on or exports wrongly.")
@click.option("--allow-near-chance", is_flag=True,
              help="Export even when the backbone scores near chance on labelled --data.")
@click.option("--prune-data", default=None,
              help="GaterNet only: calibration images; filters whose gate is off for every one "
                   "of them are removed from the graphs, e.g. 'fashion-mnist:train[50000:]'.")
@prune_multiple_option
@friendly_errors
def export_cmd(
    model: Path, output: Path | None, force: bool, trust_pickle: bool, data: str | None,
    verify_samples: int, atol: float, rtol: float, no_verify: bool, exits: str | None,
    score: str | None, arch: str | None, arch_kwargs: str | None, input_shape: str | None,
    normalization: str | None, exporter: str, allow_near_chance: bool, prune_data: str | None,
    prune_multiple: int,
) -> None:
    """Export a gated network (MODEL.pt from `dgconvert gates fit` or dgconvert.save), or with
    --exits a multi-exit model as it is, to a bundle: one ONNX graph per stage with its gate
    fused, plus full.onnx, verified."""
    import torch

    import dgconvert as dg
    from dgconvert.core.bundle import file_sha256
    from dgconvert.core.manifest import portable
    from dgconvert.core.preprocess import normalize

    multi = {"--score": score, "--arch": arch, "--arch-kwargs": arch_kwargs,
             "--input-shape": input_shape, "--normalization": normalization}
    if exits is None:
        given = [k for k, v in multi.items() if v is not None]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} only apply to a multi-exit model; expected --exits "
                "NAME,NAME,... too. Fix: add --exits, or drop those options for a dgconvert "
                "gated checkpoint."
            )
        net = dg.load(model, trust_pickle=trust_pickle)
    else:
        net = _multi_exit_net(model, exits, score or DEFAULT_EXIT_SCORE, arch, arch_kwargs,
                              input_shape, normalization, data, trust_pickle)
    out = output or model.with_suffix(".dg")
    prune_images = None
    if prune_data is not None:
        from dgconvert.gating.families import family, family_names, family_of

        if not family_of(net).prunes:
            pruning = ", ".join(n for n in family_names() if family(n).prunes)
            raise click.UsageError(
                f"--prune-data applies to a checkpoint of a family that prunes ({pruning}: "
                f"`dgconvert gates gaternet`); {model.name} is a {net.family} network (early "
                "exits only). Fix: drop --prune-data."
            )
        prune_images = dg.load_dataset(prune_data).images
    verify_input, labels = None, None
    if data:
        ds = dg.load_dataset(data, num_classes=net.num_classes)
        imgs = ds.images[:verify_samples]
        x = normalize(imgs, net.normalization) if imgs.dtype.kind == "u" else imgs
        verify_input = torch.from_numpy(x.astype("float32"))
        if ds.labels is not None and not allow_near_chance:
            labels = ds.labels[:verify_samples]

    def accuracy(acc: float) -> None:
        click.echo(f"backbone accuracy on {data}: {100 * acc:.2f} % ({len(verify_input)} samples)")  # type: ignore[arg-type]

    def show(report: object) -> None:
        worst = ", ".join(f"{k} {v:.2g}" for k, v in report.max_abs.items())  # type: ignore[attr-defined]
        click.echo(f"verified {report.checks} outputs against PyTorch; max abs diff: {worst}")  # type: ignore[attr-defined]

    bundle = dg.export(
        net, out, verify_input=verify_input, verify_labels=labels, on_accuracy=accuracy,
        data_name=f"{data} (first {0 if verify_input is None else len(verify_input)})",
        force=force, verify=not no_verify,
        atol=atol, rtol=rtol, progress=True, on_report=show, exporter=exporter,
        prune_images=prune_images, prune_source=portable(prune_data) if prune_data else "",
        prune_multiple=prune_multiple,
        source={"checkpoint": model.name, "checkpoint_sha256": file_sha256(model),
                "verified_on": portable(data) if data else "random inputs"},
    )
    click.echo(f"wrote {bundle.path} ({bundle.num_stages} stages, {bundle.num_gates} gates)")
    gn = bundle.manifest.gaternet
    if gn is not None and gn.samples:
        click.echo(f"GaterNet: {100 * gn.pruned_share:.1f} % of the gated filters pruned "
                   f"(always off on {gn.samples} samples); {gn.flops_masked / 1e6:.2f} -> "
                   f"{gn.flops_pruned / 1e6:.2f} MFLOPs/image")


def _multi_exit_net(
    model: Path, exits: str, score: str, arch: str | None, arch_kwargs: str | None,
    input_shape: str | None, normalization: str | None, data: str | None, trust_pickle: bool,
) -> Any:
    """Load a multi-exit model (whole pickle or state_dict + --arch) and convert it."""
    import dgconvert as dg
    from dgconvert.gating.families import family

    names = [e.strip() for e in exits.split(",") if e.strip()]
    if not names:
        raise click.BadParameter(f"expected comma-separated module names, got {exits!r}",
                                 param_hint="--exits")
    kwargs = parse_json_object(arch_kwargs, "--arch-kwargs")
    if kwargs is not None and not arch:
        raise click.BadParameter("--arch-kwargs needs --arch", param_hint="--arch-kwargs")
    module, info = dg.load_backbone(model, arch=arch, arch_kwargs=kwargs,
                                    trust_pickle=trust_pickle)
    recorded = info.get("input") or {}
    if input_shape:
        shape = parse_ints(input_shape, "--input-shape")
    elif recorded.get("shape"):
        shape = list(recorded["shape"])
    elif data:
        ds = dg.load_dataset(data)
        shape = list(ds.sample_shape) if len(ds.sample_shape) != 2 else [1, *ds.sample_shape]
    else:
        raise click.UsageError(
            f"the input shape of {model.name} is unknown; expected --input-shape C,H,W (e.g. "
            "1,28,28) or --data with real inputs."
        )
    norm = parse_json_object(normalization, "--normalization") or recorded.get("normalization")
    fam = family("multi-exit")
    cfg = fam.Config(exits=names, score=score, input_shape=shape, normalization=norm,
                     classes=info.get("classes"), arch=info.get("arch"))
    return fam.build(cfg, model=module)
