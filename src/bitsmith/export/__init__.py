"""Export a model to the files other runtimes load: one module per target, one ``@register_exporter``.

An exporter gets a :class:`~bitsmith.models.LoadedModel` (float, or quantized by bitsmith) and an output
path, and writes the file atomically (:func:`atomic_path`). Weights bitsmith quantized are stored as
chosen, never re-quantized; what a target cannot express is refused, naming each offending module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from bitsmith.errors import BitsmithError

Exporter = Callable[..., Path]
_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str):
    def deco(fn: Exporter) -> Exporter:
        if name in _EXPORTERS:
            raise RuntimeError(f"exporter {name!r} registered twice")
        _EXPORTERS[name] = fn
        return fn

    return deco


def exporter_names() -> list[str]:
    _load_builtin_exporters()
    return sorted(_EXPORTERS)


def export(model, fmt: str, out: str | Path, force: bool = False, **options) -> Path:
    """Write ``model`` (a name, path or LoadedModel) to ``out`` in format ``fmt``; returns ``out``."""
    from bitsmith.models import LoadedModel, load_model

    _load_builtin_exporters()
    fn = _EXPORTERS.get(fmt)
    if fn is None:
        raise BitsmithError(f"unknown export format {fmt!r}; known: {', '.join(sorted(_EXPORTERS))}")
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise BitsmithError(f"{out} already exists; choose another --out or pass --force")
    if not out.parent.is_dir():
        raise BitsmithError(f"cannot write {out}: folder {out.parent} does not exist; create it first")
    lm = model if isinstance(model, LoadedModel) else load_model(str(model))
    return fn(lm, out, **options)


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` (file or folder) that replaces ``out`` only if the block succeeds."""
    import shutil

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if out.is_dir():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _load_builtin_exporters() -> None:
    # Importing the modules runs their @register_exporter decorators.
    import importlib

    for name in ("gguf", "compressed_tensors"):
        try:
            importlib.import_module(f"bitsmith.export.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"bitsmith.export.{name}":
                raise
