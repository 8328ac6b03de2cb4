"""MAD synthetic tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures"): seeded generators with MAD-Lab's settings, training and evaluation of lab models.

The generators follow MAD-Lab's ``mad/data/instances.py`` (github.com/athms/mad-lab) line by line,
with one change: every random draw comes from the task's seeded ``numpy`` generator (MAD-Lab's
selective copying inserts its blanks with the global ``np.random``, so its instances do not follow
the seed). Task settings are MAD-Lab's ``configs/tasks/*.yml`` baselines (``paper`` preset) or a
smaller setting that trains in minutes on a 2-core CPU (``tiny``). Language-model tasks train on
the shifted inputs and are scored on the positions MAD scores (the recalled values, the copied
tokens, the memorised values); compression trains MAD's auto-encoder (the model encodes the
sequence into its last position, a small MLP decoder reconstructs every token).
Accuracy is the fraction of scored positions predicted exactly (micro average).
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from itertools import permutations
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..cells.norms import RMSNorm
from ..cells.xlstm_2024 import Module2024
from ..checks import is_integer
from ..monitor import current_job
from .model import LabConfig, LabModel, build_model

IGNORE = -100


# ===================================================================== generators (MAD-Lab)
def _vocab_permutations(vocab, motif_size: int, rng: np.random.Generator | None):
    values = list(permutations(vocab, motif_size))
    if rng is not None:
        rng.shuffle(values)
    return values


def in_context_recall(vocab_size=16, seq_len=128, is_training=True, rng=None, multi_query=False,
                      noise_vocab_size=16, frac_noise=0.0, **_):
    """Key-value pairs; the model recalls the value of a key seen before. (inputs, targets) [seq_len]."""
    rng = rng if rng is not None else np.random.default_rng()
    copy_prefix = vocab_size - 1
    non_special = (vocab_size if multi_query else vocab_size - 1) - noise_vocab_size
    key_vocab = np.arange(non_special // 2)
    value_vocab = np.arange(non_special // 2, non_special)
    if not 0 <= frac_noise < 1:
        raise ValueError("frac_noise must be 0 <= frac_noise < 1")
    if frac_noise > 0:
        if noise_vocab_size <= 0:
            raise ValueError("noise_vocab_size must be > 0 if frac_noise > 0")
        noise_vocab = np.arange(non_special, non_special + noise_vocab_size)
    kv_map, inputs, targets, presented = {}, [], [], {}
    if seq_len % 2:
        raise ValueError("seq_len must be an even number")
    num_pairs = seq_len // 2
    not_noise_idx = rng.choice(num_pairs)
    for i in range(num_pairs - 1):
        is_noise = rng.random() < frac_noise if i != not_noise_idx and frac_noise > 0 else False
        if is_noise:
            inputs += list(rng.choice(noise_vocab, size=2, replace=True))
            targets += [IGNORE] * 2
        else:
            k = rng.choice(key_vocab)
            if k not in kv_map:
                kv_map[k] = rng.choice(value_vocab)
            v = kv_map[k]
            inputs += [k, v]
            targets.append(IGNORE)
            targets.append(v if (k in presented and multi_query) else IGNORE)
            presented[k] = v
    k_probe = rng.choice(list(presented.keys()))
    v_probe = presented[k_probe]
    if not multi_query:
        inputs.append(copy_prefix)
    inputs += [k_probe, v_probe]
    if not multi_query:
        targets.append(IGNORE)
    targets += [IGNORE, v_probe]
    inputs, targets = np.array(inputs).astype(int), np.array(targets).astype(int)
    return (inputs[:-1], inputs[1:]) if is_training else (inputs[:-1], targets[1:])


def noisy_in_context_recall(vocab_size=32, seq_len=128, noise_vocab_size=16, frac_noise=0.2, is_training=True,
                            rng=None, multi_query=False, **_):
    """In-context recall with noise tokens between the pairs."""
    return in_context_recall(vocab_size=vocab_size, seq_len=seq_len, is_training=is_training, rng=rng,
                             multi_query=multi_query, noise_vocab_size=noise_vocab_size, frac_noise=frac_noise)


def fuzzy_in_context_recall(vocab_size=16, seq_len=128, k_motif_size=3, v_motif_size=3, is_training=True, rng=None,
                            multi_query=False, noise_vocab_size=0, frac_noise=0.0, **_):
    """Keys and values of 1..k_motif_size / 1..v_motif_size tokens; recall the value of a key."""
    rng = rng if rng is not None else np.random.default_rng()
    copy_prefix = vocab_size - 1
    pad_token = vocab_size - 2 if not multi_query else vocab_size - 1
    non_special = (vocab_size - 2 if not multi_query else vocab_size - 1) - noise_vocab_size
    key_vocab = np.arange(non_special // 2)
    value_vocab = np.arange(non_special // 2, non_special)
    if is_training:
        keys = {s: _vocab_permutations(key_vocab, s, rng) for s in range(1, k_motif_size + 1)}
    else:
        keys = {k_motif_size: _vocab_permutations(key_vocab, k_motif_size, rng)}
    values = {s: _vocab_permutations(value_vocab, s, rng) for s in range(1, v_motif_size + 1)}
    if frac_noise > 0:
        noise_vocab = np.arange(non_special, non_special + noise_vocab_size)
    k_probe_size = rng.choice(list(keys.keys())) if is_training else k_motif_size
    v_probe_size = rng.choice(list(values.keys()))
    k_probe = tuple(rng.choice(keys[k_probe_size]))
    v_probe = tuple(rng.choice(values[v_probe_size]))
    kv_probe_size = k_probe_size + v_probe_size
    probe_idx = rng.choice(seq_len - kv_probe_size - kv_probe_size)
    probe_added = False
    kv_map = {s: {} for s in range(1, k_motif_size + 1)}
    inputs, targets, presented = [], [], {}
    while len(inputs) < seq_len - kv_probe_size - (k_motif_size + v_motif_size):
        k_size = rng.choice(list(keys.keys())) if is_training else k_motif_size
        v_size = rng.choice(list(values.keys()))
        if len(inputs) >= probe_idx and not probe_added:
            inputs.extend(k_probe)
            inputs.extend(v_probe)
            targets.extend([IGNORE] * (k_probe_size + len(v_probe)))
            kv_map[k_probe_size][k_probe] = v_probe
            presented[k_probe] = v_probe
            probe_added = True
            continue
        is_noise = rng.random() < frac_noise if frac_noise > 0 else False
        if is_noise:
            size = k_size + v_size
            inputs.extend(rng.choice(noise_vocab, size=size, replace=True))
            targets.extend([IGNORE] * size)
            continue
        k = tuple(rng.choice(keys[k_size]))
        inputs.extend(k)
        if k == k_probe:
            v = v_probe
            probe_added = True
        elif k not in kv_map[k_size]:
            v = tuple(rng.choice(values[v_size]))
            kv_map[k_size][k] = v
        else:
            v = kv_map[k_size][k]
        inputs.extend(v)
        targets.extend([IGNORE] * k_size)
        targets.extend(v if (k in presented and multi_query) else [IGNORE] * len(v))
        presented[k] = v
    if not multi_query:
        inputs.append(copy_prefix)
        targets.append(IGNORE)
    inputs.extend(k_probe)
    inputs.extend(v_probe)
    targets.extend([IGNORE] * k_probe_size)
    targets.extend(v_probe)
    inputs, targets = np.array(inputs).astype(int), np.array(targets).astype(int)
    if len(inputs) < seq_len + 1:
        n_pad = seq_len + 1 - len(inputs)
        inputs = np.concatenate([np.full(n_pad, pad_token), inputs])
        targets = np.concatenate([np.full(n_pad, IGNORE), targets])
    return (inputs[:-1], inputs[1:]) if is_training else (inputs[:-1], targets[1:])


def generate_kv_map(vocab_size: int, seed: int = 12345) -> dict:
    """Fixed key -> value map of the memorisation task (MAD-Lab's generate_kv_map, motif size 1)."""
    rng = np.random.default_rng(seed)
    keys = _vocab_permutations(np.arange(vocab_size // 2), 1, rng)
    values = _vocab_permutations(np.arange(vocab_size // 2, vocab_size), 1, rng)
    return dict(zip(keys, values))


def memorization(vocab_size=256, seq_len=32, kv_map=None, noise_vocab_size=0, frac_noise=0.0, rng=None,
                 kv_map_seed=12345, **_):
    """Key, insert token; the model must output the key's fixed value (learned in the weights)."""
    if seq_len % 2:  # pairs: an odd length made sequences one token short
        raise ValueError(f"memorization: seq_len must be even (key, insert-token pairs), got {seq_len}")
    rng = rng if rng is not None else np.random.default_rng()
    insert_token = vocab_size - 1
    non_special = vocab_size - 1 - noise_vocab_size
    if kv_map is None:
        kv_map = generate_kv_map(non_special, kv_map_seed)
    keys = list(kv_map.keys())
    if frac_noise > 0:
        noise_vocab = np.arange(non_special, non_special + noise_vocab_size)
    inputs, targets = [], []
    num_pairs = seq_len // 2
    not_noise_idx = rng.choice(num_pairs)
    for i in range(num_pairs):
        is_noise = rng.random() < frac_noise if i != not_noise_idx and frac_noise > 0 else False
        if is_noise:
            inputs.append(rng.choice(noise_vocab, size=2, replace=True))
            targets.append([IGNORE] * 2)
        else:
            k = tuple(rng.choice(keys))
            inputs += [k, [insert_token]]
            targets += [[IGNORE], kv_map[k]]
    return np.concatenate(inputs).astype(int), np.concatenate(targets).astype(int)


def compression(vocab_size=16, seq_len=32, noise_vocab_size=0, frac_noise=0.0, rng=None, **_):
    """Random tokens and a compression token; the auto-encoder reconstructs the sequence."""
    rng = rng if rng is not None else np.random.default_rng()
    token = vocab_size - 1
    non_special = vocab_size - 1 - noise_vocab_size
    inputs = rng.choice(np.arange(non_special), size=(seq_len - 1,), replace=True)
    inputs = np.concatenate([inputs, [token]])
    if frac_noise > 0:
        noise_vocab = np.arange(non_special, non_special + noise_vocab_size)
        for i in range(seq_len - 1):
            if rng.random() < frac_noise:
                inputs[i] = rng.choice(noise_vocab)
    return inputs, inputs.copy()


def selective_copying(vocab_size=16, seq_len=256, num_tokens_to_copy=16, rng=None, **_):
    """Tokens scattered among blanks; after the copy token the model outputs them in order."""
    rng = rng if rng is not None else np.random.default_rng()
    copy_token, blank_token = vocab_size - 1, vocab_size - 2
    if seq_len <= num_tokens_to_copy * 2 + 1:
        raise ValueError("seq_len must be > (num_tokens_to_copy * 2) + 1")
    num_blank = seq_len - num_tokens_to_copy * 2 - 1
    to_copy = rng.choice(np.arange(vocab_size - 2), size=(num_tokens_to_copy,), replace=True)
    # MAD-Lab draws these positions from the global np.random; the task's generator keeps them seeded.
    positions = rng.integers(0, num_tokens_to_copy, num_blank)
    inputs = np.insert(np.array(to_copy), positions, [blank_token] * num_blank).tolist()
    inputs += [copy_token] + [blank_token] * num_tokens_to_copy
    targets = [IGNORE] * (num_tokens_to_copy + num_blank + 1) + list(to_copy)
    return np.array(inputs), np.array(targets)


# ====================================================================== tasks and presets
@dataclass(frozen=True)
class TaskSpec:
    name: str
    generator: Callable
    settings: dict[str, Any]
    num_train: int
    num_test: int
    autoencoder: bool = False
    #: Language-model tasks train on the shifted inputs (MAD's is_training=True instances).
    shifted_training: bool = True


#: MAD-Lab's baselines (configs/tasks/*.yml; MADConfig defaults: 1,280 test examples).
PAPER_TASKS = {
    "in_context_recall": TaskSpec("in_context_recall", in_context_recall,
                                  dict(vocab_size=16, seq_len=128, multi_query=True, noise_vocab_size=0), 12_800, 1_280),
    "fuzzy_in_context_recall": TaskSpec("fuzzy_in_context_recall", fuzzy_in_context_recall,
                                        dict(vocab_size=16, seq_len=128, multi_query=True, k_motif_size=3,
                                             v_motif_size=3), 12_800, 1_280),
    "noisy_in_context_recall": TaskSpec("noisy_in_context_recall", noisy_in_context_recall,
                                        dict(vocab_size=32, noise_vocab_size=16, seq_len=128, multi_query=True,
                                             frac_noise=0.2), 12_800, 1_280),
    "selective_copying": TaskSpec("selective_copying", selective_copying,
                                  dict(vocab_size=16, seq_len=256, num_tokens_to_copy=16), 12_800, 1_280,
                                  shifted_training=False),
    "compression": TaskSpec("compression", compression, dict(vocab_size=16, seq_len=32), 12_800, 1_280,
                            autoencoder=True, shifted_training=False),
    "memorization": TaskSpec("memorization", memorization, dict(vocab_size=256, seq_len=32), 256, 1_280,
                             shifted_training=False),
}
TASKS = tuple(PAPER_TASKS)


@dataclass(frozen=True)
class Preset:
    """Model width, optimiser and per-task overrides of the sizes."""

    name: str
    dim: int
    num_heads: int
    batch_size: int
    epochs: int
    lr: float
    weight_decay: float = 0.0
    min_lr: float = 1e-6
    warmup: float = 0.0  # fraction of the steps with a linear warm-up
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:  # batch_size 0 failed in run_task as a ZeroDivisionError
        for name in ("dim", "num_heads", "batch_size", "epochs"):
            if not is_integer(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"preset {self.name!r}: {name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"preset {self.name!r}: lr must be a finite number > 0, got {self.lr!r}")

    def task(self, name: str) -> TaskSpec:
        if name not in PAPER_TASKS:  # was a bare KeyError
            raise ValueError(f"unknown MAD task {name!r}; choose from {', '.join(TASKS)}")
        base = PAPER_TASKS[name]
        over = dict(self.task_overrides.get(name, {}))
        # the generators take **_: a misspelt setting was ignored
        known = set(inspect.signature(base.generator).parameters) - {"rng", "is_training", "_"}
        unknown = sorted(set(over) - known - {"num_train", "num_test", "epochs"})
        if unknown:
            raise ValueError(f"task {name}: unknown setting(s) {unknown}; known: {sorted(known)}")
        num_train = over.pop("num_train", base.num_train)
        num_test = over.pop("num_test", base.num_test)
        return replace(base, settings={**base.settings, **over}, num_train=num_train, num_test=num_test)


PRESETS = {
    # MAD-Lab's training settings: width 128, batch 128, 200 epochs, AdamW lr 5e-4, cosine to 1e-6.
    "paper": Preset("paper", dim=128, num_heads=4, batch_size=128, epochs=200, lr=5e-4),
    # Minutes on a 2-core CPU: shorter sequences and fewer examples, same task definitions.
    "tiny": Preset("tiny", dim=64, num_heads=4, batch_size=64, epochs=12, lr=3e-3, warmup=0.05, task_overrides={
        "in_context_recall": dict(seq_len=32, num_train=8_192, num_test=256),
        "fuzzy_in_context_recall": dict(seq_len=48, num_train=8_192, num_test=256),
        "noisy_in_context_recall": dict(seq_len=48, num_train=8_192, num_test=256),
        "selective_copying": dict(seq_len=48, num_tokens_to_copy=8, num_train=8_192, num_test=256),
        "compression": dict(seq_len=16, num_train=8_192, num_test=256),
        "memorization": dict(vocab_size=64, num_train=256, num_test=256, epochs=200),
    }),
}


def task_names(text: str | None) -> list[str]:
    """Task names from a comma list (None: all). ValueError naming an unknown one, or for a list
    naming none (``--tasks ''`` is no request for all six)."""
    if text is None:
        return list(TASKS)
    names = [t.strip().replace("-", "_") for t in text.split(",") if t.strip()]
    if names and len(names) < len(text.split(",")):  # "a,,b" or "a,": a task left out or mistyped
        raise ValueError(f"an empty entry in --tasks {text!r}: give comma-separated task names")
    unknown = [t for t in names if t not in PAPER_TASKS]
    if unknown:
        raise ValueError(f"unknown MAD task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if not names:
        raise ValueError(f"--tasks {text!r} names no task; choose from {', '.join(TASKS)}")
    twice = sorted({t for t in names if names.count(t) > 1})
    if twice:  # each would be trained and scored again, and weigh twice in the mean
        raise ValueError(f"--tasks names {', '.join(twice)} more than once")
    return names


def generate(task: TaskSpec, num: int, seed: int, training: bool) -> tuple[np.ndarray, np.ndarray]:
    """``num`` instances [num, S] (int32) of ``task``, from a generator seeded by (seed, split)."""
    if not is_integer(num) or num < 1:  # np.stack failed on no instances
        raise ValueError(f"num must be a positive integer, got {num!r}")
    rng = np.random.default_rng([seed, 1 if training else 2])
    kwargs = dict(task.settings)
    if task.name == "memorization" and kwargs.get("kv_map") is None:
        # One fixed map for train and test (the task is to store it in the weights), over the
        # tokens that are neither the insert token nor noise (as the generator's own map; it took
        # the noise tokens as keys and values), seeded by kv_map_seed where the settings give it.
        non_special = kwargs["vocab_size"] - 1 - kwargs.get("noise_vocab_size", 0)
        kwargs["kv_map"] = generate_kv_map(non_special, kwargs.get("kv_map_seed", seed))
    if task.shifted_training:
        kwargs["is_training"] = training
    try:
        pairs = [task.generator(rng=rng, **kwargs) for _ in range(num)]
    except (ValueError, IndexError, ZeroDivisionError) as err:  # too small a vocabulary or length failed in NumPy
        raise ValueError(f"MAD task {task.name}: no instance can be made with {task.settings}: {err}") from None
    inputs = np.stack([p[0] for p in pairs]).astype(np.int32)
    targets = np.stack([p[1] for p in pairs]).astype(np.int32)
    return inputs, targets


# ============================================================================ models
def sincos_positions(length: int, dim: int) -> mx.array:
    """MAD's fixed 1-D sine-cosine position embeddings [length, dim]."""
    pos = np.arange(length)[:, None]
    omega = 1.0 / (10000 ** (np.arange(dim // 2) / (dim // 2 - 1 if dim > 2 else 1)))
    angles = pos * omega[None]
    pad = np.zeros((length, dim % 2))  # MAD-Lab's zero column: an odd width was one short
    return mx.array(np.concatenate([np.sin(angles), np.cos(angles), pad], axis=1).astype(np.float32))


class AutoEncoder(Module2024):
    """MAD's auto-encoder backbone: the lab model encodes, the last position is the code, an MLP
    decoder with position embeddings predicts every token. ids [B, S] -> logits [B, S, V].
    (A Module2024, like the lab model, so the sLSTM's ``_recurrent_kernel_`` is a parameter.)"""

    def __init__(self, encoder: LabModel, seq_len: int):
        super().__init__()
        E, V = encoder.config.embedding_dim, encoder.config.vocab_size
        self.encoder = encoder
        self.decoder = [RMSNorm(E), nn.Linear(E, E), RMSNorm(E), nn.Linear(E, E)]
        self.unembed_norm = RMSNorm(E)
        self.unembed = nn.Linear(E, V)
        self._positions = sincos_positions(seq_len, E)  # constant (not a parameter: "_" prefix)

    def __call__(self, ids: mx.array) -> mx.array:
        h, _ = self.encoder.hidden(ids)
        x = h[:, -1:, :] + self._positions[None, : ids.shape[1]]
        norm1, lin1, norm2, lin2 = self.decoder
        x = nn.gelu(lin1(norm1(x)))
        x = nn.gelu(lin2(norm2(x)))
        return self.unembed(self.unembed_norm(x))


def _masked_ce(logits: mx.array, targets: mx.array) -> mx.array:
    mask = targets != IGNORE
    ce = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0), reduction="none")
    return (ce * mask).sum() / mx.maximum(mask.sum(), 1)


@dataclass
class TaskResult:
    task: str
    accuracy: float
    loss: float
    chance: float
    steps: int
    seconds: float
    parameters: int
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Valid JSON: a diverged loss (NaN / inf) is null, with diverged: true (strict readers
        refused results.json's NaN / Infinity)."""
        out = asdict(self)
        if not math.isfinite(self.loss):
            out.update(loss=None, diverged=True)
        return out


def chance_accuracy(task: TaskSpec) -> float:
    """Accuracy of guessing uniformly among the values a scored position can take."""
    s = task.settings
    if task.name in ("in_context_recall", "noisy_in_context_recall"):
        n = (s["vocab_size"] if s.get("multi_query") else s["vocab_size"] - 1) - s.get("noise_vocab_size", 0)
        return 1.0 / (n - n // 2)
    # (noise tokens are no keys or values: the noise vocabulary comes off, as in the generators)
    if task.name == "fuzzy_in_context_recall":
        n = (s["vocab_size"] - 1 if s.get("multi_query") else s["vocab_size"] - 2) - s.get("noise_vocab_size", 0)
        return 1.0 / (n - n // 2)
    if task.name == "memorization":
        n = s["vocab_size"] - 1 - s.get("noise_vocab_size", 0)
        return 1.0 / (n - n // 2)
    if task.name == "selective_copying":
        return 1.0 / (s["vocab_size"] - 2)
    return 1.0 / (s["vocab_size"] - 1)


def run_task(arch, task_name: str, preset: Preset | str = "tiny", *, seed: int = 0, progress: bool = False,
             epochs: int | None = None, safe_point: Callable[[], None] | None = None) -> TaskResult:
    """Train a fresh model of ``arch`` on one MAD task and score it on the test split.

    Inside a job (``xlstm-metal mad`` / ``evolve``) every training step publishes its step and
    loss to the job's status record (``xlstm-metal top``) and is a memory-watchdog safe point:
    ``safe_point`` (default: the job's ``check``) runs after each step, so a hard memory limit
    stops the job within a step, not at the end of the task."""
    if isinstance(preset, str) and preset not in PRESETS:  # was a bare KeyError
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if epochs is not None and (not is_integer(epochs) or epochs < 1):  # 0 ran the preset's epochs
        raise ValueError(f"epochs must be a positive integer or None, got {epochs!r}")
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    task = preset.task(task_name)
    settings = dict(task.settings)
    task_epochs = settings.pop("epochs", preset.epochs)
    task = replace(task, settings=settings)
    epochs = epochs or task_epochs
    train_x, train_y = generate(task, task.num_train, seed, training=True)
    test_x, test_y = generate(task, task.num_test, seed, training=False)
    vocab = settings["vocab_size"]
    if isinstance(arch, LabConfig):  # its architecture at the task's vocabulary and the preset's width
        arch = arch.to_arch()  # (its own sizes were kept: ids past its vocabulary read past the logits)
    model = build_model(arch, vocab_size=vocab, embedding_dim=preset.dim, seed=seed,
                        block_defaults={"num_heads": preset.num_heads})
    net = AutoEncoder(model, train_x.shape[1]) if task.autoencoder else model
    mx.eval(net.parameters())
    params = model.num_parameters()

    steps_per_epoch = max(1, task.num_train // preset.batch_size)
    total = steps_per_epoch * epochs
    warm = int(preset.warmup * total)
    schedule = optim.cosine_decay(preset.lr, total - warm, preset.min_lr)
    if warm:
        schedule = optim.join_schedules([optim.linear_schedule(preset.lr / warm, preset.lr, warm), schedule], [warm])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=preset.weight_decay)

    def forward(x):
        return net(x) if task.autoencoder else net(x)[0]

    def loss_fn(module, x, y):
        return _masked_ce(forward(x), y)

    state = [net.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(x, y):
        loss, grads = nn.value_and_grad(net, loss_fn)(net, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(net, grads)
        return loss

    rng = np.random.default_rng([seed, 3])
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=task_name, unit="step", leave=False)
    job = current_job()  # a no-op outside a job
    check = safe_point or job.check
    loss = mx.array(0.0)
    step = 0
    net.train()
    for _ in range(epochs):
        order = rng.permutation(task.num_train)
        for b in range(steps_per_epoch):
            idx = order[b * preset.batch_size : (b + 1) * preset.batch_size]
            loss = train_step(mx.array(train_x[idx]), mx.array(train_y[idx]))
            mx.eval(loss, state)
            step += 1
            job.update(step=step, loss=loss.item(), lr=opt.learning_rate.item())  # evaluated: no extra sync
            if bar is not None:
                bar.update(1)
                if b % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            check()
    if bar is not None:
        bar.close()
    net.eval()
    correct = count = 0
    for b in range(0, task.num_test, preset.batch_size):
        x, y = mx.array(test_x[b : b + preset.batch_size]), mx.array(test_y[b : b + preset.batch_size])
        pred = mx.argmax(forward(x), axis=-1)
        mask = y != IGNORE
        correct += int(((pred == y) & mask).sum().item())
        count += int(mask.sum().item())
    return TaskResult(task_name, correct / max(count, 1), float(loss.item()), chance_accuracy(task), total,
                      time.perf_counter() - start, params, {**settings, "num_train": task.num_train,
                                                           "num_test": task.num_test, "epochs": epochs,
                                                           "dim": preset.dim, "preset": preset.name})


def aggregate(results: list[TaskResult]) -> float:
    """MAD's aggregate: the mean accuracy over tasks."""
    return float(np.mean([r.accuracy for r in results])) if results else math.nan


def plot_results(results: list[TaskResult], path, title: str) -> None:
    """Bar chart of accuracy per task with chance levels (PNG/SVG by the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(results) + 2.5, 3.6))
    names = [r.task.replace("_", "\n") for r in results]
    xs = np.arange(len(results))
    ax.bar(xs, [r.accuracy for r in results], color="#3b6ea8", label="accuracy")
    ax.scatter(xs, [r.chance for r in results], color="#c0392b", marker="_", s=400, label="chance", zorder=3)
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{title} (mean {aggregate(results):.3f})", fontsize=10, parse_math=False)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    from ..plotting import save_figure

    save_figure(fig, path, overwrite=True)  # whole or not at all (the caller checked --overwrite)


__all__ = ["TASKS", "PRESETS", "PAPER_TASKS", "Preset", "TaskSpec", "TaskResult", "generate", "run_task",
           "aggregate", "plot_results", "task_names", "in_context_recall", "noisy_in_context_recall",
           "fuzzy_in_context_recall", "selective_copying", "compression", "memorization"]
