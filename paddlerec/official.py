"""The official GRU4Rec's parameters in this project's config: `python -m paddlerec.official`.

    python -m paddlerec.official "layers=224,batch_size=80,loss=bpr-max,elu_param=0.5,n_epochs=10"
    python -m paddlerec.official --file paramfiles/retailrocket_bprmax_shared_best.py

prints the `-o KEY=VALUE` overrides of `python -m paddlerec.run` that set what the official
run.py's `-ps` parameter string (or `-pf` parameter file) sets, on one line, unquoted for `$(...)`:

    python -m paddlerec.run -m config.yaml $(python -m paddlerec.official "layers=100,...")

Official keys and this project's keys are declared once, in OFFICIAL_KEYS (README's table
lists the same). Settings the official PyTorch code removed are accepted at the value this
project always uses (e.g. hidden_act=tanh) and refused otherwise.
"""

import argparse
import ast
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import UserError


class OfficialParamError(UserError):
    """An official parameter string or file that cannot be expressed in this config."""

    exit_code = 2
    prefix = "error"


# what a converted value is written as: the key templates take the train runner and dataset names
TRAIN_RUNNER = "{train_runner}"
TRAIN_DATASET = "{train_dataset}"


@dataclass(frozen=True)
class OfficialKey:
    name: str  # the official key (run.py -ps / paramfile)
    target: str  # this project's key (a template: {train_runner}, {train_dataset})
    kind: str  # int | float | bool | str | layers | embedding
    default: object  # the official PyTorch code's default
    note: str = ""


OFFICIAL_KEYS: Tuple[OfficialKey, ...] = (
    OfficialKey("loss", "hyper_parameters.loss", "str", "cross-entropy", "cross-entropy, bpr-max (and top1-max of "
                                                                         "the original Theano code)"),
    OfficialKey("constrained_embedding", "hyper_parameters.embedding", "bool", True,
                "True: `embedding: shared`; False: `separate` (with `embedding` > 0) or `none`"),
    OfficialKey("embedding", "hyper_parameters.embedding_size", "embedding", 0,
                "size of the separate embedding (`layersize`: the first layer's); used when constrained_embedding is False"),
    OfficialKey("elu_param", "hyper_parameters.elu_param", "float", 0.5),
    OfficialKey("layers", "hyper_parameters.layers", "layers", [100], "`200/200` is `[200, 200]`"),
    OfficialKey("n_epochs", f"runner.{TRAIN_RUNNER}.epochs", "int", 10),
    OfficialKey("batch_size", f"dataset.{TRAIN_DATASET}.batch_size", "int", 64, "the training phase's dataset"),
    OfficialKey("dropout_p_embed", "hyper_parameters.dropout_embed", "float", 0.0),
    OfficialKey("dropout_p_hidden", "hyper_parameters.dropout_hidden", "float", 0.0),
    OfficialKey("learning_rate", "hyper_parameters.optimizer.learning_rate", "float", 0.05,
                "Adagrad (`optimizer.class: adagrad`)"),
    OfficialKey("momentum", "hyper_parameters.optimizer.momentum", "float", 0.0),
    OfficialKey("n_sample", "hyper_parameters.n_sample", "int", 2048),
    OfficialKey("sample_alpha", "hyper_parameters.sample_alpha", "float", 0.5),
    OfficialKey("bpreg", "hyper_parameters.bpreg", "float", 1.0),
    OfficialKey("logq", "hyper_parameters.logq", "float", 0.0),
)

# Settings of the original Theano code that the official PyTorch code removed: the value this
# project (like the PyTorch code) always uses. Any other value has no counterpart here.
FIXED_SETTINGS: Dict[str, object] = {
    "hidden_act": "tanh",
    "lmbd": 0.0,
    "smoothing": 0.0,
    "adapt": "adagrad",
    "grad_cap": 0.0,
    "sigma": 0.0,
    "init_as_normal": False,
    "train_random_order": False,
    "time_sort": True,
    "reset_after_session": True,
}
FINAL_ACT = "final_act"  # the Theano code's output activation: softmax (cross-entropy), elu-<alpha> or linear
LOSSES = ("cross-entropy", "bpr-max", "top1-max")
BY_NAME = {k.name: k for k in OFFICIAL_KEYS}


def _parse_bool(text, key):
    if isinstance(text, bool):
        return text
    if str(text) in ("True", "1"):
        return True
    if str(text) in ("False", "0"):
        return False
    raise OfficialParamError(f"{key}={text}: expected True or False")


