"""The inference export: its schema, and writing, reading and verifying it.

`<root>/<epoch>/` holds
    model.json       the step program (PIR, paddle.jit.save): one click per row in, top-K and
                     the next state out
    model.pdiparams  its weights
    vocab.txt        original item id of each model id (line i = model id i), when known
    io.json          what the above are: inputs and outputs (names, dtypes, shapes, meaning),
                     the zero initial state, n_items, topk, the training config, a fingerprint
                     of the training data, and each file's size and sha256 — written last
    model.onnx       only after `python -m paddlerec.export FOLDER --onnx` (optional extra)

Written into a hidden temporary folder and renamed into place when complete (see
files.atomic_folder); a folder without io.json is never picked up. A reader checks every
file against io.json's sizes and digests, so a damaged or incomplete copy is refused with one
line instead of serving garbage.

    python -m paddlerec.export FOLDER            check an export and describe it
    python -m paddlerec.export FOLDER --onnx     also write model.onnx (needs requirements-onnx.txt)

This module imports neither paddle nor the model at import time: the server and the config
tools read exports without the training code.
"""

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from .errors import CheckpointError, PluginError, UserError
from .files import atomic_folder, file_digest, save_error
from .vocab import read_vocab

log = logging.getLogger(__name__)

FORMAT = 2  # 2: io.json describes dtypes/shapes and lists the files with their sha256
IO = "io.json"
PROGRAM = "model.json"
PARAMS = "model.pdiparams"
VOCAB = "vocab.txt"
ONNX = "model.onnx"
REQUIRED_FILES = (PROGRAM, PARAMS)

# The step's interface. exclude_ids lets a caller drop items per row (e.g. those the session
# already clicked) from the top-K: the model scores every item, so only it can rank the K best
# of the rest; padding entries hold n_items.
INPUTS = ("item_ids", "hidden", "exclude_ids")
OUTPUTS = ("topk_ids", "topk_scores", "next_hidden")

INITIAL_STATE = ("a new session starts from hidden = zeros [1, hidden_size] float32; each click's next_hidden "
                 "is the hidden of the session's next click")


def describe_io(n_items, hidden_size, topk):
    """io.json's "inputs" and "outputs": name, dtype, shape (-1: any size) and meaning, in order."""
    inputs = [
        dict(name="item_ids", dtype="int64", shape=[-1],
             meaning="the clicked item of each row, as a model id (line number in vocab.txt, from 0)"),
        dict(name="hidden", dtype="float32", shape=[-1, hidden_size],
             meaning="each row's session state before this click: zeros at its first click, else the "
                     "next_hidden of its previous click"),
        dict(name="exclude_ids", dtype="int64", shape=[-1, -1],
             meaning=f"model ids never to return, per row (e.g. the session's clicks so far); pad with "
                     f"{n_items} (n_items); at least one column (all padding: exclude nothing)"),
    ]
    outputs = [
        dict(name="topk_ids", dtype="int64", shape=[-1, topk],
             meaning="model ids of the best next items, best first; items never clicked in training and "
                     "excluded ones score -inf and come last"),
        dict(name="topk_scores", dtype="float32", shape=[-1, topk], meaning="their scores (logits)"),
        dict(name="next_hidden", dtype="float32", shape=[-1, hidden_size],
             meaning="the session state after this click: feed it as hidden with the session's next click"),
    ]
    return inputs, outputs


# ---- writing -----------------------------------------------------------------------------------

