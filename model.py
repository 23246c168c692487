"""GRU4Rec on Paddle: the network, negative sampler, losses and row-sparse optimizer.

Training follows the authors' scheme (Hidasi et al.; the official GRU4Rec):
  * session-parallel mini-batches (rsc15_reader.py) with the hidden state zeroed when a
    slot starts a new session and no backpropagation through time;
  * scores of the B mini-batch rows against the B targets of the mini-batch plus
    `n_sample` items shared by the mini-batch, drawn ahead in bulk with probability
    ~ support**sample_alpha: a B x (B + n_sample) score matrix, never the whole catalogue;
  * cross-entropy (with optional logQ correction), BPR-max or TOP1-max over those scores;
  * Adagrad with momentum that updates only the rows of the item matrices the
    mini-batch touched; Xavier-style uniform initialisation, zero biases.
Evaluation scores the state after each click against ALL items.

Two implementations of the training step share the parameters and the data path:
  * "reference": Paddle operators with autograd (any device, every option);
  * "fused": one C++ operator per batch of steps (csrc/gru4rec_cpu.cc, CPU only), the
    same arithmetic without per-operator overhead. tests/test_fused_kernel.py holds
    the two to the same numbers.
"""

import logging
import math

from csrc import kernel as fused_ops  # first: it prepares MKL's environment before any product runs

import numpy as np
import paddle
import paddle.nn.functional as F

from paddlerec.contract import DataInfo, EvalOutput
from paddlerec.errors import ConfigError, TrainingError
from paddlerec.params import Param

log = logging.getLogger(__name__)

HYPER_PARAMETERS = (
    Param("layers", "list[int]", [100], min=1, max=4096,
          help="GRU layer sizes; with a shared embedding the last size is also the item embedding size"),
    Param("embedding", "str", "shared", choices=("shared", "separate", "none"),
          help="input of the first GRU layer: the output item matrix (shared), its own item matrix "
               "(separate) or the one-hot item (none)"),
    Param("embedding_size", "int", 0, min=0, max=4096, help="size of the separate input embedding; 0: the first layer's size"),
    Param("dropout_embed", "float", 0.0, min=0.0, max=0.95, help="dropout on the input embedding"),
    Param("dropout_hidden", "float", 0.0, min=0.0, max=0.95, help="dropout on each GRU layer's output"),
    Param("loss", "str", "cross-entropy", choices=("cross-entropy", "bpr-max", "top1-max", "full_softmax"),
          help="cross-entropy: softmax over the sampled scores; full_softmax: softmax over every item "
               "(the 2020 PaddleRec loss; slow)"),
    Param("elu_param", "float", 0.0, min=0.0,
          help="final activation of bpr-max/top1-max scores: ELU with this alpha; 0: linear"),
    Param("bpreg", "float", 0.0, min=0.0, help="bpr-max score regularisation weight"),
    Param("logq", "float", 0.0, min=0.0,
          help="cross-entropy: subtract logq * log(sampling frequency) from each score (popularity correction)"),
    Param("n_sample", "int", 2048, min=0, max=100_000, help="negative items shared by a mini-batch, on top of its other targets"),
    Param("sample_alpha", "float", 0.5, min=0.0, max=1.0,
          help="negatives are drawn with probability ~ support**sample_alpha (0: uniform, 1: popularity)"),
    Param("sample_store", "int", 10000000, min=1, max=100_000_000, help="negative item ids per block of the drawn stream (the official sample cache)"),
    Param("optimizer.class", "str", "adagrad", choices=("adagrad", "adam", "sgd"),
          help="adagrad (with optional momentum, as the official GRU4Rec), adam or sgd; item rows are updated "
               "only where the mini-batch touched them"),
    Param("optimizer.learning_rate", "float", 0.05, gt=0.0, help="learning rate"),
    Param("optimizer.momentum", "float", 0.0, min=0.0, max=0.99, help="momentum (adagrad and sgd)"),
    Param("seed", "int", 42, min=0, max=2**32 - 1, help="seed of the initial weights, dropout and negative sampling"),
    Param("kernel", "str", "auto", choices=("auto", "fused", "reference"),
          help="training step: fused C++ CPU operator, or Paddle operators (reference); auto: fused where it "
               "is built and supports the settings"),
)

ADAGRAD_EPS = fused_ops.ADAGRAD_EPS  # one value for both steps (csrc/kernel.py)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def xavier_uniform(rng, fan_in, fan_out, shape):
    """U(-s, s) with s = sqrt(6 / (fan_in + fan_out)), the official GRU4Rec initialisation."""
    sigma = math.sqrt(6.0 / (fan_in + fan_out))
    return (rng.random(shape, dtype=np.float64) * 2 * sigma - sigma).astype(np.float32)


def gru_cell(gi, h, w_hh, b_hh):
    """One GRU step from the input's gate pre-activations gi = x @ W_ih + b_ih.

    gi: [n, 3h] (gates r, z, candidate), h: [n, h], w_hh: [h, 3h], b_hh: [3h] -> [n, h].
    The reset gate scales the recurrent part after its product, as in torch/paddle GRUCell.
    """
    size = h.shape[1]
    gh = paddle.matmul(h, w_hh) + b_hh
    r = F.sigmoid(gi[:, :size] + gh[:, :size])
    z = F.sigmoid(gi[:, size:2 * size] + gh[:, size:2 * size])
    c = paddle.tanh(gi[:, 2 * size:] + r * gh[:, 2 * size:])
    return c + z * (h - c)


