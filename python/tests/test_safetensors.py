import struct

import pytest
from conftest import make_model, minilm_path

from memwarden import safetensors_io as st


def test_generated_file_reads_back_exactly(tmp_path):
    p = tmp_path / "m.safetensors"
    tensors = make_model(p, 3)
    h = st.read_header(str(p))
    assert h.metadata == {"format": "pt"}
    assert {t.name for t in h.tensors} == set(tensors)
    assert h.tensor_bytes == sum(len(b) for _, _, b in tensors.values())
    buf = st.read_data(str(p), h)
    try:
        for t in h.tensors:
            dtype, shape, data = tensors[t.name]
            assert (t.dtype, t.shape) == (dtype, shape)
            assert buf[t.begin : t.end] == data
    finally:
        buf.close()


def corrupt(tmp_path, header: bytes, body: bytes = b""):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return str(p)


@pytest.mark.parametrize(
    "header,body,msg",
    [
        (b"not json", b"", "not JSON"),
        (b'{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "unknown dtype"),
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4, "do not fit"),
        (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 4, "past the end"),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}', b"\0" * 8, "overlap"),
        (b'{"a":{"dtype":"F32"}}', b"", "lacks"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path, header, body, msg):
    with pytest.raises(st.SafetensorsError, match=msg):
        st.read_header(corrupt(tmp_path, header, body))


def test_header_length_beyond_the_file_is_refused(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(st.SafetensorsError, match="impossible"):
        st.read_header(str(p))


def test_real_minilm_weights_parse():
    h = st.read_header(minilm_path())
    # sentence-transformers/all-MiniLM-L6-v2: 6 BERT layers, 384 wide, 30522-token vocabulary.
    names = {t.name for t in h.tensors}
    assert "embeddings.word_embeddings.weight" in names
    emb = next(t for t in h.tensors if t.name == "embeddings.word_embeddings.weight")
    assert emb.shape == (30522, 384) and emb.dtype == "F32"
    assert 85 << 20 < h.tensor_bytes < 90 << 20
