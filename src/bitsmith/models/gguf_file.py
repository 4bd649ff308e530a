"""Read a GGUF file as a Hugging Face config plus float tensors, one tensor at a time.

The ``gguf`` package parses the file's header and dequantizes its blocks; this module maps
llama.cpp's tensor names and metadata onto the Hugging Face layout. llama.cpp's converter permutes
the rows of the Llama q/k projections (interleaved rotary halves); they are permuted back here.

Only what loading needs is kept from the header: the scalar metadata, the length of each array
(the tokenizer's vocabulary and merges are read by the tokenizer loader, not here) and each tensor's
type, shape and byte range. The parser's objects for a 49k-token vocabulary take about 130 MB, and
pages of a memory-mapped file count as resident once touched, so tensors are read with plain file
reads: a streamed model holds only the block it works on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from bitsmith.errors import BitsmithError
from bitsmith.models.adapter import check_supported
from bitsmith.models.gguf_layouts import LAYOUTS, layout_for_arch

@dataclass(frozen=True)
class GGUFTensor:
    """Where a tensor lies in the file: raw item type and array shape as stored, byte offset."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    dtype: np.dtype  # of the stored items (bytes for block-quantized types), in the file's byte order
    stored_shape: tuple[int, ...]
    data_offset: int

    @property
    def count(self) -> int:
        return int(np.prod(self.stored_shape))


_ROWS = 4096  # rows of a block-quantized tensor decoded at a time


class GGUFModelFile:
    """A GGUF checkpoint opened for reading; tensors are read and dequantized lazily."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise BitsmithError(f"GGUF file not found: {self.path}; check the path")
        try:
            reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the gguf parser raises many kinds on a damaged file
            raise BitsmithError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e}); re-download or re-export it") from None
        self._scalars: dict[str, Any] = {}
        self._lengths: dict[str, int] = {}
        for key, f in reader.fields.items():
            if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
                self._lengths[key] = len(f.data)
            else:
                self._scalars[key] = f.contents()
        self.tensors = {t.name: GGUFTensor(t.name, t.tensor_type, t.data.dtype, tuple(t.data.shape), int(t.data_offset))
                        for t in reader.tensors}
        del reader  # drops the parser's per-string objects and its memory map
        arch = self._field("general.architecture")
        if arch not in LAYOUTS:
            check_supported(str(arch))  # raises with the list of supported architectures
        self.layout = layout_for_arch(arch)
        self.arch = arch
        self.model_type = self.layout.model_type
        check_supported(self.model_type)

    def _field(self, key: str, default=None):
        """A scalar or string metadata value (arrays are not kept; see ``_lengths``)."""
        return self._scalars.get(key, default)

    def config(self):
        """A Hugging Face config built from the GGUF metadata."""
        from transformers import AutoConfig

        a = self.arch
        heads = int(self._field(f"{a}.attention.head_count"))
        hidden = int(self._field(f"{a}.embedding_length"))
        vocab = int(self._field(f"{a}.vocab_size", self._lengths.get("tokenizer.ggml.tokens", 0)))
        kw = dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(self._field(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self._field(f"{a}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(self._field(f"{a}.attention.head_count_kv", heads)),
            max_position_embeddings=int(self._field(f"{a}.context_length", 2048)),
            rms_norm_eps=float(self._field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._field(f"{a}.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in self.tensors,
            bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
            eos_token_id=self._field("tokenizer.ggml.eos_token_id"),
        )
        head_dim = self._field(f"{a}.attention.key_length")
        if head_dim is not None and int(head_dim) != hidden // heads:
            kw["head_dim"] = int(head_dim)
        kw.update(self.layout.extra_config(self._field))
        return AutoConfig.for_model(self.model_type, **kw)

    def hf_name(self, name: str) -> str | None:
        return self.layout.hf_name(name)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor by its GGUF name, dequantized to fp32 in Hugging Face orientation."""
        import gguf

        t = self.tensors[name]
        with open(self.path, "rb") as fh:
            fh.seek(t.data_offset)
            raw = np.fromfile(fh, dtype=t.dtype, count=t.count)
        if raw.size != t.count:
            raise BitsmithError(f"{self.path} is truncated (tensor {name}); re-download or re-export it")
        raw = raw.reshape(t.stored_shape)
        try:
            if raw.ndim > 1 and raw.dtype == np.uint8:  # block-quantized rows decode independently: a few at a time,
                first = gguf.quants.dequantize(raw[:_ROWS], t.tensor_type)  # so the decoder's temporaries stay small
                arr = np.empty((raw.shape[0], *first.shape[1:]), dtype=np.float32)
                arr[:_ROWS] = first
                for r in range(_ROWS, raw.shape[0], _ROWS):
                    arr[r : r + _ROWS] = gguf.quants.dequantize(raw[r : r + _ROWS], t.tensor_type)
            else:
                arr = gguf.quants.dequantize(raw, t.tensor_type)
        except Exception as e:
            raise BitsmithError(f"{self.path}: cannot decode tensor {name} of type {t.tensor_type.name} ({e})") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=not arr.flags.writeable))
        heads = int(self._field(f"{self.arch}.attention.head_count"))
        permuted = self.layout.permuted_heads(name, heads, int(self._field(f"{self.arch}.attention.head_count_kv", heads)))
        if permuted is not None:
            w = _unpermute(w, permuted)
        if self.layout.norm_offset and self.layout.is_norm(name):
            w = w - self.layout.norm_offset
        return w

    def iter_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            hf = self.hf_name(name)
            if hf is None:
                if name.startswith("rope_freqs"):
                    continue
                raise BitsmithError(f"{self.path}: tensor {name!r} has no Hugging Face counterpart; unsupported GGUF layout")
            yield hf, self.tensor(name)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of the rotary halves in q/k rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
