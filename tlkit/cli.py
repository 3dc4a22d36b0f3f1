"""The `tlkit` command line: a thin click layer over the library.

Each command parses its flags, builds the library's config or arguments, makes one library
call and prints the result. tlkit's own errors (`TlkitError`) are shown as one clear line,
without a traceback. TensorFlow is imported only inside commands, so `--help` is instant.
"""

import csv
import functools
import json
import re
import sys

import click

from tlkit.runtime import TF_LOGS_ENV, __version__, import_tensorflow, show_tensorflow_logs


def _user_errors(command):
    """Runs a command with TensorFlow imported quietly (`tlkit.import_tensorflow`) and turns
    tlkit's errors into click errors, in the command's flags (`_as_flags`): one line, exit
    code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import_tensorflow()  # without its start-up log lines, unless --verbose
        from tlkit.errors import TlkitError

        try:
            return command(*args, **kwargs)
        except TlkitError as e:
            raise click.ClickException(_as_flags(str(e), click.get_current_context().command)) \
                from None
        except KeyboardInterrupt:
            raise click.ClickException("Interrupted.") from None

    return wrapper


def _as_flags(message, command):
    """A library message in the words of the command line: each Python argument `command`
    has a flag for becomes that flag, `weights` -> `--weights` and `weights='none'` ->
    `--weights none`; other names stay as they are."""
    flags = {}
    for param in command.params:
        if isinstance(param, click.Option):
            flag = next((opt for opt in param.opts if opt.startswith("--")), param.opts[0])
            for name in (param.name, *(o.lstrip("-").replace("-", "_") for o in param.opts)):
                flags.setdefault(name, flag)
    if not flags:
        return message
    def with_value(match):  # name='word' -> --flag word; name=3 -> --flag 3
        quoted = match.group(2)
        return f"{flags[match.group(1)]} {quoted[1:-1] if quoted else ''}"

    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    message = re.sub(rf"`({names})`", lambda m: f"`{flags[m.group(1)]}`", message)
    return re.sub(rf"(?<![\w.-])({names})=('[^'\s]+')?", with_value, message)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="tlkit")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own log lines (start-up "
              f"notices, CUDA probes), hidden by default; also: {TF_LOGS_ENV}=1.")
def main(verbose):
    """tlkit: a folder of images in, a TensorFlow SavedModel image classifier out.

    \b
    Quick start:
      tlkit fit data/digits --flip none     # train, evaluate, export to saved_models/
      tlkit predict data/digits/3/3_0003.png
    """
    if verbose:
        show_tensorflow_logs()


@main.command()
@click.argument("data_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="Re-run a saved config.json (flags given here override it).")
@click.option("--backbone", help="Network: scratch (default), lenet5, vgg16, resnet50, "
              "mobilenet_v2, efficientnet_b0, ...; see `tlkit backbones`.")
@click.option("--weights", help="Backbone weights: imagenet (default for pretrained "
              "backbones), none (random, every layer trains), or PATH to a weights file "
              "(e.g. a run's backbone.weights.h5).")
@click.option("--init-from", type=click.Path(exists=True),
              help="Continue a tlkit run folder or model.keras; new class folders are added.")
@click.option("--image-size", type=int, help="Side of the square model input in pixels "
              "[default: the backbone's: 32 for scratch/lenet5, 224 for pretrained].")
@click.option("--resize", type=click.Choice(["squash", "crop", "pad"]),
              help="How images become square: stretch, centre-crop, or pad [default: squash].")
@click.option("--val-split", type=float, help="Fraction of each class for validation "
              "[default: 0.2].")
@click.option("--test-split", type=float, help="Fraction of each class held out as a test "
              "set, reported separately [default: 0].")
@click.option("--val-dir", type=click.Path(exists=True, file_okay=False),
              help="A separate validation folder with the same classes (replaces --val-split).")
@click.option("--epochs", type=int, help="Most epochs of the first stage (the head, or "
              "everything when training from scratch) [default: 30].")
@click.option("--learning-rate", "--lr", "learning_rate", type=float,
              help="Adam learning rate of the first stage [default: 0.001].")
@click.option("--unfreeze", type=int, help="Backbone groups to unfreeze after the head "
              "stage, one stage each, 10x lower learning rate per stage [default: 1 when "
              "pretrained].")
@click.option("--fine-tune-epochs", type=int, help="Most epochs per unfreezing stage; 0: "
              "no fine-tuning [default: --epochs].")
@click.option("--stages", help="Explicit schedule, e.g. 'head:5@1e-3,block5:3@1e-4,"
              "block4:3@1e-5' (TARGET:EPOCHS@LR; TARGET is head, all, or a group).")
@click.option("--train-bn/--freeze-bn", "train_bn", default=None,
              help="Let BatchNorm layers in unfrozen groups train [default: frozen, in "
              "inference mode].")
@click.option("--feature-cache/--no-feature-cache", "feature_cache", default=None,
              help="Train the head on cached backbone features while the backbone is "
              "frozen [default: on].")
@click.option("--fine-tune-cache/--no-fine-tune-cache", "fine_tune_cache", default=None,
              help="Train unfreezing stages on cached activations of the frozen layers "
              "below them, when they fit in memory: faster per epoch, but the fixed "
              "augmented views overfit small sets [default: off].")
@click.option("--cached-views", type=int, help="Augmented views per image in the feature "
              "cache [default: 1].")
@click.option("--steps-per-execution", type=click.IntRange(min=1),
              help="Train steps per call into the graph [default: 8; results are the same, "
              "only fewer Python round trips].")
@click.option("--distribute", type=click.Choice(["auto", "none", "mirrored", "multi-worker"]),
              help="tf.distribute strategy: mirrored (this machine's GPUs), multi-worker "
              "(the machines in TF_CONFIG) [default: auto: multi-worker if TF_CONFIG lists "
              "several workers, else mirrored with several GPUs, else none].")
@click.option("--mixed-precision/--no-mixed-precision", "mixed_precision", default=None,
              help="Compute in float16 (GPU) or bfloat16 (CPUs that have it); variables, "
              "output layer and loss stay float32 [default: off].")
@click.option("--jit", type=click.Choice(["auto", "on", "off"]),
              help="XLA for the train step [default: auto: on with a GPU and no strategy, "
              "off on CPU, where it measured 3.8x slower].")
@click.option("--tensorboard", is_flag=True, default=None,
              help="Write TensorBoard logs to the run folder's tensorboard/.")
@click.option("--class-weight", type=click.Choice(["none", "auto"]),
              help="auto: weight the loss by inverse class frequency [default: none].")
@click.option("--patience", type=int, help="Epochs without a better val_loss before "
              "stopping [default: 5].")
@click.option("--batch-size", type=int, help="Images per step [default: 32].")
@click.option("--dropout", type=float, help="Head dropout rate [default: the backbone's].")
@click.option("--augment", type=click.Choice(["none", "light", "standard", "heavy"]),
              help="Augmentation preset, used in training only [default: standard].")
@click.option("--flip", type=click.Choice(["none", "horizontal", "vertical",
                                           "horizontal_and_vertical"]),
              help="Random flips in training [default: horizontal, none with --augment none]; "
              "`none` for digits/text.")
@click.option("--seed", type=int, help="Seed for the split, weights, shuffling and "
              "augmentation [default: 42].")
@click.option("--export-dir", type=click.Path(file_okay=False),
              help="Export root [default: saved_models].")
@click.option("--name", help="Model name [default: the data folder's name].")
@click.option("--version", "version", type=int, help="Export version; refused if it exists "
              "[default: the next free one].")
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace an existing --version (the new export is complete and verified "
              "before the old one goes).")
@click.option("--runs-dir", type=click.Path(file_okay=False),
              help="Where run folders go [default: runs].")
@click.option("--cache", type=click.Choice(["auto", "memory", "disk"]),
              help="Where decoded images are kept [default: auto, by size vs free RAM].")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Folder of the disk cache [default: ~/.cache/tlkit].")
@click.option("--workers", type=int, help="Image decoding threads [default: one per core].")
@click.option("--resume", type=click.Path(exists=True, file_okay=False),
              help="Continue an interrupted run from its run folder (its own settings; the "
              "state of every completed epoch is saved there).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the export path.")
@_user_errors
def fit(data_dir, config_file, quiet, resume, **options):
    """Train a classifier on DATA_DIR (one subfolder per class) and export it.

    Loads and checks every image (bad files are skipped and listed), splits each class
    into train/validation (and test), trains with early stopping, writes a run folder
    (config, history, curves.png, model.keras) and exports a SavedModel to
    EXPORT_DIR/NAME/VERSION. The run state is saved after every epoch: a killed or
    interrupted run continues with --resume RUN_DIR.

    With a pretrained backbone, training runs in stages: the head first with the backbone
    frozen, then the top groups of the backbone unfrozen one by one at lower learning rates
    (BatchNorm kept frozen); a stage that makes validation worse is rolled back.

    \b
    Example:
      tlkit fit data/digits --flip none --test-split 0.1
      tlkit fit ./photos --backbone resnet50 --unfreeze 2 --fine-tune-epochs 5
      tlkit fit ./photos --backbone vgg16 --stages "head:5@1e-3,block5:3@1e-4"
      tlkit fit ./photos --backbone resnet50 --weights none --image-size 128
      tlkit fit ./more_photos --init-from runs/photos/20250101-120000
      tlkit fit --config runs/digits/20250101-120000/config.json
      tlkit fit --resume runs/digits/20250101-120000
      tlkit fit ./photos --distribute multi-worker   # on every host, each with its TF_CONFIG
    """
    from tlkit.api import fit as run_fit
    from tlkit.config import FitConfig

    if quiet:
        options["verbose"] = 0
    if resume:
        given = sorted(k for k, v in options.items() if v is not None and k != "verbose")
        if data_dir or config_file or given:
            raise click.UsageError("--resume continues a run with its own settings: give no "
                                   f"DATA_DIR, --config or other options (got {given}).")
        result = run_fit(resume=resume, verbose=options.get("verbose"))
    else:
        base = FitConfig.load(config_file) if config_file else None
        if base is None and data_dir is None:
            raise click.UsageError("Give DATA_DIR, --config FILE or --resume RUN_DIR.")
        result = run_fit(data_dir, config=base, **options)
    if result.export_path is None:  # a multi-worker run's other workers
        click.echo("Done. The chief (worker 0) writes the run folder and exports.")
    else:
        click.echo(str(result.export_path) if quiet else f"Done. Model: {result.export_path}")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False),
              help="Export folder (saved_models/NAME/VERSION, or NAME for its newest) "
              "[default: the newest export under ./saved_models].")
@click.option("-k", "--top-k", default=3, show_default=True, type=click.IntRange(min=1),
              help="Classes shown per image.")
@click.option("--format", "output_format", default="table", show_default=True,
              type=click.Choice(["table", "json", "csv"]), help="Output format.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass.")
@_user_errors
def predict(inputs, model_path, top_k, output_format, batch_size):
    """Predict the top-k classes of image files or folders (searched recursively).

    A file that cannot be read gets an error line on stderr, the others are still
    predicted, and the exit code is then 1.

    \b
    Example:
      tlkit predict data/digits/3/3_0003.png
      tlkit predict photos/ --model saved_models/photos/2 --top-k 1 --format csv
    """
    from tlkit.predict import load

    classifier = load(model_path)
    predictions = classifier.predict(list(inputs), top_k=top_k, batch_size=batch_size)
    _PRINTERS[output_format](predictions, top_k)
    failed = [p for p in predictions if p.error]
    for p in failed:
        click.echo(f"Error: {p.source}: {p.error}", err=True)
    if failed:
        sys.exit(1)


def _print_table(predictions, top_k):
    ok = [p for p in predictions if not p.error]
    width = max((len(p.source) for p in ok), default=4)
    for p in ok:
        ranked = "  ".join(f"{label} ({prob:.1%})" for label, prob in
                           zip(p.labels, p.probabilities))
        click.echo(f"{p.source:<{width}}  {ranked}")


def _print_json(predictions, top_k):
    click.echo(json.dumps([p.to_dict() for p in predictions], indent=2))


def _print_csv(predictions, top_k):
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["file", *[f"{kind}_{i}" for i in range(1, top_k + 1)
                               for kind in ("label", "probability")], "error"])
    for p in predictions:
        cells = [c for pair in zip(p.labels, p.probabilities) for c in (pair[0], f"{pair[1]:.6f}")]
        cells += [""] * (2 * top_k - len(cells))
        writer.writerow([p.source, *cells, p.error or ""])


_PRINTERS = {"table": _print_table, "json": _print_json, "csv": _print_csv}


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--val-split", default=0.2, show_default=True, type=float,
              help="As in fit: the split whose leaks are checked.")
@click.option("--test-split", default=0.0, show_default=True, type=float, help="As in fit.")
@click.option("--seed", default=42, show_default=True, type=int, help="As in fit.")
@click.option("--min-size", default=16, show_default=True, type=click.IntRange(min=0),
              help="Warn about images with a side shorter than this (0: off).")
@click.option("--no-near-duplicates", is_flag=True,
              help="Skip the perceptual-hash search for near-duplicates and split leaks.")
@click.option("--quarantine", "quarantine_dir", type=click.Path(file_okay=False),
              help="Move every file fit would skip into this folder (never deletes).")
@click.option("--format", "output_format", default="table", show_default=True,
              type=click.Choice(["table", "json"]), help="Output format.")
@_user_errors
def doctor(data_dir, val_split, test_split, seed, min_size, no_near_duplicates,
           quarantine_dir, output_format):
    """Check every image of DATA_DIR before training: what is broken, odd or leaking.

    Decodes every file in parallel and reports per file: unreadable, empty, truncated, not
    an image, decompression bombs (errors: fit skips them); tiny images, wrong extensions,
    exact and near-duplicates, and above all near-duplicates on both sides of the split fit
    would make with the same --val-split/--test-split/--seed (warnings); converted modes,
    animations and EXIF rotations (info); class counts and imbalance. Exits with 1 when
    there are errors left.

    \b
    Example:
      tlkit doctor data/digits --min-size 8
      tlkit doctor ./photos --quarantine ./photos_rejected --format json
    """
    from tlkit.doctor import diagnose, quarantine

    verbose = 0 if output_format == "json" else 1
    report = diagnose(data_dir, val_split=val_split, test_split=test_split, seed=seed,
                      min_size=min_size, near_duplicates=not no_near_duplicates,
                      verbose=verbose)
    moved = quarantine(report, quarantine_dir) if quarantine_dir else []
    if output_format == "json":
        click.echo(json.dumps({**report.to_dict(),
                               "quarantined": [{"from": a, "to": b} for a, b in moved]},
                              indent=2))
    else:
        click.echo(report.to_table())
        for source, target in moved:
            click.echo(f"Moved {source} -> {target}")
    if report.errors and not moved:
        sys.exit(1)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False),
              help="Export folder [default: the newest export under ./saved_models].")
@click.option("--class", "class_name", help="Explain this class instead of the predicted one.")
@click.option("--layer", help="Backbone layer to explain [default: the last feature map "
              "larger than 1x1, the one built into the export]; needs the run folder.")
@click.option("--out", "output_dir", default="explanations", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the PNGs.")
@_user_errors
def explain(images, model_path, class_name, layer, output_dir):
    """Grad-CAM heatmaps: which part of each image drove the prediction (PNG per image).

    Uses the export's own `explain_images` signature, so it works from an export alone.

    \b
    Example:
      tlkit explain data/digits/7/7_0061.png
      tlkit explain cat.jpg --class dog --model saved_models/pets/3 --out heatmaps/
    """
    from tlkit.explain import explain_files

    for item in explain_files(list(images), model_path, class_name=class_name, layer=layer,
                              output_dir=output_dir):
        click.echo(f"{item['file']}: {item['class']} ({item['probability']:.1%}) -> "
                   f"{item['png']}")


@main.command("export-tflite")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False),
              help="Export folder (NAME/VERSION, or NAME for its newest) [default: the newest "
              "export under ./saved_models].")
@click.option("--quantize", default="none", show_default=True,
              type=click.Choice(["none", "dynamic", "float16", "int8"]),
              help="none: float32; dynamic: int8 weights; float16: float16 weights; int8: "
              "full integer, uint8 pixels in.")
@click.option("--output-dir", type=click.Path(file_okay=False),
              help="Folder for the files [default: EXPORT_ROOT/NAME/tflite/VERSION].")
@click.option("--calibration-data", type=click.Path(exists=True, file_okay=False),
              help="int8: calibrate on this folder of images instead of the training sample "
              "recorded in the export.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file of this mode.")
@_user_errors
def export_tflite(model_path, quantize, output_dir, calibration_data, overwrite):
    """Convert an export's predict_images signature to a TFLite model for devices.

    Writes model-MODE.tflite, model-MODE.json (input dtype and quantisation, image size,
    resize policy, classes) and labels.txt. The model takes decoded, resized pixels 0..255
    (float32, or uint8 with --quantize int8); needs `pip install ai-edge-litert`.

    \b
    Example:
      tlkit export-tflite --model saved_models/digits/1 --quantize int8
      tlkit export-tflite --quantize float16 --output-dir app/models
    """
    from tlkit.tflite import export_tflite as run_export, read_tflite_metadata

    path = run_export(model_path, quantize=quantize, output_dir=output_dir,
                      calibration_data=calibration_data, overwrite=overwrite)
    info = read_tflite_metadata(path)
    variables = info["source"]["variables_bytes"]
    click.echo(f"{path}\n{info['bytes'] / 1024:.1f} KiB, {info['bytes'] / variables:.0%} of "
               f"the SavedModel's variables ({variables / 1024:.1f} KiB)")


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False),
              help="Export folder [default: the newest export under ./saved_models].")
@click.option("-k", "--top-k", default=3, show_default=True, type=click.IntRange(min=1),
              help="Also report top-k accuracy.")
@click.option("--out", "output_dir", default=None, type=click.Path(file_okay=False),
              help="Write metrics.json, confusion_matrix.png, reliability.png, mistakes.csv "
              "and mistakes.png here.")
@click.option("--format", "output_format", default="text", show_default=True,
              type=click.Choice(["text", "json"]), help="Output format.")
@_user_errors
def evaluate(data_dir, model_path, top_k, output_dir, output_format):
    """Evaluate an export on a labelled folder (one subfolder per class).

    Accuracy, top-k accuracy, per-class precision/recall/F1, macro and weighted averages,
    the confusion matrix, calibration (ECE) and the most confident mistakes.

    \b
    Example:
      tlkit evaluate data/digits --out reports/digits
      tlkit evaluate ./test_photos --model saved_models/photos/2 --format json
    """
    from tlkit.evaluate import evaluate_folder

    report = evaluate_folder(data_dir, model_path, top_k=top_k, output_dir=output_dir)
    click.echo(json.dumps(report.to_dict(), indent=2) if output_format == "json"
               else report.to_text())
    if output_dir and output_format == "text":
        click.echo(f"Reports written to {output_dir}")


@main.command()
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False),
              help="Export folder (NAME/VERSION, or NAME for its newest) [default: the newest "
              "export under ./saved_models].")
@click.option("--name", help="Model name in URLs and gRPC requests [default: the export's "
              "folder name].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 serves other machines too.")
@click.option("--port", default=8501, show_default=True, type=click.IntRange(0, 65535),
              help="REST port (0: any free port).")
@click.option("--grpc-port", default=8500, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port (0: any free port).")
@click.option("--no-grpc", is_flag=True, help="Serve REST only (gRPC needs tlkit[serve]).")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Most images per forward pass when requests are batched.")
@click.option("--batch-timeout-ms", default=2.0, show_default=True,
              type=click.FloatRange(min=0), help="Longest wait of a request for others to "
              "batch with.")
@click.option("--max-request-bytes", default=32 * 1024 * 1024, show_default=True,
              type=click.IntRange(min=1024), help="Largest request body accepted.")
@_user_errors
def serve(model_path, name, host, port, grpc_port, no_grpc, max_batch_size, batch_timeout_ms,
          max_request_bytes):
    """Serve an export with TF Serving's REST and gRPC APIs (for teams without TF Serving).

    \b
    REST:  GET  /v1/models/NAME            status
           GET  /v1/models/NAME/metadata   signatures
           POST /v1/models/NAME:predict    {"instances": [{"image_bytes": {"b64": "..."}}]}
           POST /v1/models/NAME:classify   {"examples": [...], "top_k": 3}
    gRPC:  tensorflow.serving.PredictionService (Predict, Classify, GetModelMetadata) and
           ModelService (GetModelStatus), as TF Serving's own Python client expects.

    One line per request is logged to stderr. Ctrl-C stops.

    \b
    Example:
      tlkit serve --model saved_models/digits
      curl localhost:8501/v1/models/digits
    """
    import logging
    import signal
    import threading

    from tlkit.serve import ModelServer, ServeLimits

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    server = ModelServer(model_path, name=name, host=host, port=port,
                         grpc_port=None if no_grpc else grpc_port,
                         max_batch_size=max_batch_size, batch_timeout_ms=batch_timeout_ms,
                         limits=ServeLimits(max_request_bytes=max_request_bytes)).start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    model = server.model
    click.echo(f"Serving {model.name} version {model.version} ({model.path})")
    click.echo(f"  REST: {server.rest_url}")
    if server.grpc_port is not None:
        click.echo(f"  gRPC: {host}:{server.grpc_port}")
    click.echo("Ctrl-C stops.")
    try:
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    stats = server.stats
    click.echo(f"Stopped after {stats.requests} requests ({stats.images} images in "
               f"{stats.batches} forward passes).")


@main.command("inspect")
@click.option("--backbone", help="A registered backbone (see `tlkit backbones`).")
@click.option("--image-size", type=int, help="Input side [default: the backbone's].")
@click.option("--model", "model_path", type=click.Path(exists=True),
              help="A tlkit run folder or .keras file instead of a bare backbone.")
@_user_errors
def inspect_command(backbone, image_size, model_path):
    """Per-layer table: output size, parameters, receptive field, jump and MACs.

    Output size follows (n + 2p - k) / s + 1, parameters K*K*C*F + F for a convolution, the
    receptive field grows by (k - 1) * jump per layer. MACs are multiply-accumulates
    (FLOPs = 2 x MACs). For a backbone it also lists trainable and frozen parameters at
    each stage of the unfreeze schedule.

    \b
    Example:
      tlkit inspect --backbone resnet50 --image-size 224
      tlkit inspect --backbone lenet5
      tlkit inspect --model runs/digits/20250101-120000
    """
    from tlkit.inspection import (format_table, inspect_backbone, inspect_model, stage_table,
                                  summarize)

    if (backbone is None) == (model_path is None):
        raise click.UsageError("Give either --backbone NAME or --model PATH.")
    if model_path:
        from tlkit.models import keras_model_file, load_keras_model

        rows = inspect_model(load_keras_model(keras_model_file(model_path)))
        click.echo(format_table(rows, summarize(rows)))
        return
    from tlkit.backbones import get_backbone

    spec = get_backbone(backbone)
    size = image_size or spec.default_size
    rows, totals = inspect_backbone(spec.name, size)
    click.echo(format_table(rows, totals))
    weights = "imagenet" if spec.imagenet else "none"
    click.echo(f"\nTrainable / frozen parameters per stage ({'pretrained' if spec.imagenet else 'from scratch'}, "
               "2-class head, BatchNorm frozen when pretrained):")
    for stage, trainable, frozen in stage_table(spec.name, size, weights=weights):
        click.echo(f"  {stage:<10} trainable {trainable:>12,}  frozen {frozen:>12,}")


@main.group()
def cache():
    """Inspect or empty the feature cache (~/.cache/tlkit/features, or --cache-dir).

    \b
    Example:
      tlkit cache info
      tlkit cache clear --cache-dir /scratch/tlkit
    """


_cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False),
    help="The cache folder given to fit's --cache-dir [default: ~/.cache/tlkit].")


@cache.command("info")
@_cache_dir_option
def cache_info(cache_dir):
    """Show the feature cache's folder, entries and size."""
    from tlkit.features import FeatureCache

    info = _feature_cache(cache_dir, FeatureCache).info()
    click.echo(f"folder   {info['folder']}\nentries  {info['entries']}\n"
               f"size     {info['bytes'] / 1024**2:.1f} MiB (cap {info['max_bytes'] / 1024**3:.1f} GiB)"
               f"\noldest   {info['oldest'] or '-'}\nnewest   {info['newest'] or '-'}")


@cache.command("clear")
@_cache_dir_option
def cache_clear(cache_dir):
    """Delete every cached feature file (they are recomputed when needed)."""
    from tlkit.features import FeatureCache

    freed = _feature_cache(cache_dir, FeatureCache).clear()
    click.echo(f"Freed {freed / 1024**2:.1f} MiB.")


def _feature_cache(cache_dir, feature_cache):
    from pathlib import Path

    return feature_cache(Path(cache_dir) / "features" if cache_dir else None)


@main.command()
def backbones():
    """List the backbones `tlkit fit --backbone` accepts, with their defaults.

    \b
    Example:
      tlkit backbones
    """
    from tlkit.backbones import get_backbone, list_backbones

    for name in list_backbones():
        spec = get_backbone(name)
        click.echo(f"{name:<16} size {spec.default_size:>3} (min {spec.min_size:>3})  "
                   f"{spec.description}")


if __name__ == "__main__":
    main()
