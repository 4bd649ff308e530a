import pytest
import torch

from bitsmith.data import text as T
from bitsmith.errors import BitsmithError


def test_builtin_parts_are_disjoint_and_stable():
    calib, evals = T.builtin_text("calib"), T.builtin_text("eval")
    cp, ep = set(calib.text.split("\n\n")), set(evals.text.split("\n\n"))
    assert len(cp) > 1000 and len(ep) > 1000
    assert not cp & ep
    assert T.builtin_text("eval").digest == evals.digest


class _CharTok:
    """Character-level stand-in tokenizer (the real one is exercised in the CLI tests)."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_calibration_sampling_is_deterministic_for_a_seed():
    text = T.builtin_text("calib")
    a = T.calibration_batch(_CharTok(), text, 4, 32, seed=1)
    b = T.calibration_batch(_CharTok(), text, 4, 32, seed=1)
    c = T.calibration_batch(_CharTok(), text, 4, 32, seed=2)
    assert a.shape == (4, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eval_windows_are_consecutive(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij" * 3)
    w = T.eval_windows(_CharTok(), T.file_text(f), 5, 3)
    assert w.shape == (3, 5)
    assert w.reshape(-1).tolist() == [ord(c) for c in ("abcdefghij" * 3)[:15]]
    with pytest.raises(BitsmithError, match="fewer than"):
        T.eval_windows(_CharTok(), T.file_text(f), 10, 4)


def test_bad_text_files(tmp_path):
    with pytest.raises(BitsmithError, match="not found"):
        T.file_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(BitsmithError, match="empty"):
        T.file_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x80")
    with pytest.raises(BitsmithError, match="UTF-8"):
        T.file_text(tmp_path / "bin.txt")