class GRU4RecNet(paddle.nn.Layer):
    """The parameters, and the forward pass used by evaluation and by the exported model.

    item_emb [n_items, layers[-1]] scores items (and is the input embedding when shared);
    item_bias [n_items]; input_emb [n_items, embedding_size] when separate; per GRU layer l
    gru{l}_w_ih [in, 3h] (with embedding "none", layer 0's is [n_items, 3h], looked up by
    row), gru{l}_w_hh [h, 3h], gru{l}_b_ih [3h], gru{l}_b_hh [3h]. Every parameter has
    stop_gradient=True: training differentiates detached copies of the rows it uses.
    """

    def __init__(self, n_items, layers, embedding, embedding_size, seed):
        super().__init__()
        self.n_items = n_items
        self.layers = list(layers)
        self.embedding = embedding
        rng = np.random.default_rng(seed)
        self.param_names = []

        if embedding == "shared":
            input_size = self.layers[-1]
        elif embedding == "separate":
            input_size = embedding_size or self.layers[0]
            self._add("input_emb", xavier_uniform(rng, n_items, input_size, (n_items, input_size)))
        else:
            input_size = n_items
        for l, size in enumerate(self.layers):
            fan_in = input_size if l == 0 else self.layers[l - 1]
            # one Xavier range per gate, as the official code initialises each gate matrix on its own
            w_ih = np.concatenate([xavier_uniform(rng, fan_in, size, (fan_in, size)) for _ in range(3)], axis=1)
            w_hh = np.concatenate([xavier_uniform(rng, size, size, (size, size)) for _ in range(3)], axis=1)
            self._add(f"gru{l}_w_ih", w_ih)
            self._add(f"gru{l}_w_hh", w_hh)
            self._add(f"gru{l}_b_ih", np.zeros(3 * size, np.float32))
            self._add(f"gru{l}_b_hh", np.zeros(3 * size, np.float32))
        self._add("item_emb", xavier_uniform(rng, n_items, self.layers[-1], (n_items, self.layers[-1])))
        self._add("item_bias", np.zeros(n_items, np.float32))
        self.register_buffer("item_support", paddle.zeros([n_items], dtype="int64"), persistable=True)

    def _add(self, name, value):
        param = self.create_parameter(list(value.shape), dtype="float32",
                                      default_initializer=paddle.nn.initializer.Assign(value))
        param.stop_gradient = True
        self.add_parameter(name, param)
        self.param_names.append(name)

    @property
    def row_sparse(self):
        """Parameters indexed by item id: only the touched rows get gradients and updates."""
        names = ["item_emb", "item_bias"]
        if self.embedding == "separate":
            names.append("input_emb")
        if self.embedding == "none":
            names.append("gru0_w_ih")
        return names

    def gru_params(self, l):
        return [getattr(self, f"gru{l}_{k}") for k in ("w_ih", "w_hh", "b_ih", "b_hh")]

    def step(self, items, hidden):
        """Feed `items` [n] given `hidden` (list of [n, h]); returns the last layer's output and
        the new hidden states. No dropout: this is the evaluation/serving pass."""
        if self.embedding == "none":
            w_ih, w_hh, b_ih, b_hh = self.gru_params(0)
            x = gru_cell(paddle.gather(w_ih, items) + b_ih, hidden[0], w_hh, b_hh)
            new_hidden, start = [x], 1
        else:
            table = self.item_emb if self.embedding == "shared" else self.input_emb
            x = paddle.gather(table, items)
            new_hidden, start = [], 0
        for l in range(start, len(self.layers)):
            w_ih, w_hh, b_ih, b_hh = self.gru_params(l)
            x = gru_cell(paddle.matmul(x, w_ih) + b_ih, hidden[l], w_hh, b_hh)
            new_hidden.append(x)
        return x, new_hidden

    def score_mask(self):
        """[n_items]: 0 for items seen in training, -inf for the rest (never recommended)."""
        return paddle.where(self.item_support > 0, paddle.zeros([self.n_items]),
                            paddle.full([self.n_items], float("-inf")))

    def all_scores(self, x):
        """Scores of every item for states x [n, h] -> [n, n_items]."""
        return paddle.matmul(x, self.item_emb, transpose_y=True) + self.item_bias


class InferenceStep(paddle.nn.Layer):
    """What `paddle.inference` serves: one click per row in, top-K and the next state out.

    item_ids [n] int64, hidden [n, sum(layers)] float32 (zeros at a session's start),
    exclude_ids [n, m] int64 (model ids never to return for that row, e.g. the session's clicks;
    padded with n_items; m may be 0) -> topk_ids [n, k] int64, topk_scores [n, k] float32,
    next_hidden [n, sum(layers)]. Without exclude_ids (None when traced) the step has two inputs.
    """

    def __init__(self, network, topk):
        super().__init__()
        self.network = network
        self.topk = min(topk, network.n_items)

    def forward(self, item_ids, hidden, exclude_ids=None):
        sizes = self.network.layers
        hidden_list = paddle.split(hidden, sizes, axis=1) if len(sizes) > 1 else [hidden]
        x, new_hidden = self.network.step(item_ids, hidden_list)
        scores = self.network.all_scores(x) + self.network.score_mask()  # [n, n_items]
        if exclude_ids is not None:
            # a spare last column takes the padding id n_items, so rows may exclude different counts
            padded = paddle.concat([scores, paddle.zeros_like(scores[:, :1])], axis=1)  # [n, n_items + 1]
            # the value is a tensor of exclude_ids' shape: a scalar would need that shape, unknown when saving
            minus_inf = paddle.zeros_like(exclude_ids, dtype=scores.dtype) - float("inf")  # [n, m]
            padded = paddle.put_along_axis(padded, exclude_ids, minus_inf, axis=1, broadcast=False)
            scores = padded[:, :-1]
        topk_scores, topk_ids = paddle.topk(scores, self.topk, axis=1)
        next_hidden = paddle.concat(new_hidden, axis=1) if len(sizes) > 1 else new_hidden[0]
        return topk_ids, topk_scores, next_hidden


