"""vocab.txt: the original item id of each model id, one per line (line n, 0-based, is model id n).

data/text2paddle.py writes it next to the data; an inference export carries a copy. Both are
read here, each caller choosing the error class a bad file raises (a data error for the
reader, a checkpoint error for a damaged export) and the advice that ends the message.
"""

from typing import Callable, List

from .errors import DataError, UserError


def read_vocab(path: str, error: Callable[[str], UserError] = DataError,
               advice: str = "rebuild it with data/text2paddle.py") -> List[str]:
    """The labels, in model-id order. Raises error(message) naming the file (and line) for an
    unreadable file, an empty one, an empty line or a label that appears twice."""

    def fail(problem, line=None):
        where = f"{path}:{line}" if line is not None else path
        return error(f"{where}: {problem}; {advice}")

    try:
        # utf-8-sig: a byte-order mark some editors write is not part of the first label
        with open(path, encoding="utf-8-sig") as f:
            labels = [line.rstrip("\r\n") for line in f]
    except OSError as exc:
        raise fail(f"cannot read the vocab: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise fail("the vocab is not UTF-8 text") from None
    first_line = {}
    for number, label in enumerate(labels, start=1):
        if not label.strip():
            raise fail("empty line in the vocab (one item id per line expected)", number)
        if label in first_line:
            raise fail(f"item {label!r} appears twice (first on line {first_line[label]})", number)
        first_line[label] = number
    if not labels:
        raise fail("the vocab is empty")
    return labels
