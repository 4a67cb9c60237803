"""``fastmim train`` and ``fastmim eval`` (listed in ``fastmim.cli.SUBCOMMANDS``): their
arguments, and the calls into :func:`fastmim.train.loop.train` and
:func:`fastmim.train.evaluate.evaluate_checkpoint`.

Heavy imports (torch, the models) happen inside the ``run_*`` functions so ``fastmim --help``
stays fast. Every expected failure becomes a one-line :class:`fastmim.errors.CLIError`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastmim.errors import CLIError

_S = argparse.SUPPRESS  # options not given stay absent: a resumed run knows what was set explicitly


def _model_arg(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from fastmim.train.config import DEFAULT_MAX_STEPS, TrainConfig

    d = TrainConfig()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("examples:\n"
                "  fastmim train --method mae --output runs/demo            # CPU demo on the bundled data\n"
                "  fastmim train --method supmim --data ~/imagenet --model vit_base --epochs 100 --output runs/sup\n"
                "  torchrun --nproc_per_node=8 -m fastmim train --method mae --data ~/imagenet ...\n"
                "  fastmim train --output runs/demo --resume                 # continue an interrupted run")
    g = p.add_argument_group("what to train")
    g.add_argument("--method", default=_S, help=f"mae | supmim | supmae | cmae | lut (default: {d.method})")
    g.add_argument("--model", default=_S, metavar="PRESET", help=f"model size preset (default: {d.model})")
    g.add_argument("--data", default=_S, metavar="PATH|default",
                   help="an image folder (class sub-folders; or train/ and val/ each with them) or 'default', "
                        "the bundled Animal-MNIST (default: default)")
    g.add_argument("--output", default=_S, metavar="DIR", help="run folder (default: runs/<method>)")
    g.add_argument("--resume", action="store_true", default=_S, help="continue the run in --output exactly")
    g.add_argument("--overwrite", action="store_true", default=_S,
                   help="replace the run already in --output: its checkpoint, state, metrics, figures and eval "
                        "log are removed first (other files stay); without it such a folder is refused")
    g.add_argument("--init-from-official", default=_S, metavar="PATH",
                   help="start a new MAE run from an official main_pretrain.py checkpoint-*.pth (its weights, "
                        "AdamW state and step)")
    g.add_argument("--model-arg", action="append", type=_model_arg, default=_S, metavar="KEY=VALUE",
                   help="extra model constructor argument (JSON value), repeatable, e.g. depth=2")
    g = p.add_argument_group("schedule and optimizer (MAE recipe)")
    g.add_argument("--max-steps", type=int, default=_S, metavar="N",
                   help=f"optimizer steps (default: {DEFAULT_MAX_STEPS}, or from --epochs)")
    g.add_argument("--epochs", type=float, default=_S, help="passes over the train split (instead of --max-steps)")
    g.add_argument("--batch-size", type=int, default=_S, help=f"images per process per micro-step "
                                                              f"(default: {d.batch_size})")
    g.add_argument("--accum-steps", "--grad-accum", dest="accum_steps", type=int, default=_S,
                   help="gradient accumulation micro-steps per optimizer step (default: 1)")
    g.add_argument("--blr", type=float, default=_S,
                   help=f"base lr; lr = blr * global batch / 256 (default: {d.blr:g}, the official MAE script's "
                        f"default; its 800-epoch batch-4096 runs use 1.5e-4)")
    g.add_argument("--lr", type=float, default=_S, help="absolute lr (overrides --blr)")
    g.add_argument("--min-lr", type=float, default=_S, help="lr at the end of the cosine (default: 0)")
    g.add_argument("--warmup-steps", type=int, default=_S, help="linear warmup steps (default: 5%% of the run)")
    g.add_argument("--weight-decay", type=float, default=_S, help=f"AdamW weight decay (default: {d.weight_decay})")
    g.add_argument("--clip-grad", type=float, default=_S, help="clip the gradient norm (default: off)")
    g.add_argument("--mask-ratio", type=float, default=_S,
                   help="masked fraction in [0, 1) (default: the method's: 0.5 for supmim, 0.75 for the others)")
    g.add_argument("--mask-type", "--masking", dest="masking", default=_S, metavar="random|block|grid|official",
                   help="where the masks come from: random (the fused counter-based masking), block (BEiT's "
                        "rectangles), grid (one visible patch per 2x2 cell; mask ratio 0.75), official (torch.rand "
                        "and argsort, as the official MAE) (default: random)")
    g.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=_S,
                   help="reconstruct per-patch normalised pixels, or plain pixels with --no-norm-pix-loss "
                        "(default: the method's: plain for mae, as the official model; normalised for supmim, "
                        "supmae, cmae and lut)")
    g.add_argument("--seed", type=int, default=_S, help="seed of init, data order, augmentation, masks (default: 0)")
    g = p.add_argument_group("data")
    g.add_argument("--image-size", type=int, default=_S, help="input size in pixels (default: the preset's)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=_S, help="image-folder channels (default: 3)")
    g.add_argument("--num-workers", type=int, default=_S, help="DataLoader workers (default: 0 on CPU, 8 per GPU)")
    g.add_argument("--on-corrupt", choices=("skip", "error"), default=_S,
                   help="corrupt image files: skip with a warning, or stop (default: skip)")
    g.add_argument("--input", choices=("fastmim", "torchvision"), default=_S,
                   help="image folders: fastmim = workers only decode to uint8, the crops, resizing (bicubic), "
                        "flips and normalisation run on the training device in one op; torchvision = the float "
                        "augmentations in the workers (default: fastmim; LUT's second view always takes the latter)")
    g.add_argument("--decode", choices=("cpu", "gpu"), default=_S,
                   help="fastmim input: decode in the workers (libjpeg-turbo / Pillow) or JPEGs on the GPU with "
                        "nvJPEG (needs CUDA) (default: cpu)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=_S, help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=_S,
                   help="auto = bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--compile", nargs="?", const="inductor", default=_S, metavar="BACKEND",
                   help="torch.compile the model (backend default: inductor)")
    g.add_argument("--fsdp", action="store_true", default=_S,
                   help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP")
    g.add_argument("--log-every", type=int, default=_S, help=f"steps between metric records (default: {d.log_every})")
    g.add_argument("--ckpt-every", type=int, default=_S, help="steps between checkpoints (default: end only)")
    g.add_argument("--on-nonfinite", choices=("skip", "rollback", "stop"), default=_S,
                   help="a step whose loss or gradient is nan/inf is skipped (no update); after --max-skips such "
                        "steps in a row: skip = go on (a run that ends so fails), rollback = reload the last "
                        "checkpoint and go on with a fresh data order (needs --ckpt-every), stop = end with an "
                        f"error (default: {d.on_nonfinite})")
    g.add_argument("--max-skips", type=int, default=_S, metavar="N",
                   help=f"skipped steps in a row that count as divergence, checked at each metrics record "
                        f"(default: {d.max_skips})")
    g.add_argument("--stop-after", type=int, default=_S, metavar="N",
                   help="stop this invocation after N steps (the schedule still spans --max-steps); --resume goes on")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=_S, help="no progress bar")
    g.add_argument("--no-figures", dest="figures", action="store_false", default=_S,
                   help="skip the loss and reconstruction PNGs")


def _one_line(exc: BaseException) -> str:
    """A one-line message; exceptions re-raised from DataLoader workers carry a traceback."""
    text = str(exc).strip()
    if "Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(exc).__name__


def _is_data_worker_error(exc: RuntimeError) -> bool:
    """A DataLoader worker's failure re-raised in the main process (e.g. a corrupt image)."""
    return "DataLoader worker" in str(exc) or "DataError" in str(exc)


