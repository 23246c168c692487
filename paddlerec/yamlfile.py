"""Reading YAML text strictly: what `paddlerec.run`, `paddlerec.serve` and `data_prepare.sh --config`
all load their config through.

Beyond PyYAML's safe loader this refuses, each with one message naming the line:
  * bytes that are not UTF-8 (a UTF-8 byte-order mark is accepted);
  * a key written twice in one mapping (PyYAML keeps the last silently);
  * aliases that expand to a huge document ("billion laughs") or refer to themselves: the
    composed graph is measured before anything walks it, so either fails in milliseconds;
  * nesting deep enough to exhaust Python's stack.
It also reads `1e-3` as a number (PyYAML follows YAML 1.1, where only `1.0e-3` is a float).

Only the standard library and PyYAML: the data/ scripts use this module and must start fast.
"""

import re

import yaml

MAX_BYTES = 10 * 2**20  # a config is a few kB; past this it is not one
# nodes the document would have with every alias written out; the repository's config has ~300
MAX_EXPANDED_NODES = 100_000


class YamlProblem(ValueError):
    """The text is not a config we read; `line` is 1-based when known. Callers turn it into their
    own one-line error (ConfigError, the data scripts' DataError)."""

    def __init__(self, message, line=None):
        super().__init__(message)
        self.line = line


def _line(mark):
    return mark.line + 1 if mark is not None else None


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with duplicate keys refused and the alias expansion measured before construction."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    continue
                if first is not None:
                    raise YamlProblem(f"key {key!r} appears twice in one mapping (first on line {first}); "
                                      f"keep one", _line(key_node.start_mark))
                seen[key] = _line(key_node.start_mark) or 0
        return super().construct_mapping(node, deep=deep)

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        measure(node)
        return self.construct_document(node)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def measure(root):
    """Raise YamlProblem when the node graph has a cycle (a recursive alias) or would expand to more
    than MAX_EXPANDED_NODES nodes. Shared nodes (aliases) are counted once per use, each visited once."""
    sizes = {}
    on_path = set()

    def size(node):
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise YamlProblem("an alias refers to a node that contains it (a recursive alias); "
                              "write the value out", _line(node.start_mark))
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_NODES:
                raise YamlProblem(f"the aliases expand to more than {MAX_EXPANDED_NODES:,} values; a config is far "
                                  f"smaller, so this looks like an alias bomb", _line(node.start_mark))
        on_path.discard(key)
        sizes[key] = total
        return total

    size(root)


def load_text(text):
    """Parse YAML text strictly; raises YamlProblem (never a YAMLError or RecursionError)."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YamlProblem(f"YAML syntax error: {problem}; fix the file", _line(mark)) from None
    except RecursionError:
        raise YamlProblem("the YAML is nested too deeply to be a config") from None


def decode(data):
    """UTF-8 bytes (an optional byte-order mark dropped) -> text; YamlProblem naming the line otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise YamlProblem(f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8", line) from None


def load_file(path):
    """The parsed content of a YAML file. Raises OSError when unreadable, YamlProblem when not a
    config we read."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise YamlProblem(f"larger than {MAX_BYTES // 2**20} MB, which no config is; pass the config file")
    return load_text(decode(data))
