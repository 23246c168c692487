"""vocab.txt, read in one place (paddlerec/vocab.py) for the reader and for an export's copy."""

import pytest

from paddlerec.errors import CheckpointError, DataError
from paddlerec.vocab import read_vocab


@pytest.mark.parametrize("content,problem", [
    (b"", "the vocab is empty"),
    (b"214500001\n\n214500002\n", ":2: empty line in the vocab"),
    (b"214500001\n214500002\n214500001\n", ":3: item '214500001' appears twice (first on line 1)"),
    (b"2145\xff\n", "the vocab is not UTF-8 text"),
])
def test_a_bad_vocab_is_one_error_naming_the_file_and_line(tmp_path, content, problem):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        read_vocab(str(path))
    assert str(caught.value).startswith(str(path)) and problem in str(caught.value), str(caught.value)
    assert "data/text2paddle.py" in str(caught.value)
    # an export's copy: the caller picks the error class and the advice
    with pytest.raises(CheckpointError, match="export the model again"):
        read_vocab(str(path), CheckpointError, "export the model again")


def test_a_vocab_reads_as_labels_in_model_id_order(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("214500001\r\n214500002\n7\n", newline="")
    assert read_vocab(str(path)) == ["214500001", "214500002", "7"]
    with pytest.raises(DataError, match="cannot read the vocab"):
        read_vocab(str(tmp_path / "missing.txt"))


def test_a_byte_order_mark_is_not_part_of_the_first_label(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes("\ufeff214500001\n214500002\n".encode("utf-8"))
    assert read_vocab(str(path)) == ["214500001", "214500002"]