def write_export(root, epoch, model, topk, labels, training=None, data=None):
    """Write inference model `<root>/<epoch>` and return its folder.

    training: JSON-able description of the run (hyper_parameters, config path, runner, ...),
    recorded as io.json's "training". data: the training data's contract.DataInfo; its
    fingerprint (events per item, vocab) is recorded as io.json's "data".
    """
    def fill(tmp):
        prefix = os.path.join(tmp, "model")
        io = _save_program(model, prefix, topk)
        _name_outputs(os.path.join(tmp, PROGRAM), list(OUTPUTS))
        files = list(REQUIRED_FILES)
        if labels is not None:
            with open(os.path.join(tmp, VOCAB), "w", encoding="utf-8") as f:
                f.write("\n".join(labels) + "\n")
            files.append(VOCAB)
        n_items, hidden_size, k = int(io["n_items"]), int(io["hidden_size"]), int(io["topk"])
        inputs, outputs = describe_io(n_items, hidden_size, k)
        _check_loads(tmp, n_items, inputs, outputs)
        import paddle

        description = dict(
            format=FORMAT, epoch=int(epoch), n_items=n_items, topk=k, hidden_size=hidden_size,
            layers=[int(size) for size in io.get("layers", [hidden_size])],
            unseen_items=[int(i) for i in io.get("unseen_items", [])],
            vocab=VOCAB if labels is not None else "", padding_id=n_items,
            inputs=inputs, outputs=outputs, initial_state=INITIAL_STATE,
            training=training or {}, data=data_fingerprint(data) if data is not None else {},
            paddle_version=paddle.__version__, written_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            files={name: file_digest(os.path.join(tmp, name)) for name in files})
        write_json(os.path.join(tmp, IO), description)
    try:
        return atomic_folder(root, str(epoch), fill)
    except OSError as exc:
        raise save_error(os.path.join(root, str(epoch)), exc, ". Earlier inference models are untouched.") from None


def _save_program(model, path_prefix, topk):
    """The model's export (contract: Model.export) with the INPUTS interface; returns what
    io.json needs to know of the network (n_items, hidden_size, topk, layers, unseen_items)."""
    with warnings.catch_warnings():
        # Paddle 3.3's static conversion warns about its own tensors' `place` while tracing: noise to a user
        warnings.filterwarnings("ignore", message="Tensor do not have 'place' interface")
        description = model.export(path_prefix, topk)
    if tuple(description.get("inputs", ())) != INPUTS:
        module = sys.modules.get(type(model).__module__)
        raise PluginError(f"{getattr(module, '__file__', type(model).__module__)}: Model.export must write a step "
                          f"taking {list(INPUTS)}; it wrote one taking {description.get('inputs')}")
    return description


def _name_outputs(program_path, names):
    """Name the saved program's outputs.

    Paddle 3.3 calls them fetch_name_0..N (it can name only persistable values, which a
    step's outputs are not), which a user of `paddle.inference` would have to guess. The name
    is an attribute of each fetch op: set it through the PIR API and serialise the program
    again. Should that API move, the program stays as Paddle wrote it (io.json still gives the
    order, and the server maps fetch_name_<i> by position).
    """
    import paddle

    try:
        program = paddle.static.Program()
        trainable = paddle.base.core.deserialize_pir_program(program_path, program)
        fetches = sorted((op for op in program.global_block().ops if op.name() == "pd_op.fetch"),
                         key=lambda op: op.attrs()["col"])
        if len(fetches) != len(names):
            raise ValueError(f"{len(fetches)} fetch ops for {len(names)} outputs")
        for op, name in zip(fetches, names):
            op.set_str_attr("name", name)
        paddle.base.core.serialize_pir_program(program, program_path, True, False, trainable)
    except (AttributeError, ValueError, RuntimeError, TypeError) as exc:
        log.warning("%s: outputs keep Paddle's names fetch_name_<i> (%s: %s); io.json gives their order",
                    program_path, type(exc).__name__, exc)


def _check_loads(folder, n_items, inputs, outputs):
    """Load what was just written with paddle.inference and run two rows: the program must take
    and give what io.json will say. A mismatch is a bug in the model file's export."""
    from paddle import inference

    config = inference.Config(os.path.join(folder, PROGRAM), os.path.join(folder, PARAMS))
    config.disable_glog_info()
    config.disable_gpu()
    predictor = inference.create_predictor(config)
    if predictor.get_input_names() != [spec["name"] for spec in inputs]:
        raise RuntimeError(f"the exported step takes {predictor.get_input_names()}, not {list(INPUTS)}")
    hidden_size = inputs[1]["shape"][1]
    feed = {"item_ids": np.zeros(2, np.int64), "hidden": np.zeros((2, hidden_size), np.float32),
            "exclude_ids": np.full((2, 1), n_items, np.int64)}
    for name, value in feed.items():
        predictor.get_input_handle(name).copy_from_cpu(value)
    predictor.run()
    names = predictor.get_output_names()
    if names != list(OUTPUTS) and names != [f"fetch_name_{i}" for i in range(len(OUTPUTS))]:
        raise RuntimeError(f"the exported step gives {names}, not {list(OUTPUTS)}")
    for name, spec in zip(names, outputs):
        value = predictor.get_output_handle(name).copy_to_cpu()
        expected = [2] + spec["shape"][1:]
        if str(value.dtype) != spec["dtype"] or list(value.shape) != expected:
            raise RuntimeError(f"the exported step's {spec['name']} is {value.dtype} {list(value.shape)}, "
                               f"not {spec['dtype']} {expected}")


