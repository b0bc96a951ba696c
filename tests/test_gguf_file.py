"""fdrl.models.gguf_file reads what the `gguf` package writes, as the package's own reader
reads it: every metadata value and every tensor's bytes, layout and type."""

import gguf
import numpy as np
import pytest

from fdrl.models import gguf_file

_RNG = np.random.default_rng(0)
_TENSORS = {  # name: (float values, stored type)
    "f32": (_RNG.standard_normal((3, 5)).astype(np.float32), gguf.GGMLQuantizationType.F32),
    "f16": (_RNG.standard_normal((2, 4)).astype(np.float32), gguf.GGMLQuantizationType.F16),
    "q8": (_RNG.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
    "q4_1": (_RNG.standard_normal((2, 3, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1),
    "vector": (_RNG.standard_normal(7).astype(np.float32), gguf.GGMLQuantizationType.F32),
}


def _write(path, alignment=None, endianess=gguf.GGUFEndian.LITTLE):
    writer = gguf.GGUFWriter(str(path), arch="llama", endianess=endianess)
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_string("text", "naïve café 🙂")
    writer.add_string("empty", "")
    writer.add_uint8("u8", 250)
    writer.add_int8("i8", -7)
    writer.add_uint16("u16", 65000)
    writer.add_int16("i16", -30000)
    writer.add_uint32("u32", 4_000_000_000)
    writer.add_int32("i32", -2_000_000_000)
    writer.add_uint64("u64", 2**63 + 5)
    writer.add_int64("i64", -(2**62))
    writer.add_float32("f32", 0.1)
    writer.add_float64("f64", 1e-300)
    writer.add_bool("yes", True)
    writer.add_array("tokens", ["a", "", "Ġb", "<|im_end|>", "日本"])
    writer.add_array("token_types", [1, 3, 1, 3, 1])
    writer.add_array("scores", [0.5, -1.25])
    writer.add_array("flags", [True, False, True])
    writer.add_array("nested", [[1, 2], [3]])
    for name, (values, kind) in _TENSORS.items():
        if kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        elif kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _read_both(path):
    """(ours, the gguf package's metadata values) for the file at `path`, after checking that
    both readers give the same tensors: names and order, types, shapes, data layout and bytes."""
    ours, theirs = gguf_file.read_gguf(str(path)), gguf.GGUFReader(str(path))
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == ref.tensor_type and mine.shape == tuple(reversed(ref.shape.tolist())), mine.name
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape, mine.name
        np.testing.assert_array_equal(mine.data, ref.data)
    return ours, {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_what_the_gguf_package_reads(tmp_path, alignment):
    ours, expected = _read_both(_write(tmp_path / "m.gguf", alignment))
    # The package's contents() flattens an array of arrays ([1, 2, 3]); ours keeps what was written.
    assert expected.pop("nested") == [1, 2, 3] and ours.metadata.pop("nested") == [[1, 2], [3]]
    assert ours.metadata == expected and ours.version == 3
    assert {k: type(v) for k, v in ours.metadata.items()} == {k: type(v) for k, v in expected.items()}
    assert ours.metadata["text"] == "naïve café 🙂" and ours.metadata["u64"] == 2**63 + 5
    assert ours.metadata["flags"] == [True, False, True] and ours.metadata["general.architecture"] == "llama"
    assert [t.name for t in ours.tensors] == list(_TENSORS)
    for mine in ours.tensors:
        values, kind = _TENSORS[mine.name]
        assert mine.shape == values.shape
        if kind == gguf.GGMLQuantizationType.F32:
            exact = values
        elif kind == gguf.GGMLQuantizationType.F16:
            exact = values.astype(np.float16).astype(np.float32)
        else:
            exact = gguf.dequantize(gguf.quants.quantize(values, kind), kind)
        np.testing.assert_array_equal(np.asarray(gguf.dequantize(mine.data, kind)).reshape(values.shape), exact)


@pytest.mark.slow
def test_smollm2_file_reads_as_the_gguf_package_reads_it():
    from fdrl.models import gguf_loader

    ours, expected = _read_both(gguf_loader.find_smollm2_gguf())
    assert ours.metadata == expected
    assert len(ours.metadata["tokenizer.ggml.merges"]) > 40_000


def test_bad_files_are_named(tmp_path):
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match=r"weights.bin is not a GGUF file: it starts with b'PK"):
        gguf_file.read_gguf(str(not_gguf))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.gguf is not a GGUF file: it starts with b''"):
        gguf_file.read_gguf(str(empty))
    whole = _write(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:200])  # inside the metadata
    with pytest.raises(ValueError, match="cut.gguf.*(ends inside its GGUF header|runs past the end)"):
        gguf_file.read_gguf(str(cut))
    at = whole.index(b"token_types") + len(b"token_types") + 12 + 8  # inside the array of 5 numbers
    cut.write_bytes(whole[:at])
    with pytest.raises(ValueError, match="cut.gguf: an array of 5 numbers at offset .* runs past the end"):
        gguf_file.read_gguf(str(cut))
    cut.write_bytes(whole[:-8])  # inside the last tensor's data
    with pytest.raises(ValueError, match="cut.gguf: tensor 'vector' runs past the end of the file"):
        gguf_file.read_gguf(str(cut))
    big = _write(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ValueError, match="big.gguf is a big-endian GGUF file"):
        gguf_file.read_gguf(str(big))