INFERENCE_INPUTS = ("item_ids", "hidden", "exclude_ids")
INFERENCE_OUTPUTS = ("topk_ids", "topk_scores", "next_hidden")


class NegativeSampler:
    """Shared negative items, drawn with P(item) ~ support**alpha.

    Walker's alias method (one hashed 64-bit counter per draw: a uniform item and a coin). Draws
    are counter-based: row r of block b of the stream holds draws (key, b, r * n_sample ..), so
    each call draws just the rows it takes, on every thread (csrc: gru4rec_draw_negatives, ~3 ns
    a draw), and a state is (key, block, row). `fill(accept, alias, key, block, start, count)`
    draws a range; draw_negatives below is its numpy twin and the reference.
    """

    def __init__(self, support, n_sample, alpha, store, seed, fill=None):
        weights = np.where(support > 0, support.astype(np.float64) ** alpha, 0.0)
        self.probability = weights / weights.sum()
        accept, self.alias = alias_table(self.probability)
        self.accept = accept.astype(np.float32)
        self.n_sample = n_sample
        self.rows_per_block = max(1, store // max(n_sample, 1))
        self.key = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])
        self.fill = fill or draw_negatives
        self.block = -1  # the block in use (-1: nothing drawn yet) ...
        self.pointer = 0  # ... and its next row

    def take(self, n_steps):
        """[n_steps, n_sample] int64: one row of shared negatives per mini-batch."""
        parts = []
        while n_steps > 0:
            if self.block < 0 or self.pointer >= self.rows_per_block:
                self.block, self.pointer = self.block + 1, 0
            take = min(n_steps, self.rows_per_block - self.pointer)
            drawn = self.fill(self.accept, self.alias, self.key, self.block, self.pointer * self.n_sample,
                              take * self.n_sample)
            parts.append(np.asarray(drawn, np.int64).reshape(take, self.n_sample))
            self.pointer += take
            n_steps -= take
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def state(self):
        """int64 [7]: the key, the block in use (-1: nothing drawn yet), four zeros (room kept
        from an earlier layout) and the next row of the block."""
        words = [self.key, self.block & MASK64, 0, 0, 0, 0, self.pointer if self.block >= 0 else MASK64]
        return np.array(words, np.uint64).view(np.int64)

    def load_state(self, packed):
        words = np.asarray(packed, np.int64)
        self.key = int(words[:1].view(np.uint64)[0])
        block, pointer = int(words[1]), int(words[6])
        self.block, self.pointer = (block, pointer) if block >= 0 and pointer >= 0 else (-1, 0)


