"""The compressed file: exact round trip, packed codes, a pinned format, and errors for people.

The real MiniLM (quantized once per session, conftest.py) is saved and read back; damaged,
tampered and foreign files must raise :class:`gobo.io.FormatError` with a message that says
what to do; a failed write must leave nothing behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct

import numpy as np
import pytest
import torch

import gobo
from gobo.config import DirectQConfig, GoboConfig, config_to_json
from gobo.io import FORMAT_VERSION, WEIGHTS_FILE, FormatError, read_compressed, write_compressed
from gobo.qtensor import QuantizedTensor
from gobo.quantizer import CompressedModel, TensorStats

# ---------------------------------------------------------------------------- round trip of the real model


def test_save_load_gives_identical_tensors(gobo_default):
    cm = gobo_default.cm
    back = read_compressed(gobo_default.outdir)
    assert back.config == cm.config and back.source == cm.source
    assert set(back.quantized) == set(cm.quantized) and set(back.dense) == set(cm.dense)
    for name, qt in cm.quantized.items():
        got = back.quantized[name]
        assert (got.shape, got.bits, got.group_rows, got.method) == (qt.shape, qt.bits, qt.group_rows, qt.method)
        for field, arr in qt.to_tensors().items():
            other = got.to_tensors()[field]
            assert other.dtype == arr.dtype and np.array_equal(other, arr), (name, field)
        assert back.stats[name].bits == cm.stats[name].bits
        assert back.stats[name].sqnr_db == pytest.approx(cm.stats[name].sqnr_db, abs=1e-6)
    want, got = cm.state_dict(), back.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_loaded_model_gives_identical_outputs(gobo_default, minilm_dir, tokenizer, real_sentences):
    from transformers import AutoModel, AutoTokenizer

    loaded = gobo.load(gobo_default.outdir)
    reference = AutoModel.from_pretrained(str(minilm_dir)).eval()
    sd = gobo_default.cm.state_dict()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert not loaded.training

    tok_out = AutoTokenizer.from_pretrained(str(gobo_default.outdir))
    batch = tok_out(real_sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert torch.equal(batch["input_ids"], tokenizer(real_sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")["input_ids"])
    with torch.inference_mode():
        a = loaded(**batch).last_hidden_state
        b = reference(**batch).last_hidden_state
    assert torch.equal(a, b)
    # and it is the quantized model, not the FP32 one
    fp32 = AutoModel.from_pretrained(str(minilm_dir)).eval()
    with torch.inference_mode():
        assert not torch.equal(fp32(**batch).last_hidden_state, a)


def test_codes_are_packed_without_wasted_bits(gobo_default):
    from safetensors import safe_open

    header = json.loads(_metadata(gobo_default.file)["gobo"])
    with safe_open(str(gobo_default.file), "np") as f:
        keys = set(f.keys())
        for name, meta in header["tensors"].items():
            codes = f.get_tensor(f"q:{name}:codes")
            numel = int(np.prod(meta["shape"]))
            assert codes.dtype == np.uint8 and codes.shape == (-(-numel * meta["bits"] // 8),), name
            spare = codes.size * 8 - numel * meta["bits"]
            assert spare < 8 and int(codes[-1]) >> (8 - spare) == 0, name  # unused high bits are zero
    # nothing else is stored: every key is a declared field of a quantized tensor or a dense tensor
    for key in keys:
        kind, _, rest = key.partition(":")
        assert kind in ("q", "d"), key
        if kind == "q":
            assert rest.rpartition(":")[0] in header["tensors"], key
    # the file is the arrays plus a small header: no hidden copies
    data_bytes = sum(qt.nbytes() for qt in gobo_default.cm.quantized.values()) + sum(a.nbytes for a in gobo_default.cm.dense.values())
    assert data_bytes <= gobo_default.file.stat().st_size <= data_bytes + 64_000


def test_metadata_describes_the_file(gobo_default, minilm_dir):
    from gobo.hf import weights_sha256

    meta = _metadata(gobo_default.file)
    assert meta["format"] == "gobo" and meta["format_version"] == "1" and FORMAT_VERSION == 3  # no compact or grid tensor: version 1
    header = json.loads(meta["gobo"])
    assert header["config"] == config_to_json(GoboConfig()) and header["config"]["type"] == "gobo"
    assert header["source"]["weights_sha256"] == weights_sha256(minilm_dir)
    assert header["source"]["model_type"] == "bert"
    assert len(header["payload_sha256"]) == 64
    assert set(header["tensors"]) == set(gobo_default.cm.quantized)
    for name, t in header["tensors"].items():
        qt = gobo_default.cm.quantized[name]
        assert tuple(t["shape"]) == qt.shape and t["bits"] == qt.bits
        assert t["stats"]["nbytes"] == qt.nbytes()


def test_tokenizer_and_config_travel_with_the_model(gobo_default, minilm_dir):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gobo_default.outdir))
    assert tok("a fresh, funny film")["input_ids"][0] == tok.cls_token_id
    assert (gobo_default.outdir / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
    assert AutoConfig.from_pretrained(str(gobo_default.outdir)).model_type == "bert"
    # the source weights are not copied next to the compressed file
    assert not list(gobo_default.outdir.glob("*.bin")) and [p.name for p in gobo_default.outdir.glob("*.safetensors")] == [WEIGHTS_FILE]


# ---------------------------------------------------------------------------- damaged, foreign and newer files


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return f.metadata()


def _copy_model(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved.outdir, dst)
    return dst


@pytest.mark.parametrize("keep", [0, 4, 8, 100, -1], ids=["empty", "4-bytes", "length-only", "inside-header", "last-byte-cut"])
def test_truncated_file_raises(tmp_path, keep):
    d = _write_golden(tmp_path)
    data = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(data[:keep])
    with pytest.raises(FormatError, match=r"(damaged|truncated).*quantize the model again"):
        read_compressed(d)


def test_truncated_real_file_raises(gobo_paper3, tmp_path):
    d = _copy_model(gobo_paper3, tmp_path)
    f = d / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(FormatError, match=r"truncated.*quantize the model again"):
        gobo.load_compressed(d)


def test_flipped_byte_fails_the_checksum(gobo_paper3, tmp_path):
    d = _copy_model(gobo_paper3, tmp_path)
    f = d / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10  # in the codes of the word embedding
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"checksum.*quantize the model again") as err:
        gobo.load(d)
    assert str(f) in str(err.value)


def test_newer_format_version_asks_for_an_upgrade(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _write_golden(tmp_path)
    f = d / WEIGHTS_FILE
    meta = _metadata(f)
    save_file(load_file(str(f)), str(f), metadata={**meta, "format_version": "999"})
    with pytest.raises(FormatError, match=r"newer gobo \(format 999\); upgrade gobo"):
        read_compressed(d)


def test_non_gobo_safetensors_file_raises(minilm_dir, tmp_path):
    # a real model's own weights file, passed as the file and as a directory holding it
    with pytest.raises(FormatError, match=r"not a gobo file.*gobo quantize"):
        read_compressed(minilm_dir / "model.safetensors")
    d = tmp_path / "foreign"
    d.mkdir()
    shutil.copyfile(minilm_dir / "model.safetensors", d / WEIGHTS_FILE)
    with pytest.raises(FormatError, match=r"not a gobo file.*gobo quantize"):
        read_compressed(d)
    with pytest.raises(FormatError, match=r"not a gobo model directory.*gobo quantize"):
        read_compressed(minilm_dir)  # a model directory, but not a compressed one


def test_empty_and_missing_directories_raise(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"not a gobo model directory.*gobo quantize"):
        gobo.load(tmp_path / "empty")
    with pytest.raises((FormatError, FileNotFoundError), match=r"gobo quantize"):
        gobo.load(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_not_a_safetensors_file_raises(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / WEIGHTS_FILE).write_text("{}" * 50)
    with pytest.raises(FormatError, match=r"damaged.*quantize the model again"):
        read_compressed(d)


# ---------------------------------------------------------------------------- writing safely


def test_existing_non_empty_directory_is_left_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--force"):
        write_compressed(golden_model(), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # an empty directory is fine, and overwrite replaces a full one completely
    (tmp_path / "empty").mkdir()
    write_compressed(golden_model(), tmp_path / "empty")
    write_compressed(golden_model(), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, minilm_dir, existing):
    import safetensors.numpy

    out = tmp_path / "out"
    if existing:
        write_compressed(golden_model(), out)
        before = (out / WEIGHTS_FILE).read_bytes()

    def broken_save(*args, **kwargs):  # fault injection: the disk fills up mid-write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        write_compressed(golden_model(), out, source_dir=minilm_dir, overwrite=existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])  # no '.partial' dir
    if existing:
        assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_FILE]
        assert (out / WEIGHTS_FILE).read_bytes() == before


def test_save_is_byte_deterministic(tmp_path):
    """The same model written twice must give the same bytes (reproducible artefacts, golden tests)."""
    digests = set()
    for i in range(6):
        write_compressed(golden_model(), tmp_path / str(i))
        digests.add(hashlib.sha256((tmp_path / str(i) / WEIGHTS_FILE).read_bytes()).hexdigest())
    assert len(digests) == 1, f"{len(digests)} different files from one model"


# ---------------------------------------------------------------------------- the pinned format (version 1)

def golden_model():
    a = QuantizedTensor.from_codes(
        np.array([[0, 1, 2, 3, 4], [5, 6, 7, 0, 1], [2, 3, 4, 5, 6]], np.uint8), shape=(3, 5), bits=3,
        codebook=np.array([[-1.75, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.75]], np.float32), group_rows=3,
        row_scale=np.array([1.0, 0.5, 2.0], np.float16), row_offset=np.array([0.0, 0.25, -0.25], np.float16),
        outlier_index=np.array([2, 11], np.int64), outlier_value=np.array([7.5, -8.25], np.float32), method="gobo")
    b = QuantizedTensor.from_codes(
        np.array([3, 0, 2, 1, 3], np.uint8), shape=(5,), bits=2,
        codebook=np.array([[-0.5, 0.0, 0.5, 1.0]], np.float32), group_rows=5, method="gobo")
    c = QuantizedTensor.from_codes(
        np.arange(8, dtype=np.uint8).reshape(2, 4) * 4, shape=(2, 4), bits=5,
        codebook=np.arange(64, dtype=np.float32).reshape(2, 32) / 8, group_rows=1, method="gobo")
    stats = {"enc.weight": TensorStats(shape=(3, 5), bits=3, sqnr_db=12.5, outlier_fraction=2 / 15, fp32_bytes=60, nbytes=a.nbytes())}
    return CompressedModel(
        quantized={"enc.weight": a, "emb.weight": c, "norm.weight": b},
        dense={"enc.bias": np.array([0.5, -0.5, 1.0], np.float32), "position_ids": np.arange(4, dtype=np.int64)[None]},
        config=DirectQConfig(bits=3), stats=stats,
        source={"name": "golden", "model_type": "bert", "weights_sha256": "ab" * 32})


#: sha256 of gobo.safetensors for golden_model(): change it only with a new FORMAT_VERSION
#: (and keep GOLDEN_V1 loading). The metadata keys are in sorted order.
GOLDEN_SHA256 = "2df82be39ec5d631a926a75bc0eb4438ebaa98b2f908fccd7b0d02938ce6ec7d"

#: the file itself, as written by format version 1 (2133 bytes)
GOLDEN_V1 = """
yAYAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJnb2JvIiwiZm9ybWF0X3ZlcnNpb24iOiIxIiwiZ29ibyI6Intc
ImNvbmZpZ1wiOiB7XCJkYXRhXCI6IHtcImJpdHNcIjogM30sIFwidHlwZVwiOiBcImRpcmVjdHFcIiwgXCJ2ZXJzaW9uXCI6
IDF9LCBcInBhY2tpbmdcIjogXCJsc2ItYml0c3RyZWFtLXYxXCIsIFwicGF5bG9hZF9zaGEyNTZcIjogXCI1YjM1NDBjMTEw
YTBjYTAwYTlkZDBlZDExMmI1NGM2NDk4YTI1MGY0MTRkN2FjNDEzNzJiNDkzZGFmMzAwOGUwXCIsIFwic291cmNlXCI6IHtc
Im1vZGVsX3R5cGVcIjogXCJiZXJ0XCIsIFwibmFtZVwiOiBcImdvbGRlblwiLCBcIndlaWdodHNfc2hhMjU2XCI6IFwiYWJh
YmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYlwifSwgXCJ0ZW5z
b3JzXCI6IHtcImVtYi53ZWlnaHRcIjoge1wiYml0c1wiOiA1LCBcImdyb3VwX3Jvd3NcIjogMSwgXCJtZXRob2RcIjogXCJn
b2JvXCIsIFwic2hhcGVcIjogWzIsIDRdfSwgXCJlbmMud2VpZ2h0XCI6IHtcImJpdHNcIjogMywgXCJncm91cF9yb3dzXCI6
IDMsIFwibWV0aG9kXCI6IFwiZ29ib1wiLCBcInNoYXBlXCI6IFszLCA1XSwgXCJzdGF0c1wiOiB7XCJmcDMyX2J5dGVzXCI6
IDYwLCBcIm5ieXRlc1wiOiA2NiwgXCJvdXRsaWVyX2ZyYWN0aW9uXCI6IDAuMTMzMzMzMzMzMzMzMzMzMzMsIFwic3Fucl9k
YlwiOiAxMi41fX0sIFwibm9ybS53ZWlnaHRcIjoge1wiYml0c1wiOiAyLCBcImdyb3VwX3Jvd3NcIjogNSwgXCJtZXRob2Rc
IjogXCJnb2JvXCIsIFwic2hhcGVcIjogWzVdfX19In0sImQ6cG9zaXRpb25faWRzIjp7ImR0eXBlIjoiSTY0Iiwic2hhcGUi
OlsxLDRdLCJkYXRhX29mZnNldHMiOlswLDMyXX0sImQ6ZW5jLmJpYXMiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzNdLCJk
YXRhX29mZnNldHMiOlszMiw0NF19LCJxOmVtYi53ZWlnaHQ6Y29kZWJvb2siOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzIs
MzJdLCJkYXRhX29mZnNldHMiOls0NCwzMDBdfSwicTplbmMud2VpZ2h0OmNvZGVib29rIjp7ImR0eXBlIjoiRjMyIiwic2hh
cGUiOlsxLDhdLCJkYXRhX29mZnNldHMiOlszMDAsMzMyXX0sInE6ZW5jLndlaWdodDpvdXRsaWVyX3ZhbHVlIjp7ImR0eXBl
IjoiRjMyIiwic2hhcGUiOlsyXSwiZGF0YV9vZmZzZXRzIjpbMzMyLDM0MF19LCJxOm5vcm0ud2VpZ2h0OmNvZGVib29rIjp7
ImR0eXBlIjoiRjMyIiwic2hhcGUiOlsxLDRdLCJkYXRhX29mZnNldHMiOlszNDAsMzU2XX0sInE6ZW5jLndlaWdodDpvdXRs
aWVyX2luZGV4Ijp7ImR0eXBlIjoiSTMyIiwic2hhcGUiOlsyXSwiZGF0YV9vZmZzZXRzIjpbMzU2LDM2NF19LCJxOmVuYy53
ZWlnaHQ6cm93X29mZnNldCI6eyJkdHlwZSI6IkYxNiIsInNoYXBlIjpbM10sImRhdGFfb2Zmc2V0cyI6WzM2NCwzNzBdfSwi
cTplbmMud2VpZ2h0OnJvd19zY2FsZSI6eyJkdHlwZSI6IkYxNiIsInNoYXBlIjpbM10sImRhdGFfb2Zmc2V0cyI6WzM3MCwz
NzZdfSwicTplbWIud2VpZ2h0OmNvZGVzIjp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzVdLCJkYXRhX29mZnNldHMiOlszNzYs
MzgxXX0sInE6ZW5jLndlaWdodDpjb2RlcyI6eyJkdHlwZSI6IlU4Iiwic2hhcGUiOls2XSwiZGF0YV9vZmZzZXRzIjpbMzgx
LDM4N119LCJxOm5vcm0ud2VpZ2h0OmNvZGVzIjp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzJdLCJkYXRhX29mZnNldHMiOlsz
ODcsMzg5XX19ICAgICAgIAAAAAAAAAAAAQAAAAAAAAACAAAAAAAAAAMAAAAAAAAAAAAAPwAAAL8AAIA/AAAAAAAAAD4AAIA+
AADAPgAAAD8AACA/AABAPwAAYD8AAIA/AACQPwAAoD8AALA/AADAPwAA0D8AAOA/AADwPwAAAEAAAAhAAAAQQAAAGEAAACBA
AAAoQAAAMEAAADhAAABAQAAASEAAAFBAAABYQAAAYEAAAGhAAABwQAAAeEAAAIBAAACEQAAAiEAAAIxAAACQQAAAlEAAAJhA
AACcQAAAoEAAAKRAAACoQAAArEAAALBAAAC0QAAAuEAAALxAAADAQAAAxEAAAMhAAADMQAAA0EAAANRAAADYQAAA3EAAAOBA
AADkQAAA6EAAAOxAAADwQAAA9EAAAPhAAAD8QAAA4L8AAKC/AABAvwAAgL4AAIA+AABAPwAAoD8AAOA/AADwQAAABMEAAAC/
AAAAAAAAAD8AAIA/AgAAAAsAAAAAAAA0ALQAPAA4AECAIAYp5ojG+ojGGmMD
"""


def _write_golden(tmp_path):
    d = tmp_path / "golden"
    write_compressed(golden_model(), d)
    return d


def test_golden_bytes(tmp_path):
    for i in range(4):  # more than once: the bytes must not depend on the run
        write_compressed(golden_model(), tmp_path / str(i))
        data = (tmp_path / str(i) / WEIGHTS_FILE).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256, f"format changed; header now:\n{data[8 : 8 + n].decode()}"
    assert data == base64.b64decode(GOLDEN_V1)


def test_golden_v1_file_still_loads(tmp_path):
    d = tmp_path / "v1"
    d.mkdir()
    (d / WEIGHTS_FILE).write_bytes(base64.b64decode(GOLDEN_V1))
    got, want = read_compressed(d), golden_model()
    assert got.config == DirectQConfig(bits=3) and got.source == want.source
    assert got.stats["enc.weight"].sqnr_db == 12.5 and got.stats["enc.weight"].nbytes == 66
    sd = got.state_dict()
    for k, v in want.state_dict().items():
        assert sd[k].dtype == v.dtype and np.array_equal(sd[k], v), k
    # a few values worked out by hand from the recipe in gobo.qtensor
    assert sd["enc.weight"][0, 2] == 7.5 and sd["enc.weight"][2, 1] == -8.25  # outliers
    assert sd["enc.weight"][1, 0] == np.float32(0.75 * 0.5 + 0.25)
    np.testing.assert_array_equal(sd["norm.weight"], np.array([1.0, -0.5, 0.5, 0.0, 1.0], np.float32))
    np.testing.assert_array_equal(sd["emb.weight"][1], np.array([32 + 16, 32 + 20, 32 + 24, 32 + 28], np.float32) / 8)


# ---------------------------------------------------------------------------- the pinned format (version 2: compact tensors)

def golden_model_v2():
    """Version 1's model plus two compact tensors: one with more outliers than rows (positions
    stored row by row) and one with fewer (flat positions)."""
    cm = golden_model()
    cm.quantized["rows.weight"] = QuantizedTensor.from_codes(
        np.array([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 2]], np.uint8), shape=(2, 6), bits=2,
        codebook=np.array([[-1.5, -0.5, 0.5, 1.5], [-0.125, 0.0, 0.125, 0.25]], np.float32), group_rows=1,
        outlier_index=np.array([1, 4, 5, 8], np.int64), outlier_value=np.array([3.25, -2.5, 0.1, 9.0], np.float32),
        method="gobo", compact=True)
    cm.quantized["flat.weight"] = QuantizedTensor.from_codes(
        np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]], np.uint8), shape=(3, 3), bits=1,
        codebook=np.array([[-0.25, 0.75]], np.float32), group_rows=3,
        outlier_index=np.array([4], np.int64), outlier_value=np.array([-6.5], np.float32), method="gobo", compact=True)
    return cm


#: sha256 of gobo.safetensors for golden_model_v2(); change it only with a new FORMAT_VERSION
GOLDEN_V2_SHA256 = "4698106b3ac259cbcd1db983e8fc7f3af84dd2c781e601d2fb66073f517ebac5"

#: the file itself, as written by format version 2 (3130 bytes)
GOLDEN_V2 = """
cAoAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJnb2JvIiwiZm9ybWF0X3ZlcnNpb24iOiIyIiwiZ29ibyI6Intc
ImNvbmZpZ1wiOiB7XCJkYXRhXCI6IHtcImJpdHNcIjogM30sIFwidHlwZVwiOiBcImRpcmVjdHFcIiwgXCJ2ZXJzaW9uXCI6
IDF9LCBcInBhY2tpbmdcIjogXCJsc2ItYml0c3RyZWFtLXYxXCIsIFwicGF5bG9hZF9zaGEyNTZcIjogXCIwZTVlMDdmOTQz
NDdmZjk0MTJiODY3MzdlYmJiYWMzZGU1YWM0NWNlY2Q5YWI5NDFkOTllZDZlNGQyZDEyMTkzXCIsIFwic291cmNlXCI6IHtc
Im1vZGVsX3R5cGVcIjogXCJiZXJ0XCIsIFwibmFtZVwiOiBcImdvbGRlblwiLCBcIndlaWdodHNfc2hhMjU2XCI6IFwiYWJh
YmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYmFiYWJhYlwifSwgXCJ0ZW5z
b3JzXCI6IHtcImVtYi53ZWlnaHRcIjoge1wiYml0c1wiOiA1LCBcImdyb3VwX3Jvd3NcIjogMSwgXCJtZXRob2RcIjogXCJn
b2JvXCIsIFwic2hhcGVcIjogWzIsIDRdfSwgXCJlbmMud2VpZ2h0XCI6IHtcImJpdHNcIjogMywgXCJncm91cF9yb3dzXCI6
IDMsIFwibWV0aG9kXCI6IFwiZ29ib1wiLCBcInNoYXBlXCI6IFszLCA1XSwgXCJzdGF0c1wiOiB7XCJmcDMyX2J5dGVzXCI6
IDYwLCBcIm5ieXRlc1wiOiA2NiwgXCJvdXRsaWVyX2ZyYWN0aW9uXCI6IDAuMTMzMzMzMzMzMzMzMzMzMzMsIFwic3Fucl9k
YlwiOiAxMi41fX0sIFwiZmxhdC53ZWlnaHRcIjoge1wiYml0c1wiOiAxLCBcImNvbXBhY3RcIjogdHJ1ZSwgXCJncm91cF9y
b3dzXCI6IDMsIFwibWV0aG9kXCI6IFwiZ29ib1wiLCBcInNoYXBlXCI6IFszLCAzXX0sIFwibm9ybS53ZWlnaHRcIjoge1wi
Yml0c1wiOiAyLCBcImdyb3VwX3Jvd3NcIjogNSwgXCJtZXRob2RcIjogXCJnb2JvXCIsIFwic2hhcGVcIjogWzVdfSwgXCJy
b3dzLndlaWdodFwiOiB7XCJiaXRzXCI6IDIsIFwiY29tcGFjdFwiOiB0cnVlLCBcImdyb3VwX3Jvd3NcIjogMSwgXCJtZXRo
b2RcIjogXCJnb2JvXCIsIFwic2hhcGVcIjogWzIsIDZdfX19In0sImQ6cG9zaXRpb25faWRzIjp7ImR0eXBlIjoiSTY0Iiwi
c2hhcGUiOlsxLDRdLCJkYXRhX29mZnNldHMiOlswLDMyXX0sImQ6ZW5jLmJpYXMiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6
WzNdLCJkYXRhX29mZnNldHMiOlszMiw0NF19LCJxOmVtYi53ZWlnaHQ6Y29kZWJvb2siOnsiZHR5cGUiOiJGMzIiLCJzaGFw
ZSI6WzIsMzJdLCJkYXRhX29mZnNldHMiOls0NCwzMDBdfSwicTplbmMud2VpZ2h0OmNvZGVib29rIjp7ImR0eXBlIjoiRjMy
Iiwic2hhcGUiOlsxLDhdLCJkYXRhX29mZnNldHMiOlszMDAsMzMyXX0sInE6ZW5jLndlaWdodDpvdXRsaWVyX3ZhbHVlIjp7
ImR0eXBlIjoiRjMyIiwic2hhcGUiOlsyXSwiZGF0YV9vZmZzZXRzIjpbMzMyLDM0MF19LCJxOmZsYXQud2VpZ2h0Om91dGxp
ZXJfdmFsdWUiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzFdLCJkYXRhX29mZnNldHMiOlszNDAsMzQ0XX0sInE6bm9ybS53
ZWlnaHQ6Y29kZWJvb2siOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzEsNF0sImRhdGFfb2Zmc2V0cyI6WzM0NCwzNjBdfSwi
cTpyb3dzLndlaWdodDpvdXRsaWVyX3ZhbHVlIjp7ImR0eXBlIjoiRjMyIiwic2hhcGUiOls0XSwiZGF0YV9vZmZzZXRzIjpb
MzYwLDM3Nl19LCJxOmVuYy53ZWlnaHQ6b3V0bGllcl9pbmRleCI6eyJkdHlwZSI6IkkzMiIsInNoYXBlIjpbMl0sImRhdGFf
b2Zmc2V0cyI6WzM3NiwzODRdfSwicTpmbGF0LndlaWdodDpvdXRsaWVyX2luZGV4Ijp7ImR0eXBlIjoiSTMyIiwic2hhcGUi
OlsxXSwiZGF0YV9vZmZzZXRzIjpbMzg0LDM4OF19LCJxOmVuYy53ZWlnaHQ6cm93X29mZnNldCI6eyJkdHlwZSI6IkYxNiIs
InNoYXBlIjpbM10sImRhdGFfb2Zmc2V0cyI6WzM4OCwzOTRdfSwicTplbmMud2VpZ2h0OnJvd19zY2FsZSI6eyJkdHlwZSI6
IkYxNiIsInNoYXBlIjpbM10sImRhdGFfb2Zmc2V0cyI6WzM5NCw0MDBdfSwicTpmbGF0LndlaWdodDpjb2RlYm9vayI6eyJk
dHlwZSI6IkYxNiIsInNoYXBlIjpbMSwyXSwiZGF0YV9vZmZzZXRzIjpbNDAwLDQwNF19LCJxOnJvd3Mud2VpZ2h0OmNvZGVi
b29rIjp7ImR0eXBlIjoiRjE2Iiwic2hhcGUiOlsyLDRdLCJkYXRhX29mZnNldHMiOls0MDQsNDIwXX0sInE6cm93cy53ZWln
aHQ6b3V0bGllcl9jb2wiOnsiZHR5cGUiOiJVMTYiLCJzaGFwZSI6WzRdLCJkYXRhX29mZnNldHMiOls0MjAsNDI4XX0sInE6
cm93cy53ZWlnaHQ6b3V0bGllcl9jb3VudCI6eyJkdHlwZSI6IlUxNiIsInNoYXBlIjpbMl0sImRhdGFfb2Zmc2V0cyI6WzQy
OCw0MzJdfSwicTplbWIud2VpZ2h0OmNvZGVzIjp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzVdLCJkYXRhX29mZnNldHMiOls0
MzIsNDM3XX0sInE6ZW5jLndlaWdodDpjb2RlcyI6eyJkdHlwZSI6IlU4Iiwic2hhcGUiOls2XSwiZGF0YV9vZmZzZXRzIjpb
NDM3LDQ0M119LCJxOmZsYXQud2VpZ2h0OmNvZGVzIjp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzJdLCJkYXRhX29mZnNldHMi
Ols0NDMsNDQ1XX0sInE6bm9ybS53ZWlnaHQ6Y29kZXMiOnsiZHR5cGUiOiJVOCIsInNoYXBlIjpbMl0sImRhdGFfb2Zmc2V0
cyI6WzQ0NSw0NDddfSwicTpyb3dzLndlaWdodDpjb2RlcyI6eyJkdHlwZSI6IlU4Iiwic2hhcGUiOlszXSwiZGF0YV9vZmZz
ZXRzIjpbNDQ3LDQ1MF19fQAAAAAAAAAAAQAAAAAAAAACAAAAAAAAAAMAAAAAAAAAAAAAPwAAAL8AAIA/AAAAAAAAAD4AAIA+
AADAPgAAAD8AACA/AABAPwAAYD8AAIA/AACQPwAAoD8AALA/AADAPwAA0D8AAOA/AADwPwAAAEAAAAhAAAAQQAAAGEAAACBA
AAAoQAAAMEAAADhAAABAQAAASEAAAFBAAABYQAAAYEAAAGhAAABwQAAAeEAAAIBAAACEQAAAiEAAAIxAAACQQAAAlEAAAJhA
AACcQAAAoEAAAKRAAACoQAAArEAAALBAAAC0QAAAuEAAALxAAADAQAAAxEAAAMhAAADMQAAA0EAAANRAAADYQAAA3EAAAOBA
AADkQAAA6EAAAOxAAADwQAAA9EAAAPhAAAD8QAAA4L8AAKC/AABAvwAAgL4AAIA+AABAPwAAoD8AAOA/AADwQAAABMEAANDA
AAAAvwAAAAAAAAA/AACAPwAAUEAAACDAzczMPQAAEEECAAAACwAAAAQAAAAAAAA0ALQAPAA4AEAAtAA6AL4AuAA4AD4AsAAA
ADAANAEABAAFAAIAAwABAIAgBinmiMb6iMYa9QBjA+S0sQ==
"""


def test_golden_v2_bytes(tmp_path):
    import safetensors.numpy

    for i in range(2):
        write_compressed(golden_model_v2(), tmp_path / str(i))
        data = (tmp_path / str(i) / WEIGHTS_FILE).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        assert hashlib.sha256(data).hexdigest() == GOLDEN_V2_SHA256, f"format changed; header now:\n{data[8 : 8 + n].decode()}"
    assert data == base64.b64decode(GOLDEN_V2)
    assert _metadata(tmp_path / "0" / WEIGHTS_FILE)["format_version"] == "2"
    arrays = safetensors.numpy.load(data)
    # row by row: 3 outliers in row 0 (columns 1, 4 and 5), 1 in row 1 (column 2)
    np.testing.assert_array_equal(arrays["q:rows.weight:outlier_col"], np.array([1, 4, 5, 2], np.uint16))
    np.testing.assert_array_equal(arrays["q:rows.weight:outlier_count"], np.array([3, 1], np.uint16))
    assert arrays["q:rows.weight:codebook"].dtype == np.float16 and "q:rows.weight:outlier_index" not in arrays
    # one outlier in three rows: flat int32 positions are smaller
    assert arrays["q:flat.weight:outlier_index"].tolist() == [4] and "q:flat.weight:outlier_col" not in arrays
    got = read_compressed(tmp_path / "0")
    sd, want = got.state_dict(), golden_model_v2().state_dict()
    for k, v in want.items():
        assert sd[k].dtype == v.dtype and np.array_equal(sd[k], v), k
    # by hand from the recipe: row 1 of rows.weight is codes 3 2 1 0 3 2 under its own codebook
    assert sd["rows.weight"][0].tolist() == [-1.5, np.float32(3.25), 0.5, 1.5, -2.5, np.float32(0.1)]
    assert sd["rows.weight"][1].tolist() == [0.25, 0.125, 9.0, -0.125, 0.25, 0.125]
    assert sd["flat.weight"].tolist() == [[0.75, -0.25, 0.75], [-0.25, -6.5, 0.75], [0.75, 0.75, -0.25]]
    assert got.quantized["rows.weight"].nbytes() == 3 + 8 * 2 + 4 * 4 + 2 * (4 + 2)
    assert got.quantized["flat.weight"].nbytes() == 2 + 2 * 2 + 4 + 4


def test_golden_v2_file_still_loads(tmp_path):
    d = tmp_path / "v2"
    d.mkdir()
    (d / WEIGHTS_FILE).write_bytes(base64.b64decode(GOLDEN_V2))
    got = read_compressed(d)
    assert got.quantized["rows.weight"].compact and not got.quantized["enc.weight"].compact
    assert got.quantized["rows.weight"].outlier_index.tolist() == [1, 4, 5, 8]
    assert gobo.load_compressed(d).state_dict()["flat.weight"][1, 1] == -6.5


@pytest.mark.parametrize("model, claimed, match", [
    ("golden_model_v2", "1", r"flat.weight is compact, which format version 1 does not allow"),
    ("golden_model_v3", "2", r"grid.weight is a grid tensor, which format versions 1 and 2 do not allow"),
])
def test_tensors_newer_than_the_claimed_version_are_refused(tmp_path, model, claimed, match):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "m"
    write_compressed(globals()[model](), d)
    f = d / WEIGHTS_FILE
    save_file(load_file(str(f)), str(f), metadata={**_metadata(f), "format_version": claimed})
    with pytest.raises(FormatError, match=match):
        read_compressed(d)


def test_compact_fields_are_checked():
    qt = golden_model_v2().quantized["rows.weight"]
    meta, arrays = qt.meta(), qt.to_tensors()
    for change, message in [
        ({"outlier_count": np.array([2, 1], np.uint16)}, "does not add up"),
        ({"outlier_count": np.array([3, 1], np.int32)}, "uint16"),
        ({"outlier_col": np.array([1, 4, 0, 6], np.uint16)}, "outside the tensor"),
        ({"outlier_col": np.array([4, 1, 0, 2], np.uint16)}, "sorted, unique"),
        ({"codebook": arrays["codebook"].astype(np.float32)}, "codebook must be float16"),
        ({"outlier_index": np.array([1, 4, 5, 8], np.int32)}, "stored twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            QuantizedTensor.from_tensors(meta, {**arrays, **change})
    with pytest.raises(ValueError, match="unexpected fields"):  # row-by-row positions need a compact tensor
        QuantizedTensor.from_tensors({**meta, "compact": False}, {**arrays, "codebook": arrays["codebook"].astype(np.float32)})
    with pytest.raises(ValueError, match="float16 numbers"):
        QuantizedTensor(**{**{f: getattr(qt, f) for f in ("shape", "bits", "codes", "group_rows", "outlier_index",
                                                         "outlier_value", "method")},
                           "codebook": np.array([[0.1, 0.2, 0.3, 0.4]] * 2, np.float32), "compact": True})


# ---------------------------------------------------------------------------- the pinned format (version 3: grid tensors)

def golden_model_v3():
    """Version 2's model plus a grid tensor: integer levels -2..1 times a float16 step per row
    and a float16 scale per column, one outlier, the codes entropy coded."""
    cm = golden_model_v2()
    cm.quantized["grid.weight"] = QuantizedTensor.from_codes(
        np.array([[2, 2, 1, 3, 2], [0, 2, 2, 1, 2]], np.uint8), shape=(2, 5), bits=2,
        codebook=np.array([[-2.0, -1.0, 0.0, 1.0]], np.float32), group_rows=2,
        row_scale=np.array([0.5, 0.25], np.float16), col_scale=np.array([1.0, 2.0, 0.5, 1.0, 4.0], np.float16),
        outlier_index=np.array([6], np.int64), outlier_value=np.array([3.0], np.float32),
        method="gobo", compact=True, entropy=True)
    return cm


#: sha256 of gobo.safetensors for golden_model_v3(); change it only with a new FORMAT_VERSION
GOLDEN_V3_SHA256 = "30cd12588b082bb27b003da694728db05c1aa19d6886e87c48be0df145d0398c"


def test_golden_v3_bytes(tmp_path):
    import safetensors.numpy

    for i in range(2):
        write_compressed(golden_model_v3(), tmp_path / str(i))
        data = (tmp_path / str(i) / WEIGHTS_FILE).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        assert hashlib.sha256(data).hexdigest() == GOLDEN_V3_SHA256, f"format changed; header now:\n{data[8 : 8 + n].decode()}"
    assert _metadata(tmp_path / "0" / WEIGHTS_FILE)["format_version"] == "3"
    arrays = safetensors.numpy.load(data)
    # the codes 2 2 1 3 2 0 2 2 1 2 as one rANS lane: its state, then the renormalisation bytes
    assert arrays["q:grid.weight:code_freq"].tolist() == [1638, 3277, 9831, 1638]  # counts 1, 2, 6, 1 of 10
    assert arrays["q:grid.weight:codes"].tobytes().hex() == GOLDEN_V3_STREAM
    assert arrays["q:grid.weight:col_scale"].dtype == np.float16
    got = read_compressed(tmp_path / "0")
    sd, want = got.state_dict(), golden_model_v3().state_dict()
    for k, v in want.items():
        assert sd[k].dtype == v.dtype and np.array_equal(sd[k], v), k
    # by hand: level x row step, the outlier (row 1, column 1) in place, then x column scale
    assert sd["grid.weight"].tolist() == [[0.0, 0.0, -0.25, 0.5, 0.0], [-0.5, 6.0, 0.0, -0.25, 0.0]]
    qt = got.quantized["grid.weight"]
    assert qt.entropy and qt.nbytes() == len(GOLDEN_V3_STREAM) // 2 + 8 + 4 * 2 + 4 + 4 + 2 * 2 + 5 * 2


GOLDEN_V3_STREAM = "d75eb0680d"


def test_a_damaged_stream_is_refused_even_with_a_matching_checksum(tmp_path):
    from safetensors.numpy import load_file, save_file

    from gobo.io import _payload_digest

    d = tmp_path / "v3"
    write_compressed(golden_model_v3(), d)
    f = d / WEIGHTS_FILE
    arrays, meta = load_file(str(f)), _metadata(f)
    arrays["q:grid.weight:codes"] = arrays["q:grid.weight:codes"][:-1].copy()  # one byte short
    header = json.loads(meta["gobo"])
    header["payload_sha256"] = _payload_digest(arrays)  # as a buggy writer would have made it
    save_file(arrays, str(f), metadata={**meta, "gobo": json.dumps(header)})
    with pytest.raises(FormatError, match="grid.weight is invalid.*entropy-coded stream"):
        read_compressed(d)