def _parse(value, kind, key):
    """An official value (a string from -ps, or a Python value from a paramfile) as this config takes it."""
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            return _parse_bool(value, key)
        if kind == "layers":
            if isinstance(value, (list, tuple)):
                sizes = [int(v) for v in value]
            elif isinstance(value, int) and not isinstance(value, bool):
                sizes = [value]
            else:
                sizes = [int(v) for v in str(value).split("/")]
            if not sizes or min(sizes) < 1:
                raise ValueError
            return sizes
        if kind == "embedding":
            if str(value) == "layersize":
                return "layersize"
            number = int(value)
            if number < 0:
                raise ValueError
            return number
        return str(value).strip()
    except (TypeError, ValueError):
        expected = {"int": "an int", "float": "a number", "layers": "layer sizes like 100 or 200/200",
                    "embedding": "an int >= 0 or layersize"}.get(kind, kind)
        raise OfficialParamError(f"{key}={value}: expected {expected}") from None


def parse_parameter_string(text: str) -> List[Tuple[str, object]]:
    """`k1=v1,k2=v2` (run.py -ps) -> [(k1, "v1"), ...], in order."""
    pairs = []
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise OfficialParamError(f"{part!r} is not NAME=VALUE; a parameter string is like "
                                     f"layers=100,batch_size=32,loss=cross-entropy")
        pairs.append((key.strip(), value.strip()))
    if not pairs:
        raise OfficialParamError("the parameter string is empty; pass e.g. layers=100,batch_size=32")
    return pairs