@contextlib.contextmanager
def _user_errors_as_one_line() -> Iterator[None]:
    """Errors caused by the command's input become a one-line :class:`CLIError`; bugs keep their traceback.

    ValueError covers a model's own argument validation (e.g. LUT needs --mask-ratio >= 0.5)."""
    from fastmim.data import DataError
    from fastmim.train.checkpoint import CheckpointError
    from fastmim.train.config import TrainError

    try:
        yield
    except (TrainError, DataError, CheckpointError, ValueError) as exc:
        raise CLIError(_one_line(exc)) from None
    except RuntimeError as exc:
        if _is_data_worker_error(exc):
            raise CLIError(_one_line(exc)) from None
        raise


@contextlib.contextmanager
def _warnings_as_one_line() -> Iterator[None]:
    """Every warning shown once, as ``fastmim: warning: <message>`` (e.g. a skipped corrupt image,
    a checkpoint without checksums)."""
    format_warning = warnings.formatwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = lambda message, category, *a, **k: f"fastmim: warning: {message}\n"
            yield
    finally:
        warnings.formatwarning = format_warning


def run_train(args: argparse.Namespace) -> int:
    from fastmim.train.config import TrainConfig
    from fastmim.train.loop import train

    given = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    if "model_arg" in given:
        given["model_overrides"] = dict(given.pop("model_arg"))
    given.setdefault("output", f"runs/{given.get('method', TrainConfig.method)}")
    explicit = set(given)
    cfg = TrainConfig(**given)
    with _user_errors_as_one_line(), _warnings_as_one_line():
        result = train(cfg, explicit=explicit)
    return 0 if result.finished or cfg.stop_after is not None else 1


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint.safetensors written by fastmim train, or its run folder")
    p.add_argument("--protocol", default="knn", metavar="knn|linear|classifier|finetune|all",
                   help="k-NN (cosine, temperature-weighted); linear probe on frozen features; the checkpoint's "
                        "own classifier (supervised + MIM); fine-tuning the whole encoder with labels; all = knn, "
                        "linear and classifier where there is one (default: knn)")
    p.add_argument("--data", default=None, metavar="PATH|default",
                   help="dataset (default: the one the checkpoint was trained on); its held-out split is scored")
    p.add_argument("--image-size", type=int, default=None, metavar="PIXELS",
                   help="evaluate at this input size, a multiple of the patch size: the model's position "
                        "embeddings are resampled (bicubic) for it (default: the training size)")
    p.add_argument("--k", type=int, default=20, help="neighbours for k-NN (default: 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature (default: 0.07)")
    p.add_argument("--pool", choices=("cls", "mean", "avg"), default=None,
                   help="feature pooling (default: the model's); fine-tuning with cls takes the cls token after the "
                        "final norm, with avg MAE's global pool (mean of the last block's patch tokens, a new "
                        "fc_norm)")
    p.add_argument("--probe-epochs", type=int, default=90, help="linear-probe epochs (default: 90)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning epochs (default: 5)")
    p.add_argument("--finetune-blr", type=float, default=5e-4,
                   help="fine-tuning base lr, scaled by batch/256 (default: 5e-4)")
    p.add_argument("--finetune-batch-size", type=int, default=64, help="fine-tuning batch (default: 64)")
    p.add_argument("--layer-decay", type=float, default=1.0,
                   help="fine-tuning layer-wise lr decay: block i's lr is scaled by decay ** (depth - i) (default: 1, "
                        "off; MAE: 0.65 for ViT-B, 0.75 for ViT-L/H)")
    p.add_argument("--mixup", type=float, default=0.0, help="fine-tuning mixup alpha (default: 0, off; MAE: 0.8)")
    p.add_argument("--cutmix", type=float, default=0.0, help="fine-tuning cutmix alpha (default: 0, off; MAE: 1.0)")
    p.add_argument("--smoothing", type=float, default=0.1, help="fine-tuning label smoothing (default: 0.1)")
    p.add_argument("--drop-path", type=float, default=0.0,
                   help="fine-tuning drop path rate of the last block (default: 0; MAE: 0.1 for ViT-B)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="use N train images (stratified) as k-NN memory / probe data (default: all)")
    p.add_argument("--limit-test", type=int, default=None, metavar="N", help="score N held-out images (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch (default: 256)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0, help="linear-probe seed (default: 0)")
    p.add_argument("--log", default=None, metavar="FILE",
                   help="JSONL file the results are appended to (default: eval.jsonl beside the checkpoint)")


def _finetune_config(args: argparse.Namespace) -> Any:
    """The :class:`fastmim.train.finetuning.FinetuneConfig` of the command line (``ValueError`` if it cannot run)."""
    from fastmim.train.finetuning import FinetuneConfig

    return FinetuneConfig(epochs=args.finetune_epochs, batch_size=args.finetune_batch_size, blr=args.finetune_blr,
                          layer_decay=args.layer_decay, mixup=args.mixup, cutmix=args.cutmix,
                          label_smoothing=args.smoothing, drop_path=args.drop_path, pool=args.pool).validate()


def run_eval(args: argparse.Namespace) -> int:
    from fastmim.train.config import EVAL_LOG_NAME
    from fastmim.train.evaluate import evaluate_checkpoint

    protocols = {"knn": ["knn"], "linear": ["linear"], "classifier": ["classifier"], "finetune": ["finetune"],
                 "all": ["knn", "linear", "classifier"]}.get(args.protocol)
    if protocols is None:
        raise CLIError(f"unknown --protocol {args.protocol!r}; choose knn, linear, classifier, finetune or all")
    for name in ("k", "batch_size", "probe_epochs", "limit_train", "limit_test", "finetune_epochs",
                 "finetune_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_workers < 0:
        raise CLIError(f"--num-workers must be >= 0, got {args.num_workers}")
    for name in ("temperature", "finetune_blr"):
        if not getattr(args, name) > 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    recipe = None
    if "finetune" in protocols:
        try:
            recipe = _finetune_config(args)
        except ValueError as exc:
            raise CLIError(f"fine-tuning: {exc}") from None
    with _user_errors_as_one_line(), _warnings_as_one_line():
        ckpt, results = evaluate_checkpoint(
            args.checkpoint, protocols, data=args.data, image_size=args.image_size, device=args.device,
            pool=args.pool, k=args.k, temperature=args.temperature, probe_epochs=args.probe_epochs,
            finetune_config=recipe, limit_train=args.limit_train, limit_test=args.limit_test,
            batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed)
    log = Path(args.log) if args.log else ckpt.path.parent / EVAL_LOG_NAME
    try:
        with open(log, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    except OSError as exc:
        print(f"fastmim: warning: could not log to {log} ({exc.strerror or exc})", file=sys.stderr)
    return 0
