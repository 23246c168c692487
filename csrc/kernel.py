"""Glue between the Python side and the fused C++ operators of csrc/gru4rec_cpu.cc.

It builds (first time; `sh setup.sh` does it) and loads the operator library, and holds the one
table of what the operators take: the codes of the categorical settings, the Adagrad epsilon and
the order of the attributes. The C++ side describes its own table (operator `gru4rec_layout`);
`load()` compares the two and refuses a library that disagrees, so a code changed on one side
only cannot train with mixed-up settings.

The training code (model.py) imports this module before any matrix product runs: see
`prefer_fast_math_path()`.
"""

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "gru4rec_cpu.cc")
BUILD_DIR = os.path.join(os.path.dirname(HERE), "build", "gru4rec_cpu")

# What the operators take. The C++ enums and attribute lists must say the same (checked at load).
EMBEDDING_CODES = {"shared": 0, "separate": 1, "none": 2}
LOSS_CODES = {"cross-entropy": 0, "bpr-max": 1, "top1-max": 2, "full_softmax": 3}
OPTIMIZER_CODES = {"adagrad": 0, "sgd": 1}
ADAGRAD_EPS = 1e-6
TRAIN_ATTRS = ("embedding", "loss_kind", "optimizer", "batch_size", "dropout_embed", "dropout_hidden", "logq",
               "sample_alpha", "bpreg", "elu", "lr", "momentum", "seed")
EVAL_ATTRS = ("embedding", "topk")
APPLY_ATTRS = ("embedding", "optimizer", "lr", "momentum")

log = logging.getLogger(__name__)
_module = None


class KernelUnavailable(Exception):
    """The operators cannot be built or loaded here; the message says why."""


def layout():
    """The description the C++ side must give of itself, character for character."""
    def codes(table):
        return ",".join(f"{name}={code}" for name, code in table.items())

    return (f"embedding:{codes(EMBEDDING_CODES)};loss:{codes(LOSS_CODES)};optimizer:{codes(OPTIMIZER_CODES)};"
            f"adagrad_eps:{ADAGRAD_EPS:g};train_attrs:{','.join(TRAIN_ATTRS)};eval_attrs:{','.join(EVAL_ATTRS)};"
            f"apply_attrs:{','.join(APPLY_ATTRS)}")


def prefer_fast_math_path():
    """Let the MKL inside the paddlepaddle wheel use its AVX2 code on AMD processors.

    That MKL (2019) picks a generic code path on any processor not made by Intel: single-precision
    products run about 3x slower on an AMD EPYC than with MKL_DEBUG_CPU_TYPE=5, which selects the
    AVX2 path (bench/scaling.py prints both). MKL reads the variable at its first call, so this
    runs when this module is imported, before the training code multiplies anything. A value the
    user set is kept.
    """
    if "MKL_DEBUG_CPU_TYPE" in os.environ:
        return
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            amd = any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return
    if amd:
        os.environ["MKL_DEBUG_CPU_TYPE"] = "5"


prefer_fast_math_path()


def attributes(names, values):
    """The operator's attributes in its order, from a dict; a missing or extra name is a bug here."""
    missing, extra = set(names) - set(values), set(values) - set(names)
    if missing or extra:
        raise ValueError(f"operator attributes: missing {sorted(missing)}, unexpected {sorted(extra)}")
    return [values[name] for name in names]


def load():
    """The operator module, built from source when needed. Raises KernelUnavailable."""
    global _module
    if _module is not None:
        return _module
    import paddle
    from paddle.utils.cpp_extension import load as build_and_load

    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    if not os.path.isfile(os.path.join(libs, "libmklml_intel.so")):
        raise KernelUnavailable(f"this paddlepaddle wheel has no MKL ({libs}/libmklml_intel.so)")
    os.makedirs(BUILD_DIR, exist_ok=True)
    captured = io.StringIO()
    paddle_log = logging.getLogger("utils.cpp_extension")  # Paddle's builder logs each load at INFO
    level = paddle_log.level
    paddle_log.setLevel(logging.WARNING)
    flags = dict(extra_cxx_cflags=["-O3", "-march=native", "-fno-math-errno"],
                 extra_ldflags=[f"-L{libs}", "-l:libmklml_intel.so", f"-Wl,-rpath,{libs}"])
    with open(SOURCE, "rb") as f:
        stamp = hashlib.sha256(f.read() + repr((flags, paddle.__version__)).encode()).hexdigest()
    stamp_path = os.path.join(BUILD_DIR, "built.sha256")
    try:
        # several processes (tests, distributed workers) may build at once: one at a time
        with open(os.path.join(BUILD_DIR, ".lock"), "w") as lock, contextlib.redirect_stdout(captured), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No ccache found")  # harmless: the build is cached
            fcntl.flock(lock, fcntl.LOCK_EX)
            module = _load_built(stamp, stamp_path)
            if module is None:
                module = build_and_load(name="gru4rec_cpu", sources=[SOURCE], build_directory=BUILD_DIR,
                                        verbose=False, **flags)
                with open(stamp_path, "w") as f:
                    f.write(stamp)
    except Exception as exc:  # a compiler or loader failure: say why, the caller decides
        lines = [l for l in (str(exc) + "\n" + captured.getvalue()).splitlines() if "error" in l.lower()]
        raise KernelUnavailable((lines[0] if lines else str(exc).splitlines()[0])[:300]) from None
    finally:
        paddle_log.setLevel(level)
    described = bytes(module.gru4rec_layout(paddle.zeros([1])).numpy().tobytes()).decode("ascii", "replace")
    if described != layout():
        raise KernelUnavailable(f"{SOURCE} and {__file__} disagree on the operators' codes or attributes: the "
                                f"library says {described!r}, the Python side {layout()!r}; make them match and "
                                f"run `sh setup.sh`")
    _module = module
    return _module


def _load_built(stamp, stamp_path):
    """The operator library built earlier from this very source, or None.

    paddle.utils.cpp_extension.load() starts a Python subprocess that imports Paddle to let
    setuptools decide whether to recompile — some 2 s at every start even when nothing changed.
    When our stamp says the library matches the source, load the library directly instead (this
    uses a helper of Paddle's that is not public API; on any failure, load() does the work)."""
    library = os.path.join(BUILD_DIR, "gru4rec_cpu")
    try:
        with open(stamp_path) as f:
            if f.read().strip() != stamp:
                return None
        from paddle.utils.cpp_extension.extension_utils import _import_module_from_library

        return _import_module_from_library("gru4rec_cpu", library, False)
    except Exception:  # no stamp yet, or Paddle moved its helper: build the regular way
        return None


def build():
    """`sh setup.sh` calls this so the first training run does not wait for the compiler."""
    import sys

    try:
        load()
    except KernelUnavailable as exc:
        print(f"setup: the fused CPU kernel could not be built ({exc}); training will use Paddle operators "
              f"(kernel: reference)", file=sys.stderr)
        return 1
    print(f"setup: fused CPU kernel ready in {BUILD_DIR}", file=sys.stderr)
    return 0
