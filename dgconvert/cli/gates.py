"""``dgconvert gates fit`` (attach and fit gate heads) and ``dgconvert train-reference``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from dgconvert.cli.common import (
    friendly_errors,
    parse_json_object,
    prune_multiple_option,
    write_json,
)
from dgconvert.core.gates import (
    DEFAULT_GATE,
    DEFAULT_HINGE,
    GATE_KINDS,
    GATE_TYPES,
    HINGES,
    LAYOUTS,
    POOLS,
    RATE_WEIGHTS,
    SCORE_CHOICES,
)


@click.group("gates", context_settings={"help_option_names": ["-h", "--help"]})
def gates_group() -> None:
    """Attach gate heads to a trained backbone and fit them."""


def parse_cuts(text: str) -> tuple[list[str] | int, list[float] | None]:
    """``layer1,layer2`` -> names; ``auto:3`` -> 3; ``auto:0.2,0.5`` -> (2, shares)."""
    text = text.strip()
    if text.startswith("auto:"):
        spec = text.removeprefix("auto:")
        try:
            if "," in spec or "." in spec:
                shares = [float(v) for v in spec.split(",") if v.strip()]
                return len(shares), shares
            k = int(spec)
        except ValueError as exc:
            raise click.BadParameter(
                f"expected auto:K (e.g. auto:3) or auto:SHARE,SHARE,... (e.g. auto:0.25,0.5), "
                f"got {text!r}", param_hint="--cut") from exc  # fmt: skip
        if k < 1:
            raise click.BadParameter(f"auto:K needs K >= 1, got {text!r}", param_hint="--cut")
        return k, None
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise click.BadParameter(
            f"expected comma-separated module names or auto:K, got {text!r}", param_hint="--cut"
        )
    return names, None


@gates_group.command("fit")
@click.argument("backbone", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", required=True, help="Labelled training data, e.g. fashion-mnist:train.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Gated checkpoint to write (weights-only, read by dgconvert.load / export).")
@click.option("--arch", default=None,
              help="Architecture 'module:callable' (needed for a plain state_dict; overrides the "
                   "one a dgconvert checkpoint records), e.g. dgconvert.zoo:resnet.")
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments for --arch.")
@click.option("--normalization", default=None,
              help='uint8 -> float input normalization as JSON, e.g. \'{"scale": 255, "mean": [0.286], '
                   '"std": [0.353]}\' (default: the one the checkpoint records; none for a state_dict).')
@click.option("--cut", "cuts", default="layer1,layer2,layer3", show_default=True,
              help="Comma-separated module names (nested ones too, e.g. features.3); a gate "
                   "follows each. auto:K picks K cut points at about equal FLOPs shares; "
                   "auto:0.2,0.5 at those cumulative FLOPs shares. `dgconvert cuts` lists them.")
@click.option("--layout", type=click.Choice(["auto", *LAYOUTS]),
              default="auto", show_default=True,
              help="Feature layout at the cuts: NCHW maps, NHWC maps (Swin), ViT token "
                   "sequences [N,T,D], vectors; auto detects it from the shapes.")
@click.option("--token-pool", type=click.Choice(POOLS["tokens"]), default=None,
              help="How gates pool token sequences: the class token or the mean of the tokens "
                   "(default: cls when the model has a class token).")
@click.option("--pool", "map_pool", type=click.Choice(POOLS["nchw"]), default="mean",
              show_default=True,
              help="How gates pool NCHW feature maps: the global mean, or the mean over each "
                   "cell of a 2x2 / 4x4 grid (G² values per channel: an early gate sees where "
                   "a pattern is, not only whether it is there).")
@click.option("--allow-near-chance", is_flag=True,
              help="Fit even when the backbone scores near chance on --data (normally a sign "
                   "of a wrong --normalization).")
@click.option("--gate", type=click.Choice(GATE_TYPES), default=DEFAULT_GATE, show_default=True,
              help="Gate head: " + ", ".join(f"{n} ({GATE_KINDS[n].loss})" for n in GATE_TYPES)
              + ".")
@click.option("--score", type=click.Choice(SCORE_CHOICES), default=None,
              help="Exit score (default: " + ", ".join(
                  f"{GATE_KINDS[n].default_score} for {n}" for n in GATE_TYPES) + ").")
@click.option("--hinge", type=click.Choice(HINGES), default=DEFAULT_HINGE,
              show_default=True, help="dgate loss: Crammer-Singer multi-class or one-vs-all (the paper).")
@click.option("--standardize/--no-standardize", default=True, show_default=True,
              help="Train on standardized pooled features (folded into the weights afterwards).")
@click.option("--paper", is_flag=True,
              help="The d-gate paper's exact setting: --gate dgate --score max --hinge ovr "
                   "--no-standardize.")
@click.option("--l2", type=float, default=None, help="L2 strength on the gate weights (default 1e-4).")
@click.option("--epochs", type=int, default=20, show_default=True, help="Epochs over the cached features.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=None, help="Peak learning rate (default 0.2; standardized features).")
@click.option("--holdout", type=float, default=0.1, show_default=True,
              help="Share of --data held out for the coverage/accuracy report and thresholds.")
@click.option("--joint", is_flag=True,
              help="Confidence gates: also fine-tune the backbone with L_v2 (slow: runs the backbone).")
@click.option("--joint-epochs", type=int, default=1, show_default=True)
@click.option("--joint-lr", type=float, default=1e-3, show_default=True,
              help="Learning rate of the joint fine-tuning.")
@click.option("--cost-weight", type=float, default=1.0, show_default=True,
              help="Confidence gates: lambda of L_v2 (weight of the FLOPs term).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--trust-pickle", is_flag=True,
              help="Allow a whole pickled model (runs code from the file: trusted files only).")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the fit report as JSON.")
@friendly_errors
def fit_cmd(
    backbone: Path, data: str, output: Path, arch: str | None, arch_kwargs: str | None,
    normalization: str | None, cuts: str, layout: str, token_pool: str | None, map_pool: str,
    allow_near_chance: bool, gate: str, score: str | None, hinge: str,
    standardize: bool, paper: bool, l2: float | None, epochs: int, batch_size: int, lr: float | None, holdout: float,
    joint: bool, joint_epochs: int, joint_lr: float, cost_weight: float, seed: int, trust_pickle: bool,
    force: bool, json_path: Path | None,
) -> None:  # fmt: skip
    """Fit a gate after each --cut of BACKBONE (frozen) on --data and write the gated model."""
    import dgconvert as dg
    from dgconvert.gating.families import family
    from dgconvert.gating.fit import PAPER_DGATE, FitConfig

    if output.exists() and not force:
        raise click.ClickException(
            f"{output} exists; expected a new file. Fix: pass --force to overwrite it, or "
            "choose another -o."
        )
    cut_list, shares = parse_cuts(cuts)
    options: dict[str, Any] = {"gate": gate, "score": score, "hinge": hinge, "standardize": standardize}
    if paper:
        options.update(PAPER_DGATE)
    kwargs = parse_json_object(arch_kwargs, "--arch-kwargs")
    arch_spec: str | dict[str, Any] | None = arch
    if arch and kwargs is not None:
        arch_spec = {"factory": arch, "kwargs": kwargs}
    elif kwargs is not None:
        raise click.BadParameter("--arch-kwargs needs --arch", param_hint="--arch-kwargs")
    result = family("cut-backbone").fit(FitConfig(
        backbone=backbone, data=data, cuts=cut_list, **options, shares=shares,
        layout=None if layout == "auto" else layout, token_pool=token_pool,
        pool=None if map_pool == "mean" else map_pool, check_accuracy=not allow_near_chance,
        l2=l2, epochs=epochs, batch_size=batch_size, lr=lr, holdout=holdout, joint=joint, joint_epochs=joint_epochs, joint_lr=joint_lr,
        cost_weight=cost_weight, arch=arch_spec, trust_pickle=trust_pickle, seed=seed,
        normalization=parse_json_object(normalization, "--normalization"), progress=True,
    ))  # fmt: skip
    click.echo(result.table())
    dg.save(result.net, output)
    if json_path is not None:
        write_json(json_path, result.as_dict())
    t = ", ".join(f"{v:.4g}" for v in result.thresholds)
    click.echo(f"cut points: {', '.join(result.net.cuts)}")
    click.echo(f"wrote {output} ({result.net.num_gates} {options['gate']} gates; thresholds {t}) "
               f"in {result.seconds:.1f} s")  # fmt: skip


@click.command("train-reference", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also copy the checkpoint here (it is always cached in $DGCONVERT_CACHE or ~/.cache/dgconvert).")
@click.option("--epochs", type=int, default=None, help="Override the recipe's epochs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data", default="fashion-mnist:train", show_default=True)
@click.option("--test-data", default="fashion-mnist:test", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads for training.")
@friendly_errors
def train_reference_cmd(
    output: Path | None, epochs: int | None, seed: int, data: str, test_data: str, threads: int
) -> None:
    """Train the reference ResNet backbone on Fashion-MNIST (cached; ~7 min on 2 CPU cores)."""
    from dataclasses import replace

    import torch

    from dgconvert import train

    recipe = replace(
        train.DEFAULT_RECIPE,
        seed=seed,
        epochs=train.DEFAULT_RECIPE.epochs if epochs is None else epochs,
    )
    path = train.reference_checkpoint(
        recipe=recipe, data=data, test_data=test_data, threads=threads
    )
    if output is not None:  # a copy of the cached checkpoint: reruns are instant
        import shutil

        from dgconvert.core.io import atomic_write

        path = atomic_write(output, lambda tmp: shutil.copyfile(path, tmp))
    metrics = torch.load(path, map_location="cpu", weights_only=True).get("metrics", {})
    acc = metrics.get("test_accuracy")
    click.echo(f"backbone: {path}" + (f" (test accuracy {100 * acc:.2f} %)" if acc is not None else ""))


@gates_group.command("gaternet")
@click.argument("backbone", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", required=True, help="Labelled training data, e.g. 'fashion-mnist:train[:50000]'.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="GaterNet checkpoint to write (weights-only; `dgconvert export` reads it).")
@click.option("--gated", default=None,
              help="Comma-separated modules whose output channels are gated (default: the first "
                   "convolution block of every residual block, e.g. layer1.0.conv1,...).")
@click.option("--gater", "gater_arch", default=None,
              help="Gater architecture 'module:callable' (a classifier; its output layer is "
                   "removed). Default: dgconvert.zoo:resnet with widths 8,16,16,32.")
@click.option("--gater-kwargs", default=None, help="JSON keyword arguments for --gater.")
@click.option("--bottleneck", type=int, default=8, show_default=True,
              help="Size of the gater's bottleneck layer (the paper uses 8 on CIFAR).")
@click.option("--sparsity", type=float, default=2.0, show_default=True,
              help="Weight lambda of the sparsity term (more: more filters off).")
@click.option("--target-rate", type=click.FloatRange(0.0, 1.0), default=0.7, show_default=True,
              help="Gate usage to keep, in (0, 1]: the sparsity term is lambda * max(0, usage "
                   "- target), usage = the weighted mean over gates of sqrt(on-rate in the "
                   "batch), which drives rarely-on gates to always off; lower: more filters "
                   "off. 0: no target, the paper's L1 term lambda * mean(gates).")
@click.option("--rate-weights", type=click.Choice(RATE_WEIGHTS), default="filters", show_default=True,
              help="--target-rate weighs each gate by the FLOPs that pruning its filter "
                   "saves (flops) or counts each filter the same (filters).")
@click.option("--off-below", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.5,
              show_default=True,
              help="After the joint training, gates on for at most this share of the training "
                   "images are forced off for every input (then pruned) before settling.")
@click.option("--gater-epochs", type=int, default=1, show_default=True,
              help="Epochs of gater pre-training as a classifier (0: random init).")
@click.option("--epochs", type=int, default=1, show_default=True,
              help="Epochs of joint gater + backbone training.")
@click.option("--settle-epochs", type=int, default=5, show_default=True,
              help="Epochs of backbone-only training with the gater frozen and its hard "
                   "inference gates, after the joint training.")
@click.option("--lr", type=float, default=0.02, show_default=True,
              help="Peak learning rate of the backbone (the gater's: 10x).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--holdout", type=float, default=0.1, show_default=True,
              help="Share of --data held out for the accuracies and gate kinds reported.")
@click.option("--no-augment", is_flag=True, help="Train without random crop + flip.")
@click.option("--arch", default=None, help="Backbone architecture 'module:callable' for a plain state_dict.")
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments for --arch.")
@click.option("--normalization", default=None,
              help="uint8 -> float input normalization as JSON (default: the checkpoint's).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--trust-pickle", is_flag=True, help="Allow a whole pickled backbone (trusted files only).")
@click.option("--allow-near-chance", is_flag=True, help="Fit even when the backbone scores near chance.")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the fit report as JSON.")
@friendly_errors
def gaternet_cmd(
    backbone: Path, data: str, output: Path, gated: str | None, gater_arch: str | None,
    gater_kwargs: str | None, bottleneck: int, sparsity: float, target_rate: float,
    rate_weights: str, off_below: float, gater_epochs: int, epochs: int,
    settle_epochs: int, lr: float, batch_size: int, holdout: float, no_augment: bool, arch: str | None,
    arch_kwargs: str | None, normalization: str | None, threads: int | None, seed: int,
    trust_pickle: bool, allow_near_chance: bool, force: bool, json_path: Path | None,
) -> None:  # fmt: skip
    """Attach a GaterNet gater to BACKBONE, gate its filters per sample and train gater and
    backbone jointly (Improved SemHash) on --data; write the GaterNet checkpoint."""
    import dgconvert as dg
    from dgconvert.gating.families import family
    from dgconvert.gating.gaternet import GaterNetFitConfig

    if output.exists() and not force:
        raise click.ClickException(
            f"{output} exists; expected a new file. Fix: pass --force to overwrite it, or "
            "choose another -o."
        )
    gk = parse_json_object(gater_kwargs, "--gater-kwargs")
    if gk is not None and not gater_arch:
        raise click.BadParameter("--gater-kwargs needs --gater", param_hint="--gater-kwargs")
    gater = {"factory": gater_arch, "kwargs": gk or {}} if gater_arch else None
    ak = parse_json_object(arch_kwargs, "--arch-kwargs")
    if ak is not None and not arch:
        raise click.BadParameter("--arch-kwargs needs --arch", param_hint="--arch-kwargs")
    arch_spec: str | dict[str, Any] | None = {"factory": arch, "kwargs": ak} if arch and ak else arch
    layers = [g.strip() for g in gated.split(",") if g.strip()] if gated else None
    result = family("gaternet").fit(GaterNetFitConfig(
        backbone=backbone, data=data, gated=layers, gater=gater, bottleneck=bottleneck, gater_epochs=gater_epochs,
        epochs=epochs, settle_epochs=settle_epochs, batch_size=batch_size, lr=lr,
        sparsity=sparsity, target_rate=target_rate or None, rate_weights=rate_weights,
        off_below=off_below, holdout=holdout,
        augment=not no_augment, arch=arch_spec, trust_pickle=trust_pickle,
        normalization=parse_json_object(normalization, "--normalization"), seed=seed,
        threads=threads, progress=True, check_accuracy=not allow_near_chance,
    ))  # fmt: skip
    click.echo(result.table())
    dg.save(result.net, output)
    if json_path is not None:
        write_json(json_path, result.as_dict())
    click.echo(f"wrote {output} (GaterNet: {result.net.num_filter_gates} gated filters in "
               f"{len(result.net.layers)} layers) in {result.seconds:.1f} s")


@gates_group.command("gaternet-exits")
@click.argument("gaternet", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", required=True,
              help="Labelled data to fit the d-gates on, e.g. 'fashion-mnist:train[:10000]'.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to write (GaterNet + d-gates have no checkpoint of their "
                   "own: the bundle is exported and verified here; `dgconvert calibrate` it next).")
@click.option("--prune-data", default=None,
              help="Calibration images: filters whose gate is off for every one are pruned "
                   "before the d-gates are attached, e.g. 'fashion-mnist:train[50000:]'.")
@prune_multiple_option
@click.option("--cut", "cuts", default="layer1,layer2,layer3", show_default=True,
              help="Comma-separated backbone modules (top-level blocks); a d-gate follows each.")
@click.option("--gate", type=click.Choice(GATE_TYPES), default=DEFAULT_GATE, show_default=True,
              help="Gate head type.")
@click.option("--epochs", type=int, default=20, show_default=True,
              help="Epochs over the cached features.")
@click.option("--holdout", type=float, default=0.1, show_default=True,
              help="Share of --data held out for the coverage/accuracy report and thresholds.")
@click.option("--verify-data", default=None,
              help="Inputs to verify the bundle against PyTorch on (default: random inputs).")
@click.option("--verify-samples", type=int, default=256, show_default=True)
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
              show_default=True, help="ONNX exporter, as in `dgconvert export`.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@friendly_errors
def gaternet_exits_cmd(
    gaternet: Path, data: str, output: Path, prune_data: str | None, prune_multiple: int,
    cuts: str, gate: str, epochs: int, holdout: float, verify_data: str | None,
    verify_samples: int, exporter: str, seed: int, force: bool,
) -> None:  # fmt: skip
    """Attach d-gates (early exits) after --cut blocks of a GaterNet checkpoint (pruned with
    --prune-data first), fit them on --data and export the verified bundle."""
    import torch

    import dgconvert as dg
    from dgconvert.core.preprocess import normalize
    from dgconvert.gating.families import family
    from dgconvert.gating.families.gaternet_exits import GaterNetExitsFitConfig

    if epochs < 1 or not 0.0 <= holdout < 1.0:
        raise click.BadParameter(f"--epochs {epochs}, --holdout {holdout}; expected epochs >= 1 "
                                 "and a holdout share in [0, 1)")
    if output.exists() and not force:
        raise click.ClickException(f"{output} exists; expected a new bundle. Fix: pass --force "
                                   "to replace it, or choose another -o.")
    net = dg.load(gaternet)
    if net.family != "gaternet":
        raise click.UsageError(f"{gaternet.name} is not a GaterNet checkpoint (`dgconvert gates "
                               "gaternet` writes one); for a backbone use `dgconvert gates fit`.")
    names, _ = parse_cuts(cuts)
    if not isinstance(names, list):
        raise click.BadParameter("expected module names, e.g. layer1,layer2", param_hint="--cut")
    result = family("gaternet-exits").fit(GaterNetExitsFitConfig(
        gaternet=net, data=data, cuts=names, gate=gate, epochs=epochs, holdout=holdout,
        seed=seed, prune_data=prune_data, prune_multiple=prune_multiple, progress=True))
    pruned = result.options["pruned"]
    if pruned is not None:
        click.echo(f"pruned {pruned['removed']} of {pruned['gates']} gated filters "
                   f"({pruned['off']} off for all of {prune_data}; layers keep multiples of "
                   f"{pruned['multiple']})")
    click.echo(result.table())
    verify = None
    if verify_data is not None:
        imgs = dg.load_dataset(verify_data).images[:verify_samples]
        verify = torch.from_numpy(normalize(imgs, net.normalization) if imgs.dtype.kind == "u"
                                  else imgs.astype("float32"))
    bundle = dg.export(result.net, output, verify_input=verify, force=force, progress=True,
                       exporter=exporter)
    click.echo(f"wrote {bundle.path} ({bundle.num_stages} stages, {bundle.num_gates} d-gates); "
               f"next: dgconvert calibrate {bundle.path} --data ...")
