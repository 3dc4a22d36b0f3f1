"""The `tlkit` command line: a thin click layer over the library.

Each command parses its flags, builds the library's config or arguments, makes one library
call and prints the result. tlkit's own errors (`TlkitError`) are shown as one clear line,
without a traceback. TensorFlow is imported only inside commands, so `--help` is instant.

`fit`'s settings options are made from the fields of `tlkit.config` (their defaults, choices
and help texts are written there, once); the options several commands share (`--model`,
`--output-dir`, `--format`) are decorators below, with one meaning everywhere.
"""

import csv
import dataclasses
import functools
import json
import re
import sys
import typing
from pathlib import Path

import click

from tlkit.runtime import (TF_LOGS_ENV, __version__, exit_without_final_collection,
                           import_tensorflow, show_tensorflow_logs)
from tlkit.config import AuditConfig, FitConfig, ServeConfig


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


# --- Options made from the config's fields ------------------------------------------------

# The settings that name files or folders, as the CLI checks them (the config holds strings).
_PATHS = {"labels": click.Path(exists=True, dir_okay=False),
          "val_dir": click.Path(exists=True, file_okay=False),
          "init_from": click.Path(exists=True),
          "cache_dir": click.Path(file_okay=False),
          "export_dir": click.Path(file_okay=False),
          "runs_dir": click.Path(file_okay=False)}

_SECTION_TITLES = {"data": "Data options", "model": "Model options",
                   "train": "Training options", "export": "Export options"}


def _config_fields():
    """Yields `(section, field)` for every setting of a `FitConfig`, in the config's order;
    `section` is `None` for `FitConfig`'s own fields (the seed)."""
    for section in dataclasses.fields(FitConfig):
        if dataclasses.is_dataclass(section.type):
            yield from ((section.name, f) for f in dataclasses.fields(section.type))
        else:
            yield None, section


_FIELDS = {f.name: f for _, f in _config_fields()}
_SECTION_OF = {f.name: _SECTION_TITLES[section] for section, f in _config_fields() if section}


def _setting_flags(field):
    """The click declarations of a config field's option: `--x` (bool: `--x/--no-x`),
    aliases from its `flags` metadata; `()` for a field set another way (DATA_DIR, -q)."""
    flags = field.metadata.get("flags", (f"--{field.name.replace('_', '-')}",))
    if field.type is bool and flags and "/" not in flags[0]:
        flags = (f"{flags[0]}/--no-{flags[0][2:]}", *flags[1:])
    return flags


def _shown(field):
    if "shown" in field.metadata:
        return field.metadata["shown"]
    if isinstance(field.default, bool):
        return "on" if field.default else "off"
    return str(field.default)


class _NumberOrAuto(click.ParamType):
    """A number, or "auto" for a setting resolved per run (`--image-size auto` takes back a
    size loaded with --config)."""

    def __init__(self, number):
        self.number = number
        self.name = f"{number.name}|auto"

    def get_metavar(self, param, ctx):
        return f"{self.number.name.upper()}|auto"

    def convert(self, value, param, ctx):
        return value if value == "auto" else self.number.convert(value, param, ctx)


def _click_type(field):
    if field.name in _PATHS:
        return _PATHS[field.name]
    if "choices" in field.metadata:
        return click.Choice(field.metadata["choices"])
    kinds = typing.get_args(field.type) or (field.type,)
    number = next((click.INT if kind is int else click.FLOAT for kind in kinds
                   if kind in (int, float)), None)
    if number is None:
        return click.STRING
    return _NumberOrAuto(number) if field.default == "auto" else number


def _setting_option(name, *, with_default=False):
    """The option of the `FitConfig` field `name`: its flags, click type (choices, paths,
    numbers, `--x/--no-x` for a bool) and help text with "[default: ...]" from the field.

    The option's own default is `None` (not given: the config's, or a `--config` file's,
    value stays), unless `with_default` (a command that passes the value on itself).
    """
    return _field_option(_FIELDS[name], with_default)