def data_fingerprint(data):
    """What identifies the training data without reading it again: its events per item and vocab.

    sha256 over the int64 little-endian counts, then the vocab lines joined by newlines."""
    digest = hashlib.sha256()
    description = {"n_items": int(data.n_items)}
    if data.item_support is not None:
        support = np.ascontiguousarray(data.item_support, dtype="<i8")
        digest.update(support.tobytes())
        description["events"] = int(support.sum())
        description["items_clicked"] = int(np.count_nonzero(support))
    if data.labels is not None:
        digest.update("\n".join(data.labels).encode("utf-8"))
    description["sha256"] = digest.hexdigest()
    return description


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


# ---- reading -----------------------------------------------------------------------------------

@dataclass
class ExportInfo:
    """A checked export: what a server or converter needs to run it."""

    folder: str
    epoch: int
    n_items: int
    topk: int  # items the step returns per row
    hidden_size: int  # width of the state: sum(layers)
    labels: Optional[List[str]]  # original id of each model id, or None (ids are model ids)
    known: np.ndarray  # bool [n_items]: clicked in training (the rest score -inf and are never fed)
    io: dict  # io.json as written

    @property
    def padding_id(self):
        return self.n_items

    def path(self, name):
        return os.path.join(self.folder, name)


def is_export(path):
    return os.path.isfile(os.path.join(path, IO)) and os.path.isfile(os.path.join(path, PROGRAM))


def newest_export(path, key):
    """An export folder, or the newest `<epoch>/` export inside `path`."""
    if not os.path.exists(path):
        raise CheckpointError(f"{key}: {path} does not exist; train with save_inference_interval > 0 first "
                              f"(it writes save_inference_path/<epoch>/) or point it at such a folder")
    if is_export(path):
        return path
    epochs = sorted(int(name) for name in os.listdir(path)
                    if name.isdigit() and is_export(os.path.join(path, name)))
    if not epochs:
        raise CheckpointError(f"{key}: {path} holds no inference model (a folder with {IO} and {PROGRAM}, "
                              f"as save_inference_path/<epoch>/); is it a checkpoint folder instead?")
    return os.path.join(path, str(epochs[-1]))


def read_export(folder):
    """Read and verify an export; CheckpointError (one line naming the file) when it is damaged."""
    path = os.path.join(folder, IO)
    try:
        with open(path, encoding="utf-8") as f:
            io = json.load(f)
        fmt = io.get("format")
        if fmt != FORMAT:
            raise CheckpointError(f"{path}: export format {fmt}, this server reads {FORMAT} (it lists each file's "
                                  f"sha256); export the model again with this version")
        n_items, topk, hidden = int(io["n_items"]), int(io["topk"]), int(io["hidden_size"])
        names_in = [spec["name"] for spec in io["inputs"]]
        names_out = [spec["name"] for spec in io["outputs"]]
        files, vocab = dict(io["files"]), io.get("vocab", "")
        unseen = [int(i) for i in io.get("unseen_items", [])]
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc}); export the model again") from None
    if names_in != list(INPUTS) or names_out != list(OUTPUTS):
        raise CheckpointError(f"{path}: the step takes {names_in} and gives {names_out}, not {list(INPUTS)} and "
                              f"{list(OUTPUTS)}; this is not a GRU4Rec export of this version")
    verify_files(folder, files, required=REQUIRED_FILES + ((vocab,) if vocab else ()))
    labels = None
    if vocab:
        labels = read_vocab(os.path.join(folder, vocab), CheckpointError, "export the model again")
        if len(labels) != n_items:
            raise CheckpointError(f"{os.path.join(folder, vocab)}: {len(labels)} items, but the model has "
                                  f"{n_items}; the export is damaged")
    known = np.ones(n_items, dtype=bool)
    known[[i for i in unseen if 0 <= i < n_items]] = False
    return ExportInfo(folder, int(io.get("epoch", 0)), n_items, topk, hidden, labels, known, io)