def mix64(z):
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic), as csrc's mix64."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def draw_negatives(accept, alias, key, block, start, count):
    """int64 [count]: draws start .. start + count - 1 of block `block` (csrc's gru4rec_draw_negatives)."""
    def mix(value):
        return int(mix64(np.array([value & MASK64], np.uint64))[0])

    base = np.uint64(mix(mix(key) ^ mix(block + 1)))
    h = mix64(np.arange(start + 1, start + count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + base)
    column = (((h >> np.uint64(32)) * np.uint64(len(accept))) >> np.uint64(32)).astype(np.int64)
    coin = (h & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    rejected = np.flatnonzero(coin >= accept[column])
    column[rejected] = alias[column[rejected]]
    return column


MASK64 = (1 << 64) - 1


def alias_table(probability):
    """Walker/Vose alias table: item i is kept with accept[i], else replaced by alias[i]."""
    n = len(probability)
    scaled = probability * n
    accept = np.ones(n)
    alias = np.arange(n)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s, l = small.pop(), large.pop()
        accept[s], alias[s] = scaled[s], l
        scaled[l] -= 1.0 - scaled[s]
        (small if scaled[l] < 1.0 else large).append(l)
    return accept, alias


def softmax_without_diagonal(scores):
    """Row softmax over the negatives: the target column (diagonal) gets weight 0."""
    n = scores.shape[0]
    not_target = 1.0 - paddle.eye(n, scores.shape[1])
    masked = scores * not_target
    e = paddle.exp(masked - masked.max(axis=1, keepdim=True)) * not_target
    return e / e.sum(axis=1, keepdim=True)


def sampled_loss(kind, scores, logq_shift, bpreg, elu_param):
    """Summed loss of a mini-batch. scores [n, n+S]: row i's target is column i.

    logq_shift [n+S] (cross-entropy with logQ) is subtracted from every row.
    """
    n = scores.shape[0]
    if kind == "cross-entropy":
        if logq_shift is not None:
            scores = scores - logq_shift
        labels = paddle.arange(n, dtype="int64").unsqueeze(1)
        return F.cross_entropy(scores, labels, reduction="sum")
    if elu_param > 0:
        scores = F.elu(scores, alpha=elu_param)
    weights = softmax_without_diagonal(scores)
    target = paddle.diagonal(scores[:, :n]).unsqueeze(1)
    if kind == "bpr-max":
        pair = (F.sigmoid(target - scores) * weights).sum(axis=1)
        return (-paddle.log(pair + 1e-24) + bpreg * (scores * scores * weights).sum(axis=1)).sum()
    if kind == "top1-max":
        return ((F.sigmoid(scores - target) + F.sigmoid(scores * scores)) * weights).sum()
    raise ValueError(kind)


class RowSparseOptimizer:
    """Adagrad (with momentum), Adam or SGD; item matrices are updated only in the rows a
    mini-batch touched (their repeated rows' gradients summed first: the update is not linear).

    State tensors are named "<parameter>.<slot>" so a checkpoint resumes in any process.
    """

    def __init__(self, network, kind, learning_rate, momentum):
        self.kind, self.lr, self.momentum = kind, learning_rate, momentum
        self.params = {name: getattr(network, name) for name in network.param_names}
        self.state = {}
        slots = {"adagrad": ["acc"] + (["mom"] if momentum > 0 else []),
                 "sgd": ["mom"] if momentum > 0 else [],
                 "adam": ["m", "v"]}[kind]
        for name, param in self.params.items():
            for slot in slots:
                self.state[f"{name}.{slot}"] = paddle.zeros(param.shape, dtype="float32")
        if kind == "adam":
            self.state["step"] = paddle.zeros([1], dtype="float32")

    def state_dict(self):
        return dict(self.state)

    def set_state_dict(self, state):
        for key, value in state.items():
            if key not in self.state:
                raise KeyError(key)
            self.state[key].set_value(value)

    def _update(self, name, grad, rows=None):
        """Return the increment for the (given rows of the) parameter; updates the slots."""
        def get(slot):
            t = self.state[f"{name}.{slot}"]
            return t if rows is None else paddle.gather(t, rows)

        def put(slot, value):
            t = self.state[f"{name}.{slot}"]
            if rows is None:
                t.set_value(value)
            else:
                paddle.scatter_(t, rows, value, overwrite=True)

        if self.kind == "adagrad":
            acc = get("acc") + grad * grad
            put("acc", acc)
            step = -self.lr * grad / paddle.sqrt(acc + ADAGRAD_EPS)
        elif self.kind == "sgd":
            step = -self.lr * grad
        else:
            b1, b2 = ADAM_BETAS
            t = float(self.state["step"].item())
            m = get("m") * b1 + (1 - b1) * grad
            v = get("v") * b2 + (1 - b2) * grad * grad
            put("m", m)
            put("v", v)
            step = -self.lr * (m / (1 - b1 ** t)) / (paddle.sqrt(v / (1 - b2 ** t)) + ADAM_EPS)
        if self.momentum > 0 and self.kind != "adam":
            mom = get("mom") * self.momentum + step
            put("mom", mom)
            step = mom
        return step

    def apply(self, dense, sparse):
        """dense: {name: grad}; sparse: {name: (rows, grad [m, ...])}, rows a numpy int64 [m] array of
        item ids, repeats allowed."""
        if self.kind == "adam":
            self.state["step"].set_value(self.state["step"] + 1)
        for name, grad in dense.items():
            param = self.params[name]
            param.set_value(param + self._update(name, grad))
        for name, (rows, grad) in sparse.items():
            # rows are host ids: np.unique costs ~0.1 ms where paddle.unique costs ~7 ms on CPU
            unique, inverse = np.unique(rows, return_inverse=True)
            unique, inverse = paddle.to_tensor(unique), paddle.to_tensor(inverse)
            summed = paddle.index_add(paddle.zeros([unique.shape[0]] + list(grad.shape[1:]), grad.dtype),
                                      inverse, 0, grad)
            param = self.params[name]
            paddle.scatter_(param, unique, paddle.gather(param, unique) + self._update(name, summed, unique),
                            overwrite=True)


class Model:
    """The model contract of paddlerec (see paddlerec/contract.py)."""

    def __init__(self, hparams, data: DataInfo):
        self.hp = hparams
        layers = hparams["layers"]
        if not layers:
            raise ConfigError("hyper_parameters.layers", "needs at least one layer size, e.g. [100]")
        self.loss_kind = hparams["loss"]
        self.n_sample = hparams["n_sample"] if self.loss_kind != "full_softmax" else 0
        if self.loss_kind in ("bpr-max", "top1-max") and self.n_sample == 0:
            log.info("n_sample is 0: %s uses only the other targets of the mini-batch as negatives", self.loss_kind)
        self.data = data
        # clicks per item in the data being trained on: sampling weights and logQ come from it;
        # the network's persisted item_support only says which items are known (see begin_epoch)
        self.train_support = None if data.item_support is None else np.asarray(data.item_support, np.int64)
        self.network = GRU4RecNet(data.n_items, layers, hparams["embedding"], hparams["embedding_size"],
                                  hparams["seed"])
        if self.train_support is not None:
            self.network.item_support.set_value(paddle.to_tensor(self.train_support))
        self.optimizer = RowSparseOptimizer(self.network, hparams["optimizer.class"],
                                            hparams["optimizer.learning_rate"], hparams["optimizer.momentum"])
        self.hidden = None
        self.grad_reducer = None  # distributed training combines gradients here
        self._sampler = None
        # how a step is computed, chosen once (ReferenceStep or FusedStep) at the first epoch
        self._train_impl = None
        self._eval_impl = None

    # ---- contract -------------------------------------------------------------------
    def signature(self):
        net = self.network
        return {"n_items": net.n_items, "layers": net.layers, "embedding": net.embedding,
                "parameters": {n: list(getattr(net, n).shape) for n in net.param_names}}

    def optimizer_state(self):
        """The optimizer's slots, and where the negative-sample stream stands (so a resumed run
        draws what an uninterrupted one would have)."""
        state = self.optimizer.state_dict()
        if self._sampler is not None:
            state["sampler.state"] = paddle.to_tensor(self._sampler.state())
        return state

    def load_optimizer_state(self, state):
        state = dict(state)
        sampler_state = state.pop("sampler.state", None)
        self.optimizer.set_state_dict(state)
        if sampler_state is not None and self.n_sample > 0:
            self.sampler.load_state(np.asarray(sampler_state.numpy() if hasattr(sampler_state, "numpy")
                                               else sampler_state))

    def known_items(self):
        return self.network.item_support.numpy() > 0

    def begin_epoch(self, epoch, training):
        """Fresh hidden state; dropout seeded from (seed, epoch). The negative-sample store is one
        stream over all epochs, as in the official code. The kernel is chosen (and loaded) here,
        outside the epoch's timing."""
        self.hidden = None
        if training:
            seed = self.hp["seed"]
            # distributed workers draw their own dropout masks (negatives stay shared by all of
            # them, as one process's mini-batch shares them); a single process is rank 0
            rank = paddle.distributed.get_rank()
            paddle.seed(seed * 1000003 + epoch + 7919 * rank)
            self.step_rng = np.random.default_rng([seed, epoch, 1] + ([rank] if rank else []))
            if self.train_support is not None:
                # a restored model keeps knowing the items it knew; the new data's items join them
                known = np.maximum(self.network.item_support.numpy(), self.train_support)
                self.network.item_support.set_value(paddle.to_tensor(known))
            self.train_impl()
        else:
            self.eval_impl()

    def sampling_support(self):
        return self.train_support if self.train_support is not None else self.network.item_support.numpy()

    @property
    def sampler(self):
        if self._sampler is None:
            support = self.sampling_support()
            self._sampler = NegativeSampler(support, self.n_sample, self.hp["sample_alpha"], self.hp["sample_store"],
                                            seed=[self.hp["seed"], 2], fill=self.train_impl().draw_negatives)
        return self._sampler

    def train_step(self, batch, batch_size):
        """Train on every mini-batch of `batch`; returns each one's summed row losses. The
        gradient is that of the sum / batch_size (the configured size: a shrinking last
        mini-batch weighs less, as in the official code)."""
        samples = self.sampler.take(batch.n_steps) if self.n_sample > 0 else None
        return self.train_impl().train(batch, samples, batch_size)

    def eval_step(self, batch, topk, tie_mode):
        return self.eval_impl().evaluate(batch, topk, tie_mode)

    def train_impl(self):
        """The training step's strategy: the fused C++ step where configured and usable, else Paddle
        operators. Decided once."""
        if self._train_impl is None:
            self._train_impl = choose_train_impl(self)
        return self._train_impl

    def eval_impl(self):
        if self._eval_impl is None:
            self._eval_impl = ReferenceStep(self)
            if self.hp["kernel"] != "reference" and paddle.get_device() == "cpu":
                try:
                    self._eval_impl = FusedStep(self, fused_ops.load())
                except fused_ops.KernelUnavailable as exc:
                    if self.hp["kernel"] == "fused":
                        raise ConfigError("hyper_parameters.kernel", f"fused, but it could not be built ({exc})")
        return self._eval_impl

    def export(self, path_prefix, topk):
        step = InferenceStep(self.network, topk)
        width = sum(self.network.layers)
        specs = [paddle.static.InputSpec([None], "int64", INFERENCE_INPUTS[0]),
                 paddle.static.InputSpec([None, width], "float32", INFERENCE_INPUTS[1]),
                 paddle.static.InputSpec([None, None], "int64", INFERENCE_INPUTS[2])]
        static = paddle.jit.to_static(step, input_spec=specs, full_graph=True)
        paddle.jit.save(static, path_prefix, input_spec=specs)
        # "unseen_items": ids never clicked in training: their scores are masked and a server must
        # not feed them (the offline evaluation drops such clicks too).
        unseen = np.flatnonzero(self.network.item_support.numpy() == 0)
        return {"inputs": list(INFERENCE_INPUTS), "outputs": list(INFERENCE_OUTPUTS), "topk": step.topk,
                "hidden_size": width, "layers": list(self.network.layers), "n_items": self.network.n_items,
                "unseen_items": [int(i) for i in unseen]}


NAN_SCORES = TrainingError("the model produces NaN scores: it did not train properly (a too high learning rate "
                           "or momentum?); retrain it with lower hyper_parameters.optimizer.learning_rate")


def rank_targets(scores, targets, tie_mode):
    """Rank of each row's target among all items (1 = best). scores [n, n_items], targets [n]."""
    target_scores = paddle.take_along_axis(scores, targets.unsqueeze(1), axis=1)
    if bool(paddle.isnan(target_scores).any()):
        raise NAN_SCORES
    higher = (scores > target_scores).astype("int64").sum(axis=1).numpy().astype(np.float64)
    equal = (scores == target_scores).astype("int64").sum(axis=1).numpy().astype(np.float64)
    return tie_ranks(higher, equal, tie_mode)


def tie_ranks(higher, equal, tie_mode):
    """Rank from the count of items scoring higher and equal (equal includes the target itself).

    standard: 1 + #higher (ties in the target's favour); conservative: #higher + #equal (every tie
    ranked above it); median: the middle of the tied block."""
    if tie_mode == "standard":
        return higher + 1
    if tie_mode == "conservative":
        return higher + equal
    return higher + 0.5 * (equal - 1) + 1



# ---- how a step is computed: two strategies with one interface ------------------------------
#   train(batch, samples, batch_size) -> float64 [n_steps]: summed row losses per step
#   evaluate(batch, topk, tie_mode) -> EvalOutput
# Both read and write the model's parameters, optimizer slots and carried hidden state.

class ReferenceStep:
    """Paddle operators with autograd: any device, every option (adam too, distributed
    gradient combining between backward and update)."""

    name = "reference"
    draw_negatives = staticmethod(draw_negatives)  # NegativeSampler's fill

    def __init__(self, model):
        self.model = model
        support = np.maximum(model.sampling_support(), 1).astype(np.float64)
        self.log_support = np.log(support).astype(np.float32)  # [n_items]: log of each item's sampling support

    def train(self, batch, samples, batch_size):
        losses = np.zeros(batch.n_steps, np.float64)
        for s in range(batch.n_steps):
            inputs, targets, carry, _ = batch.step(s)
            losses[s] = self.train_one(inputs, targets, carry, None if samples is None else samples[s], batch_size)
        return losses

    def carried(self, carry):
        """Hidden states for rows continuing from the previous step (carry >= 0) or starting at zero."""
        model = self.model
        n = len(carry)
        if model.hidden is None or (carry < 0).all():
            return [paddle.zeros([n, size]) for size in model.network.layers]
        index = paddle.to_tensor(carry + 1)
        return [paddle.gather(paddle.concat([paddle.zeros([1, h.shape[1]]), h]), index) for h in model.hidden]

    def train_one(self, inputs, targets, carry, sample, batch_size):
        """One mini-batch: forward, loss, backward, update. Returns the summed row losses."""
        model = self.model
        net, hp = model.network, model.hp
        n = len(inputs)
        if sample is None and model.loss_kind != "full_softmax" and n < 2:
            return 0.0  # a lone row has no negative without shared samples: the official code ends the epoch here
        hidden = self.carried(carry)
        if model.loss_kind == "full_softmax":
            y_host = np.arange(net.n_items, dtype=np.int64)
        elif sample is not None:
            y_host = np.concatenate([targets, sample])
        else:
            y_host = targets
        x_ids, y_ids = paddle.to_tensor(inputs), paddle.to_tensor(y_host)

        sparse_rows, leaves = {}, {}

        def rows_of(name, ids, host_ids):
            # a detached copy of the rows this step uses: its gradient is the sparse gradient
            leaf = paddle.gather(getattr(net, name), ids).detach()
            leaf.stop_gradient = False
            sparse_rows.setdefault(name, []).append((host_ids, leaf))
            return leaf

        def dense(name):
            leaf = getattr(net, name).detach()
            leaf.stop_gradient = False
            leaves[name] = leaf
            return leaf

        start = 0
        if net.embedding == "shared":
            both_host = np.concatenate([inputs, y_host])
            both = rows_of("item_emb", paddle.to_tensor(both_host), both_host)
            x, out_rows = both[:n], both[n:]
        else:
            out_rows = rows_of("item_emb", y_ids, y_host)
            if net.embedding == "separate":
                x = rows_of("input_emb", x_ids, inputs)
            else:
                gi = rows_of("gru0_w_ih", x_ids, inputs) + dense("gru0_b_ih")
                x = gru_cell(gi, hidden[0], dense("gru0_w_hh"), dense("gru0_b_hh"))
                start = 1
        new_hidden = []
        if hp["dropout_embed"] > 0:
            x = F.dropout(x, hp["dropout_embed"], training=True)
        if start == 1:
            new_hidden.append(x)
        for l in range(start, len(net.layers)):
            gi = paddle.matmul(x, dense(f"gru{l}_w_ih")) + dense(f"gru{l}_b_ih")
            x = gru_cell(gi, hidden[l], dense(f"gru{l}_w_hh"), dense(f"gru{l}_b_hh"))
            if hp["dropout_hidden"] > 0:
                x = F.dropout(x, hp["dropout_hidden"], training=True)
            new_hidden.append(x)  # the dropped-out state is what the next step continues from
        bias = rows_of("item_bias", y_ids, y_host)
        scores = paddle.matmul(x, out_rows, transpose_y=True) + bias  # [n, columns]

        if model.loss_kind == "full_softmax":
            loss = F.cross_entropy(scores, paddle.to_tensor(targets).unsqueeze(1), reduction="sum")
        else:
            shift = None
            if model.loss_kind == "cross-entropy" and hp["logq"] > 0:
                shift = hp["logq"] * self.log_sampling_weight(targets, sample)
            loss = sampled_loss(model.loss_kind, scores, shift, hp["bpreg"], hp["elu_param"])
        (loss / batch_size).backward()

        dense_grads = {name: leaf.grad for name, leaf in leaves.items()}
        sparse_grads = {}
        for name, parts in sparse_rows.items():
            rows = np.concatenate([ids for ids, _ in parts]) if len(parts) > 1 else parts[0][0]
            grads = paddle.concat([leaf.grad for _, leaf in parts]) if len(parts) > 1 else parts[0][1].grad
            sparse_grads[name] = (rows, grads)
        if model.grad_reducer is not None:
            dense_grads, sparse_grads = model.grad_reducer(dense_grads, sparse_grads)
        with paddle.no_grad():
            model.optimizer.apply(dense_grads, sparse_grads)
        model.hidden = [h.detach() for h in new_hidden]
        return float(loss.item())

    def log_sampling_weight(self, targets, sample):
        """log of each column's sampling weight: support for the mini-batch targets (drawn by the
        data), support**alpha for the shared negatives (drawn by the sampler)."""
        parts = [self.log_support[targets]]
        if sample is not None:
            parts.append(self.model.hp["sample_alpha"] * self.log_support[sample])
        return paddle.to_tensor(np.concatenate(parts))

    def evaluate(self, batch, topk, tie_mode):
        model = self.model
        net = model.network
        mask = net.score_mask()
        ranks, query_ids, topk_ids, topk_scores = [], [], [], []
        k = min(topk, net.n_items)
        with paddle.no_grad():
            for s in range(batch.n_steps):
                inputs, targets, carry, sessions = batch.step(s)
                hidden = self.carried(carry)
                x, model.hidden = net.step(paddle.to_tensor(inputs), hidden)
                scores = net.all_scores(x) + mask  # [n, n_items]
                has_target = targets >= 0
                if has_target.any():
                    rows = paddle.to_tensor(np.flatnonzero(has_target))
                    ranks.append(rank_targets(paddle.gather(scores, rows), paddle.to_tensor(targets[has_target]),
                                              tie_mode))
                if not has_target.all():
                    ended = np.flatnonzero(~has_target)
                    values, ids = paddle.topk(paddle.gather(scores, paddle.to_tensor(ended)), k, axis=1)
                    query_ids.append(sessions[ended])
                    topk_ids.append(ids.numpy())
                    topk_scores.append(values.numpy())
        cat = lambda parts, shape, dtype: np.concatenate(parts) if parts else np.zeros(shape, dtype)
        return EvalOutput(ranks=cat(ranks, (0,), np.float64), query_ids=cat(query_ids, (0,), np.int64),
                          topk_ids=cat(topk_ids, (0, k), np.int64), topk_scores=cat(topk_scores, (0, k), np.float32))


class FusedStep:
    """One C++ operator call per batch of session-parallel steps (csrc/gru4rec_cpu.cc): the
    arithmetic of ReferenceStep without the per-operator overhead, on every CPU thread."""

    name = "fused"

    def __init__(self, model, module):
        self.model = model
        self.train_op = module.gru4rec_train_steps
        self.eval_op = module.gru4rec_eval_steps
        self.backward_op = module.gru4rec_backward_step  # distributed: gradients of one step ...
        self.update_op = module.gru4rec_update_step  # ... and, once combined, their update
        self.draw_op = module.gru4rec_draw_negatives
        self.alias_tensors = None  # (the sampler's accept array, it and alias as tensors), made at its first draw
        support = np.maximum(model.sampling_support(), 1).astype(np.float64)
        self.log_support = paddle.to_tensor(np.log(support).astype(np.float32))  # [n_items]
        self.score_mask = None  # [n_items]: 0, or -inf for items never seen in training; set at evaluation

    def parameters(self):
        net = self.model.network
        return [getattr(net, n) for n in net.param_names]

    @paddle.no_grad()
    def draw_negatives(self, accept, alias, key, block, start, count):
        """NegativeSampler's fill on every thread; the same ids as draw_negatives (tested)."""
        key = int(np.array([key], np.uint64).view(np.int64)[0])  # the operator takes int64 attributes
        if self.alias_tensors is None or self.alias_tensors[0] is not accept:
            self.alias_tensors = (accept, paddle.to_tensor(accept), paddle.to_tensor(alias))
        ids = self.draw_op(*self.alias_tensors[1:], key, int(block), int(start), int(count))
        return np.from_dlpack(ids)  # no copy (.numpy() copies, ~4 ms per million ids)

    def hidden(self):
        model = self.model
        if model.hidden is not None:
            return model.hidden
        return paddle.zeros([0, sum(model.network.layers)])

    def slots(self):
        net, opt = self.model.network, self.model.optimizer
        slots = []
        if opt.kind == "adagrad":
            slots += [opt.state[f"{n}.acc"] for n in net.param_names]
        if opt.momentum > 0:
            slots += [opt.state[f"{n}.mom"] for n in net.param_names]
        return slots

    def train_attributes(self, batch_size):
        model = self.model
        net, hp, opt = model.network, model.hp, model.optimizer
        return fused_ops.attributes(fused_ops.TRAIN_ATTRS, dict(
            embedding=fused_ops.EMBEDDING_CODES[net.embedding], loss_kind=fused_ops.LOSS_CODES[model.loss_kind],
            optimizer=fused_ops.OPTIMIZER_CODES[opt.kind], batch_size=int(batch_size),
            dropout_embed=float(hp["dropout_embed"]), dropout_hidden=float(hp["dropout_hidden"]),
            logq=float(hp["logq"]), sample_alpha=float(hp["sample_alpha"]), bpreg=float(hp["bpreg"]),
            elu=float(hp["elu_param"]), lr=float(opt.lr), momentum=float(opt.momentum),
            seed=int(model.step_rng.integers(0, 2 ** 62))))

    # no_grad: the operators do their own backward pass; recording them for Paddle's autograd
    # costs some 6 ms per call (measured: 7% of an epoch at 64 steps per call)
    @paddle.no_grad()
    def train(self, batch, samples, batch_size):
        if self.model.grad_reducer is not None:
            return self.train_combined(batch, samples, batch_size)
        model = self.model
        sample_t = paddle.to_tensor(samples) if samples is not None else paddle.zeros([0, 0], dtype="int64")
        losses, model.hidden = self.train_op(
            self.parameters(), self.slots(), self.hidden(), paddle.to_tensor(batch.step_offsets),
            paddle.to_tensor(batch.inputs), paddle.to_tensor(batch.targets), paddle.to_tensor(batch.carry), sample_t,
            self.log_support, *self.train_attributes(batch_size))
        return losses.numpy().astype(np.float64)

    @paddle.no_grad()
    def train_combined(self, batch, samples, batch_size):
        """Step by step: gradients, model.grad_reducer (distributed training combines the workers'
        gradients there: {name: Tensor} dense, {name: (rows, Tensor)} row-sparse, as ReferenceStep
        gives them), then the update of what it returns."""
        model = self.model
        net, opt = model.network, model.optimizer
        sparse_names = net.row_sparse
        dense_names = [n for n in net.param_names if n not in sparse_names]  # the operator's flat order
        dense_shapes = [list(getattr(net, n).shape) for n in dense_names]
        dense_sizes = [int(np.prod(s)) for s in dense_shapes]
        params, slots = self.parameters(), self.slots()
        update_attrs = fused_ops.attributes(fused_ops.APPLY_ATTRS, dict(
            embedding=fused_ops.EMBEDDING_CODES[net.embedding], optimizer=fused_ops.OPTIMIZER_CODES[opt.kind],
            lr=float(opt.lr), momentum=float(opt.momentum)))
        losses = np.zeros(batch.n_steps, np.float64)
        for s in range(batch.n_steps):
            inputs, targets, carry, _ = batch.step(s)
            if samples is None and model.loss_kind != "full_softmax" and len(inputs) < 2:
                continue  # no negative for a lone row: as ReferenceStep, no update (and no exchange)
            sample_t = (paddle.to_tensor(samples[s:s + 1]) if samples is not None
                        else paddle.zeros([0, 0], dtype="int64"))
            loss, hidden, dense, *tables = self.backward_op(
                params, self.hidden(), paddle.to_tensor(inputs), paddle.to_tensor(targets),
                paddle.to_tensor(carry), sample_t, self.log_support, *self.train_attributes(batch_size))
            losses[s] = float(loss.numpy()[0])
            if not np.isfinite(losses[s]):
                break  # the train loop reports it
            dense_grads = {n: g.reshape(shape) for n, g, shape in
                           zip(dense_names, paddle.split(dense, dense_sizes), dense_shapes)}
            sparse_grads = {}
            for k, name in enumerate(sparse_names):
                rows, grads = tables[2 * k].numpy(), tables[2 * k + 1]
                sparse_grads[name] = (rows, grads.reshape([len(rows)] + list(getattr(net, name).shape[1:])))
            dense_grads, sparse_grads = model.grad_reducer(dense_grads, sparse_grads)
            flat = paddle.concat([dense_grads[n].reshape([-1]) for n in dense_names])
            combined = []
            for k in range(3):
                if k < len(sparse_names):
                    rows, grads = sparse_grads[sparse_names[k]]
                    combined += [paddle.to_tensor(np.asarray(rows, np.int64)), grads.reshape([len(rows), -1])]
                else:
                    combined += [paddle.zeros([0], dtype="int64"), paddle.zeros([0, 1])]
            self.update_op(params, slots, flat, *combined, *update_attrs)
            model.hidden = hidden
        return losses

    @paddle.no_grad()
    def evaluate(self, batch, topk, tie_mode):
        net = self.model.network
        if self.score_mask is None:
            self.score_mask = net.score_mask()
        attrs = fused_ops.attributes(fused_ops.EVAL_ATTRS, dict(
            embedding=fused_ops.EMBEDDING_CODES[net.embedding], topk=int(topk)))
        higher, equal, topk_ids, topk_scores, self.model.hidden = self.eval_op(
            self.parameters(), self.hidden(), paddle.to_tensor(batch.step_offsets), paddle.to_tensor(batch.inputs),
            paddle.to_tensor(batch.targets), paddle.to_tensor(batch.carry), self.score_mask, *attrs)
        higher, equal = higher.numpy().astype(np.float64), equal.numpy().astype(np.float64)
        if (higher < 0).any():  # the operator marks a NaN target score with -1
            raise NAN_SCORES
        ended = batch.targets < 0
        return EvalOutput(ranks=tie_ranks(higher, equal, tie_mode), query_ids=batch.sessions[ended],
                          topk_ids=topk_ids.numpy(), topk_scores=topk_scores.numpy())


def fused_limits(model):
    """Why the fused step cannot train this model here, or None."""
    if paddle.get_device() != "cpu":
        return f"it runs on the CPU only (device is {paddle.get_device()})"
    if model.hp["optimizer.class"] not in fused_ops.OPTIMIZER_CODES:
        return f"it implements {' and '.join(fused_ops.OPTIMIZER_CODES)}, not {model.hp['optimizer.class']}"
    return None


def choose_train_impl(model):
    choice = model.hp["kernel"]
    if choice == "reference":
        return ReferenceStep(model)
    reason = fused_limits(model)
    if reason is None:
        try:
            return FusedStep(model, fused_ops.load())
        except fused_ops.KernelUnavailable as exc:
            reason = f"it could not be built ({exc}); run `sh setup.sh`"
    if choice == "fused":
        raise ConfigError("hyper_parameters.kernel", f"fused, but {reason}; set `kernel: auto` or `reference`")
    log.info("training with Paddle operators (kernel: reference) because the fused kernel: %s", reason)
    return ReferenceStep(model)