def _field_option(field, with_default=False):
    """The option of a config dataclass field (see `_setting_option`)."""
    kwargs = {"default": field.default if with_default else None,
              "help": f"{field.metadata['help']} [default: {_shown(field)}]"}
    if field.type is not bool:
        kwargs["type"] = _click_type(field)
    return click.option(*_setting_flags(field), field.name, **kwargs)


def _setting_options(fields):
    """A decorator adding an option for every one of `fields` a flag sets, in their order."""

    def add(command):
        for field in reversed(fields):
            if _setting_flags(field):
                command = _field_option(field)(command)
        return command

    return add


class _SectionedCommand(click.Command):
    """A command whose --help lists the settings under their config section."""

    def format_options(self, ctx, formatter):
        sections = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                sections.setdefault(_SECTION_OF.get(param.name, "Options"), []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


# --- Options several commands share -------------------------------------------------------

def model_option(command):
    """`--model`: the export a command reads, and `--export-dir`: the export root searched
    for the newest one without it (fit's --export-dir)."""
    command = _setting_option("export_dir", with_default=True)(command)
    return click.option(
        "--model", "model_path", type=click.Path(exists=True, file_okay=False),
        help="Export folder (EXPORT_DIR/NAME/VERSION, or EXPORT_DIR/NAME for its newest "
        "version) [default: the newest export under --export-dir].")(command)


def output_dir_option(help, default=None):
    """`--output-dir` (alias `--out`): the folder a command writes its files to."""
    return click.option("--output-dir", "--out", "output_dir", default=default,
                        show_default=default is not None, type=click.Path(file_okay=False),
                        help=help)


class _FormatChoice(click.Choice):
    """click.Choice taking "text", evaluate's former name, for "table"."""

    def convert(self, value, param, ctx):
        return super().convert("table" if value == "text" else value, param, ctx)


def format_option(choices):
    """`--format`: how results are printed, "table" for people, "json" or "csv" for
    programs."""
    return click.option("--format", "output_format", default="table", show_default=True,
                        type=_FormatChoice(choices), help="Output format.")


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
    exit_without_final_collection()


@main.command(cls=_SectionedCommand)
@click.argument("data_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="Re-run a saved config.json (flags given here override it).")
@click.option("--resume", type=click.Path(exists=True, file_okay=False),
              help="Continue an interrupted run from its run folder (its own settings; the "
              "state of every completed epoch is saved there).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the export path (verbose 0).")
@_setting_options([f for _, f in _config_fields()])
@_user_errors
def fit(data_dir, config_file, quiet, resume, **options):
    """Train a classifier on DATA_DIR (one subfolder per class, or a --labels CSV) and
    export it.

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
      tlkit fit ./photos --labels ./photos/labels.csv   # path,label[,split] rows
      tlkit fit ./more_photos --init-from runs/photos/20250101-120000
      tlkit fit --config runs/digits/20250101-120000/config.json
      tlkit fit --resume runs/digits/20250101-120000
      tlkit fit ./photos --distribute multi-worker   # on every host, each with its TF_CONFIG
    """
    from tlkit.api import fit as run_fit

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
@model_option
@click.option("-k", "--top-k", default=3, show_default=True, type=click.IntRange(min=1),
              help="Classes shown per image.")
@format_option(["table", "json", "csv"])
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per forward pass.")
@_user_errors
def predict(inputs, model_path, export_dir, top_k, output_format, batch_size):
    """Predict the top-k classes of image files or folders (searched recursively).

    For a multi-label model, every label at or above its threshold comes first, with its
    probability (table: `labels: a (97.1%), b (88.0%)`, or `labels: none`; json:
    `predicted`; csv: `predicted`, `;`-separated), then the top-k by probability.

    A file that cannot be read gets an error line on stderr, the others are still
    predicted, and the exit code is then 1.

    \b
    Example:
      tlkit predict data/digits/3/3_0003.png
      tlkit predict photos/ --model saved_models/photos/2 --top-k 1 --format csv
    """
    from tlkit.predict import load

    classifier = load(model_path, export_dir=export_dir)
    predictions = classifier.predict(list(inputs), top_k=top_k, batch_size=batch_size)
    _PRINTERS[output_format](predictions, top_k, classifier.multi_label)
    failed = [p for p in predictions if p.error]
    for p in failed:
        click.echo(f"Error: {p.source}: {p.error}", err=True)
    if failed:
        sys.exit(1)


def _print_table(predictions, top_k, multi_label):
    ok = [p for p in predictions if not p.error]
    width = max((len(p.source) for p in ok), default=4)
    for p in ok:
        ranked = "  ".join(f"{label} ({prob:.1%})" for label, prob in
                           zip(p.labels, p.probabilities))
        if multi_label:
            above = ", ".join(f"{label} ({prob:.1%})" for label, prob in p.predicted)
            ranked = f"labels: {above or 'none'}  |  top {len(p.labels)}: {ranked}"
        click.echo(f"{p.source:<{width}}  {ranked}")


def _print_json(predictions, top_k, multi_label):
    click.echo(json.dumps([p.to_dict() for p in predictions], indent=2))


def _print_csv(predictions, top_k, multi_label):
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["file", *(["predicted"] if multi_label else []),
                     *[f"{kind}_{i}" for i in range(1, top_k + 1)
                       for kind in ("label", "probability")], "error"])
    for p in predictions:
        cells = [c for pair in zip(p.labels, p.probabilities) for c in (pair[0], f"{pair[1]:.6f}")]
        cells += [""] * (2 * top_k - len(cells))
        if multi_label:
            cells.insert(0, ";".join(label for label, _ in p.predicted or []))
        writer.writerow([p.source, *cells, p.error or ""])


_PRINTERS = {"table": _print_table, "json": _print_json, "csv": _print_csv}


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@_setting_option("labels")
@_setting_option("multi_label", with_default=True)
@_setting_option("val_split", with_default=True)
@_setting_option("test_split", with_default=True)
@_setting_option("seed", with_default=True)
@click.option("--min-size", default=16, show_default=True, type=click.IntRange(min=0),
              help="Warn about images with a side shorter than this (0: off).")
@click.option("--no-near-duplicates", is_flag=True,
              help="Skip the perceptual-hash search for near-duplicates and split leaks.")
@click.option("--quarantine", "quarantine_dir", type=click.Path(file_okay=False),
              help="Move every file fit would skip into this folder (never deletes).")
@format_option(["table", "json"])
@_user_errors
def doctor(data_dir, labels, multi_label, val_split, test_split, seed, min_size,
           no_near_duplicates, quarantine_dir, output_format):
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
      tlkit doctor ./photos --labels ./photos/labels.csv
      tlkit doctor ./photos --labels ./photos/labels.csv --multi-label
    """
    from tlkit.doctor import diagnose, quarantine

    verbose = 0 if output_format == "json" else 1
    report = diagnose(data_dir, labels=labels, multi_label=multi_label, val_split=val_split,
                      test_split=test_split, seed=seed,
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
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@_setting_options(dataclasses.fields(AuditConfig))
@output_dir_option("Write audit.csv, audit.json and audit.png here.", default="audit")
@format_option(["table", "json"])
@_user_errors
def audit(data_dir, output_dir, output_format, **options):
    """Find images of DATA_DIR (one subfolder per class, or --labels) likely labelled wrong.

    Computes the frozen backbone's features once (cached: a rerun skips the backbone),
    scores every image by a softmax head trained on the other folds, and applies confident
    learning (per-class thresholds at the mean self-confidence, Northcutt et al. 2021): the
    likely wrong labels with a suggested label, ambiguous images, and outliers far from
    every class. Writes audit.csv (every image, the suspects first), audit.json (settings,
    counts, estimated noise per class) and audit.png (the suspects, given -> suggested).
    With --multi-label, each label is audited as present or absent on every image.

    \b
    Example:
      tlkit audit ./photos
      tlkit audit ./photos --backbone resnet50 --folds 10 --output-dir reports/audit
      tlkit audit ./photos --format json
      tlkit audit ./photos --labels ./photos/labels.csv
      tlkit audit ./photos --labels ./photos/labels.csv --multi-label
    """
    from tlkit.audit import audit_labels

    options["verbose"] = 0 if output_format == "json" else 1
    report = audit_labels(data_dir, output_dir=output_dir, **options)
    if output_format == "json":
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.to_table())
        click.echo(f"Reports written to {output_dir}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@model_option
@click.option("--class", "class_name", help="Explain this class instead of the predicted one.")
@click.option("--layer", help="Backbone layer to explain [default: the last feature map "
              "larger than 1x1, the one built into the export]; needs the run folder.")
@output_dir_option("Folder for the PNGs.", default="explanations")
@_user_errors
def explain(images, model_path, export_dir, class_name, layer, output_dir):
    """Grad-CAM heatmaps: which part of each image drove the prediction (PNG per image).

    Uses the export's own `explain_images` signature, so it works from an export alone.

    \b
    Example:
      tlkit explain data/digits/7/7_0061.png
      tlkit explain cat.jpg --class dog --model saved_models/pets/3 --output-dir heatmaps/
    """
    from tlkit.explain import explain_files

    for item in explain_files(list(images), model_path, export_dir=export_dir,
                              class_name=class_name, layer=layer, output_dir=output_dir):
        click.echo(f"{item['file']}: {item['class']} ({item['probability']:.1%}) -> "
                   f"{item['png']}")


@main.command("export-tflite")
@model_option
@click.option("--quantize", default="none", show_default=True,
              type=click.Choice(["none", "dynamic", "float16", "int8"]),
              help="none: float32; dynamic: int8 weights; float16: float16 weights; int8: "
              "full integer, uint8 pixels in.")
@output_dir_option("Folder for the files [default: EXPORT_DIR/NAME/tflite/VERSION].")
@click.option("--calibration-data", type=click.Path(exists=True, file_okay=False),
              help="int8: calibrate on this folder of images instead of the training sample "
              "recorded in the export.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file of this mode.")
@_user_errors
def export_tflite(model_path, export_dir, quantize, output_dir, calibration_data, overwrite):
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
                      calibration_data=calibration_data, overwrite=overwrite,
                      export_dir=export_dir)
    info = read_tflite_metadata(path)
    variables = info["source"]["variables_bytes"]
    click.echo(f"{path}\n{info['bytes'] / 1024:.1f} KiB, {info['bytes'] / variables:.0%} of "
               f"the SavedModel's variables ({variables / 1024:.1f} KiB)")


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@_setting_option("labels")
@model_option
@click.option("-k", "--top-k", default=3, show_default=True, type=click.IntRange(min=1),
              help="Also report top-k accuracy.")
@output_dir_option("Write metrics.json, confusion_matrix.png, reliability.png, mistakes.csv "
                   "and mistakes.png here.")
@format_option(["table", "json"])
@_user_errors
def evaluate(data_dir, labels, model_path, export_dir, top_k, output_dir, output_format):
    """Evaluate an export on a labelled folder (one subfolder per class, or a --labels CSV:
    every row, whatever its split column says).

    Accuracy, top-k accuracy, per-class precision/recall/F1, macro and weighted averages,
    the confusion matrix, calibration (ECE) and the most confident mistakes.

    \b
    Example:
      tlkit evaluate data/digits --output-dir reports/digits
      tlkit evaluate ./test_photos --model saved_models/photos/2 --format json
      tlkit evaluate ./photos --labels ./photos/test_labels.csv
    """
    from tlkit.evaluate import evaluate_folder

    report = evaluate_folder(data_dir, model_path, export_dir=export_dir, top_k=top_k,
                             output_dir=output_dir, labels=labels)
    click.echo(json.dumps(report.to_dict(), indent=2) if output_format == "json"
               else report.to_text())
    if output_dir and output_format == "table":
        click.echo(f"Reports written to {output_dir}")


@main.command()
@model_option
@_setting_options(dataclasses.fields(ServeConfig))
@click.option("--no-grpc", is_flag=True, help="Serve REST only (gRPC needs tlkit[serve]).")
@_user_errors
def serve(model_path, export_dir, no_grpc, **options):
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
    settings = ServeConfig(**{k: v for k, v in options.items() if v is not None})
    server = ModelServer(model_path, export_dir=export_dir, name=settings.name,
                         host=settings.host, port=settings.port,
                         grpc_port=None if no_grpc else settings.grpc_port,
                         max_batch_size=settings.max_batch_size,
                         batch_timeout_ms=settings.batch_timeout_ms,
                         limits=ServeLimits(max_request_bytes=settings.max_request_bytes)).start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    model = server.model
    try:  # a Ctrl-C from here on stops the server cleanly
        click.echo(f"Serving {model.name} version {model.version} ({model.path})")
        click.echo(f"  REST: {server.rest_url}")
        if server.grpc_port is not None:
            click.echo(f"  gRPC: {settings.host}:{server.grpc_port}")
        click.echo("Ctrl-C stops.")
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    stats = server.stats
    click.echo(f"Stopped after {stats.requests} requests ({stats.images} images in "
               f"{stats.batches} forward passes).")


def _run_of_export(path):
    """The run folder an export made by `tlkit fit` records, for a path to an export (or to
    a model folder of versions); any other path as it is."""
    from tlkit.export import read_metadata, resolve_export

    path = Path(path)
    if not (path / "saved_model.pb").is_file() and not any(
            (p / "saved_model.pb").is_file() for p in path.glob("[0-9]*")):
        return path
    export = resolve_export(path)
    run_dir = read_metadata(export).get("run_dir")
    if not run_dir or not Path(run_dir, "model.keras").is_file():
        raise click.BadParameter(
            f"{str(export)!r} is an export without its run folder (the SavedModel holds no "
            "Keras layers to inspect); pass the run folder or model.keras instead.",
            param_hint="--model")
    return Path(run_dir)


@main.command("inspect")
@click.option("--backbone", help="A registered backbone (see `tlkit backbones`).")
@click.option("--image-size", type=int, help="Input side [default: the backbone's].")
@click.option("--model", "model_path", type=click.Path(exists=True),
              help="A trained model instead of a bare backbone: an export made by `tlkit "
              "fit` (read from the run folder it names), a run folder or a .keras file.")
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
      tlkit inspect --model saved_models/digits/1
      tlkit inspect --model runs/digits/20250101-120000
    """
    from tlkit.inspection import (format_table, inspect_backbone, inspect_model, stage_table,
                                  summarize)

    if (backbone is None) == (model_path is None):
        raise click.UsageError("Give either --backbone NAME or --model PATH.")
    if model_path:
        from tlkit.models import keras_model_file, load_keras_model

        rows = inspect_model(load_keras_model(keras_model_file(_run_of_export(model_path))))
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


@cache.command("info")
@_setting_option("cache_dir")
def cache_info(cache_dir):
    """Show the feature cache's folder, entries and size."""
    from tlkit.features import FeatureCache

    info = _feature_cache(cache_dir, FeatureCache).info()
    click.echo(f"folder   {info['folder']}\nentries  {info['entries']}\n"
               f"size     {info['bytes'] / 1024**2:.1f} MiB (cap {info['max_bytes'] / 1024**3:.1f} GiB)"
               f"\noldest   {info['oldest'] or '-'}\nnewest   {info['newest'] or '-'}")


@cache.command("clear")
@_setting_option("cache_dir")
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