def verify_files(folder, files, required=()):
    """Every file io.json lists must be there with its size and sha256."""
    for name in required:
        if name not in files:
            raise CheckpointError(f"{os.path.join(folder, IO)}: lists no {name}; export the model again")
    for name, expected in sorted(files.items()):
        path = os.path.join(folder, name)
        if os.path.basename(name) != name or name in (IO, "", ".", ".."):
            raise CheckpointError(f"{os.path.join(folder, IO)}: lists {name!r}, not a file of the export folder")
        try:
            found = file_digest(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing; the export is incomplete (copy the whole folder, or export "
                                  f"the model again)") from None
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
        if found["bytes"] != expected.get("bytes"):
            raise CheckpointError(f"{path}: {found['bytes']} bytes, io.json says {expected.get('bytes')}; the "
                                  f"export is damaged or incomplete (copy it again, or export the model again)")
        if found["sha256"] != expected.get("sha256"):
            raise CheckpointError(f"{path}: its sha256 differs from io.json's; the export is damaged (copy it "
                                  f"again, or export the model again)")


# ---- ONNX (optional: requirements-onnx.txt) ----------------------------------------------------

ONNX_OPSET = 17


class OnnxUnavailable(UserError):
    exit_code = 2
    prefix = "error"


def write_onnx(export: ExportInfo, opset=ONNX_OPSET):
    """Convert a checked export's step to `<folder>/model.onnx` (paddle2onnx) and list the file in
    io.json (size, sha256, opset). The ONNX graph has io.json's input and output names."""
    try:
        import paddle2onnx
    except ImportError:
        raise OnnxUnavailable("ONNX export needs the optional packages: pip install -r requirements-onnx.txt") from None
    # save_file=None: the converter returns the bytes. Given a file, it would first "fold constants"
    # with polygraphy, which pip-installs missing modules while it runs.
    model_bytes = paddle2onnx.export(export.path(PROGRAM), export.path(PARAMS), save_file=None, opset_version=opset,
                                     enable_onnx_checker=True, enable_optimize=True)
    if not model_bytes:  # the converter logs its error and returns nothing
        raise CheckpointError(f"{export.path(PROGRAM)}: paddle2onnx {paddle2onnx.__version__} could not convert "
                              f"the step (its log above says why)")
    from .files import atomic_file

    target = export.path(ONNX)
    with atomic_file(target, mode="wb") as f:
        f.write(model_bytes)
        f.flush()
        os.fsync(f.fileno())
    io = dict(export.io)
    io["files"] = dict(io["files"], **{ONNX: file_digest(target)})
    io["onnx"] = {"file": ONNX, "opset": opset, "converter": f"paddle2onnx {paddle2onnx.__version__}"}
    with atomic_file(os.path.join(export.folder, IO)) as f:
        json.dump(io, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    export.io = io
    return target


# ---- command line ------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m paddlerec.export",
                                     description="Check an inference export (io.json, file sizes and sha256) "
                                                 "and describe it; --onnx also writes model.onnx.")
    parser.add_argument("folder", help="an export folder (save_inference_path/<epoch>) or its parent (newest epoch)")
    parser.add_argument("--onnx", action="store_true", help="write model.onnx with paddle2onnx (optional extra)")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset (default: %(default)s)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        export = read_export(newest_export(args.folder, "folder"))
        if args.onnx:
            os.environ.setdefault("GLOG_minloglevel", "2")
            print(f"wrote {write_onnx(export, args.opset)}")
    except UserError as exc:
        print(f"{exc.prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    io = export.io
    print(f"{export.folder}: epoch {export.epoch}, {export.n_items} items "
          f"({int(export.known.sum())} servable), top-{export.topk}, hidden {export.hidden_size}; "
          f"files intact: {', '.join(sorted(io['files']))}")
    for kind in ("inputs", "outputs"):
        for spec in io[kind]:
            print(f"  {kind[:-1]:6} {spec['name']:12} {spec['dtype']:8} {spec['shape']}")
    print(f"  initial state: {io['initial_state']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