def read_parameter_file(path: str) -> List[Tuple[str, object]]:
    """The `gru4rec_params` of an official paramfile (run.py -pf), read without running it: the
    file must assign a literal OrderedDict([...]) or dict to gru4rec_params."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except OSError as exc:
        raise OfficialParamError(f"--file: cannot read {path}: {exc.strerror}") from None
    except SyntaxError as exc:
        raise OfficialParamError(f"--file: {path}:{exc.lineno}: not Python: {exc.msg}") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "gru4rec_params" for t in node.targets):
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) in ("OrderedDict", "dict") \
                    and len(value.args) == 1:
                value = value.args[0]
            try:
                literal = ast.literal_eval(value)
            except ValueError:
                break
            items = list(literal.items()) if isinstance(literal, dict) else literal
            if isinstance(items, (list, tuple)) and all(isinstance(i, tuple) and len(i) == 2 for i in items):
                return [(str(k), v) for k, v in items]
            break
    raise OfficialParamError(f"--file: {path} assigns no literal gru4rec_params = OrderedDict([(name, value), ...])")


def overrides(pairs: Sequence[Tuple[str, object]], train_runner="cpu_train_runner", train_dataset="dataset_train",
              with_defaults=False) -> List[str]:
    """The `KEY=VALUE` overrides that set what the official parameters set.

    with_defaults: also set the official defaults of the keys the parameters leave out (the
    official code starts from its defaults, the config from its own values)."""
    values: Dict[str, object] = {}
    order: List[str] = []
    elu_from_final_act: Optional[float] = None
    for key, raw in pairs:
        if key in BY_NAME:
            if key in values:
                raise OfficialParamError(f"{key} is given twice; keep one")
            values[key] = _parse(raw, BY_NAME[key].kind, key)
            order.append(key)
        elif key == FINAL_ACT:
            elu_from_final_act = _final_act(str(raw))
        elif key in FIXED_SETTINGS:
            fixed = FIXED_SETTINGS[key]
            kind = {bool: "bool", float: "float", str: "str"}[type(fixed)]
            if _parse(raw, kind, key) != fixed:
                raise OfficialParamError(f"{key}={raw} has no counterpart here: like the official PyTorch GRU4Rec, "
                                         f"this project always uses {key}={fixed}; drop it")
        else:
            known = sorted(list(BY_NAME) + list(FIXED_SETTINGS) + [FINAL_ACT])
            raise OfficialParamError(f"{key} is not an official GRU4Rec parameter; known: {', '.join(known)}")
    if "loss" in values and values["loss"] not in LOSSES:
        raise OfficialParamError(f"loss={values['loss']}: this model trains {', '.join(LOSSES)}")
    if elu_from_final_act is not None:
        if "elu_param" in values and values["elu_param"] != elu_from_final_act:
            raise OfficialParamError("final_act and elu_param disagree; keep one")
        if "elu_param" not in values:
            values["elu_param"] = elu_from_final_act
            order.append("elu_param")
    if with_defaults:
        for key in OFFICIAL_KEYS:
            if key.name not in values:
                values[key.name] = key.default
                order.append(key.name)
    names = {"train_runner": train_runner, "train_dataset": train_dataset}
    out = []
    for key in order:
        if key in ("constrained_embedding", "embedding"):
            if "hyper_parameters.embedding" not in {o.partition("=")[0] for o in out}:
                out += _embedding(values)
            continue
        out.append(f"{BY_NAME[key].target.format(**names)}={_yaml(values[key])}")
    return out


def _final_act(text):
    if text == "softmax":
        return None  # the cross-entropy output; nothing to set
    if text == "linear":
        return 0.0
    if text.startswith("elu-"):
        return _parse(text[4:], "float", FINAL_ACT)
    raise OfficialParamError(f"final_act={text}: this model's outputs are softmax (cross-entropy), elu-<alpha> or "
                             f"linear (bpr-max, top1-max)")


def _embedding(values):
    """constrained_embedding and embedding together decide the embedding mode (official defaults: True, 0)."""
    constrained = values.get("constrained_embedding", True)
    size = values.get("embedding", 0)
    if constrained:  # the official code ignores `embedding` when the embedding is constrained (shared)
        return ["hyper_parameters.embedding=shared"]
    if size == 0:
        return ["hyper_parameters.embedding=none"]
    if size == "layersize":  # the first layer's size, this model's default for embedding_size 0
        return ["hyper_parameters.embedding=separate", "hyper_parameters.embedding_size=0"]
    return ["hyper_parameters.embedding=separate", f"hyper_parameters.embedding_size={size}"]


def _yaml(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def _official(value):
    """A value as an official parameter string spells it."""
    if isinstance(value, list):
        return "/".join(str(v) for v in value)
    return str(value)


def mapping_table() -> str:
    """README's table of the official parameters (-ps keys and paramfile entries)."""
    rows = ["| official parameter (`-ps` key) | this project's key | official default | note |", "|---|---|---|---|"]
    for key in OFFICIAL_KEYS:
        target = key.target.replace(TRAIN_RUNNER, "<train runner>").replace(TRAIN_DATASET, "<train dataset>")
        if key.name == "constrained_embedding":
            target = "hyper_parameters.embedding"
        rows.append(f"| `{key.name}` | `{target}` | `{_official(key.default)}` | {key.note} |")
    rows.append(f"| `{FINAL_ACT}` (Theano) | `hyper_parameters.elu_param` | | `elu-A`: A; `linear`: 0; `softmax`: "
                f"nothing (cross-entropy) |")
    fixed = ", ".join(f"`{k}={_official(v)}`" for k, v in FIXED_SETTINGS.items())
    rows.append(f"| removed by the PyTorch code | (none) | | accepted only as {fixed} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m paddlerec.official",
                                     description="Print the config overrides (-o KEY=VALUE) that set what an official "
                                                 "GRU4Rec parameter string or parameter file sets.")
    parser.add_argument("param_string", nargs="?", metavar="PARAM_STRING",
                        help="as run.py -ps takes it: name1=value1,name2=value2 (lists: layers=200/200)")
    parser.add_argument("--file", metavar="PARAMFILE", help="an official parameter file (run.py -pf) instead")
    parser.add_argument("--train-runner", default="cpu_train_runner", help="runner whose epochs n_epochs sets "
                                                                            "(default: cpu_train_runner)")
    parser.add_argument("--train-dataset", default="dataset_train", help="dataset whose batch_size batch_size sets "
                                                                         "(default: dataset_train)")
    parser.add_argument("--defaults", action="store_true",
                        help="also set the official defaults of the parameters left out (as run.py would use them)")
    parser.add_argument("--lines", action="store_true", help="one KEY=VALUE per line, without -o")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if (args.param_string is None) == (args.file is None):
            raise OfficialParamError("pass a parameter string or --file PARAMFILE (one of them)")
        pairs = read_parameter_file(args.file) if args.file else parse_parameter_string(args.param_string)
        result = overrides(pairs, args.train_runner, args.train_dataset, args.defaults)
    except UserError as exc:
        print(f"{exc.prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.lines:
        print("\n".join(result))
    else:
        # unquoted, for $(...): its words are not re-parsed by the shell, and no value holds a space
        print(" ".join(f"-o {o}" for o in result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
