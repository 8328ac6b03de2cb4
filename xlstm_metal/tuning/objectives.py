"""What a tuning sweep optimises: one trial's parameters -> a result record.

An objective defines its search space on an Optuna trial (:meth:`suggest`) and evaluates a
parameter dict (:meth:`evaluate`) anywhere: in this process or in a Ray worker, so it holds only
picklable settings; loaded models and data are cached per process.

- :class:`SpeedObjective`: inference settings of this machine (kernel, chunk size, prompt piece
  length, step kernel, state dtype, fused projections, OpenBLAS threads on CPUs) for the best
  prefill and/or decode tokens/s. Every trial first runs :func:`~xlstm_metal.profiles.check.check_profile`
  against the float32 reference; one outside the base profile's tolerance is rejected.
- :class:`TrainObjective`: learning rate, warmup, weight decay, batch size, width and depth
  within a parameter budget, for the lowest validation loss after a fixed number of tokens.
- :class:`FunctionObjective`: a known test function (sphere, Rastrigin) over a box, to compare
  samplers and check a backend's parallelism without a model.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Per-process caches (models, references, data), keyed by an objective's cache_key().
_CACHE: dict[Any, Any] = {}

REJECTED = "rejected"
COMPLETE = "complete"
#: A train trial whose loss became NaN or infinite: failed, with no value (see TrainingDiverged).
DIVERGED = "diverged"


class ObjectiveError(ValueError):
    """An objective that no trial could meet (e.g. too little data), found by :meth:`Objective.prepare`
    before the first trial; the message names the problem."""


def _check_int(name: str, value: Any, within: Any = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}" + (f" in {within!r}" if within else ""))


def _check_choices(name: str, values: Any) -> None:  # (a bad choice failed every trial that drew it)
    if not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
    for v in values:
        _check_int(name, v, values)


def base_settings(profile) -> dict[str, Any]:
    """A profile's settings: in run_meta.json, so a --resume after an edit is refused."""
    from ..profiles import load_profile

    return {k: v for k, v in load_profile(profile).to_dict().items() if k not in ("name", "version", "description",
                                                                                   "device")}


class Objective:
    """Base class: ``direction`` is "maximize" or "minimize"; ``metric`` names the value."""

    name = "objective"
    direction = "maximize"
    metric = "value"

    def suggest(self, trial) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def evaluate(self, params: dict[str, Any], prompts: list[str] | None = None,
                 max_new_tokens: int = 32) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {"objective": self.name, "direction": self.direction, "metric": self.metric}

    def prepare(self, out_dir: Path) -> None:
        """Work done once in the driver before any trial (e.g. training a tokenizer); raises
        :class:`ObjectiveError` where every trial would fail."""

    def can_generate(self) -> bool:
        return False

    def loaded_profile(self):
        """The base profile, read once (made, or at the sweep's start) and kept, in Ray workers too:
        each trial re-read it, so an edit made during a sweep changed its later trials."""
        if getattr(self, "_loaded_profile", None) is None:
            from ..profiles import load_profile

            self._loaded_profile = load_profile(self.base_profile)
        return self._loaded_profile


# ------------------------------------------------------------------------------ speed
@dataclass
class SpeedObjective(Objective):
    """Inference speed of ``model`` (a checkpoint directory) or of a random-weight ``shape``.

    ``metric``: "prefill" (tok/s of a ``prefill_length`` prompt), "decode" (tok/s at
    ``decode_batch`` rows) or "both" (their geometric mean). ``base_profile`` gives the weight
    dtype and the tolerance every trial must meet.
    """

    model: str | None = None
    shape: str = "125m"
    base_profile: str = "exact-fp32"
    metric: str = "both"
    prefill_length: int = 512
    decode_batch: int = 1
    decode_tokens: int = 32
    repeats: int = 2
    seed: int = 0
    kernels: tuple[str, ...] = ()
    chunk_sizes: tuple[int, ...] = (16, 32, 64, 128)
    prefill_chunks: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    #: Default: float32, plus bfloat16 when the base profile's tolerance (>= 1e-2) could admit
    #: its rounding (~4e-3 per step, compounding over blocks).
    state_dtypes: tuple[str, ...] = ()
    #: The categorical settings searched (default: those ``metric`` times, see :meth:`_space`); a
    #: resumed sweep passes its own, so one that an older version searched otherwise goes on alike.
    searched: tuple[str, ...] = ()
    name: str = field(default="speed", init=False)
    direction: str = field(default="maximize", init=False)

    def __post_init__(self) -> None:
        if self.metric not in ("prefill", "decode", "both"):
            raise ValueError(f"metric must be prefill, decode or both, got {self.metric!r}")
        if not self.kernels:
            from ..kernels.fast.step import cuda_available

            self.kernels = ("chunkwise", "chunkwise_scan", "parallel") + (("chunkwise_fused",) if cuda_available() else ())
        if not self.state_dtypes:
            loose = self.loaded_profile().max_rel_error >= 1e-2
            self.state_dtypes = ("float32", "bfloat16") if loose else ("float32",)
        for name, choices in self._choices().items():  # a bad choice failed every trial that drew it
            if not choices:
                raise ValueError(f"{name}: no choices to search")
            for choice in choices:
                self.profile_for({name: choice})

    def cache_key(self) -> tuple:
        return ("speed", self.model, None if self.model else self.shape, self.seed)

    def _choices(self) -> dict[str, list]:
        return {"kernel": list(self.kernels), "chunk_size": list(self.chunk_sizes),
                "prefill_chunk": list(self.prefill_chunks), "step_kernel": ["step", "step_fused"],
                "state_dtype": list(self.state_dtypes), "fuse": [True, False]}

    def _space(self) -> dict[str, list]:
        """The categorical settings searched: only those the measurement runs. A prompt runs the
        chunkwise kernel, its chunk size and the piece length; a decode step runs the step kernel
        (one token at a time). The others keep the base profile's values: with --metric decode the
        winner's prompt kernel and pieces were random draws no trial had timed."""
        space = self._choices()
        searched = self.searched or {"prefill": ("kernel", "chunk_size", "prefill_chunk", "state_dtype", "fuse"),
                                     "decode": ("step_kernel", "state_dtype", "fuse")}.get(self.metric, tuple(space))
        return {name: choices for name, choices in space.items() if name in searched}

    def suggest(self, trial) -> dict[str, Any]:
        import mlx.core as mx

        params = {name: trial.suggest_categorical(name, choices) for name, choices in self._space().items()}
        if mx.default_device() == mx.cpu:
            params["blas_threads"] = trial.suggest_int("blas_threads", 1, max(1, os.cpu_count() or 1))
        return params

    def meta(self) -> dict[str, Any]:
        from ..benchmark import shape_config

        # (a config file edited before a --resume timed another model)
        return {**super().meta(), "model": self.model, "shape": None if self.model else self.shape,
                "config": None if self.model else shape_config(self.shape).to_dict(),
                "base_profile": self.base_profile, "base_settings": base_settings(self.loaded_profile()),
                "prefill_length": self.prefill_length,
                "decode_batch": self.decode_batch, "decode_tokens": self.decode_tokens, "repeats": self.repeats,
                "space": {**self._space(), "blas_threads": "1..cpu_count (CPU only)"}}

    def can_generate(self) -> bool:
        return self.model is not None

    def profile_for(self, params: dict[str, Any], name: str = "trial"):
        """The trial's settings as a HyperProfile on top of the base profile (whose values stay
        where the metric searched none: see :meth:`_space`)."""
        from ..benchmark import environment

        base = self.loaded_profile()
        return base.replace(
            name=name, version=1,
            description=f"tuned by `xlstm-metal tune --objective speed` from {base.name}",
            kernels={**base.kernels, "chunkwise": params.get("kernel", base.kernels["chunkwise"]),
                     "step": params.get("step_kernel", base.kernels["step"])},
            chunk_size=params.get("chunk_size", base.chunk_size),
            prefill_chunk=params.get("prefill_chunk", base.prefill_chunk),
            state_dtype=params.get("state_dtype", base.state_dtype), fuse=params.get("fuse", base.fuse),
            blas_threads=params.get("blas_threads"),
            device=environment())

    def _base(self):
        key = self.cache_key()
        if key not in _CACHE:
            if self.model is not None:
                from ..loading import load_model

                model = load_model(self.model, dtype="float32")
            else:
                from ..benchmark import config_recipe, random_model, shape_config
                from ..quantization import quantize_model

                config = shape_config(self.shape)
                model = random_model(config, dtype="float32", seed=self.seed)
                recipe = config_recipe(config)
                if recipe is not None:  # a quantized checkpoint's shape runs quantized, as bench runs it
                    quantize_model(model, recipe=recipe)
            _CACHE[key] = {"model": model, "reference": {}}
        return _CACHE[key]

    def evaluate(self, params, prompts=None, max_new_tokens=32) -> dict[str, Any]:
        from .. import benchmark as bm
        from ..profiles import apply_profile
        from ..profiles.check import check_profile, copy_model

        base = self._base()
        profile = self.profile_for(params)
        model = apply_profile(copy_model(base["model"]), profile)  # checked, then measured
        check = check_profile(base["model"], profile, reference="mlx", decode_steps=2, batch=1, seed=self.seed,
                              reference_cache=base["reference"], subject=model)
        record: dict[str, Any] = {"max_rel_error": check.max_error, "tolerance": check.tolerance}
        if not check.passed:
            return {**record, "status": REJECTED, "value": None,
                    "reason": f"error {check.max_error:.3e} > tolerance {check.tolerance:g} of profile "
                              f"{self.loaded_profile().name}"}
        if self.metric in ("prefill", "both"):
            p = bm.measure_prefill(model, self.prefill_length, chunk=params["prefill_chunk"], repeats=self.repeats,
                                   seed=self.seed)
            record.update(prefill_tok_s=p["tok_s"], ttft_s=p["ttft_s"], prefill_peak_mem_gb=p["peak_mem_gb"])
        if self.metric in ("decode", "both"):
            d = bm.measure_decode(model, self.decode_batch, tokens=self.decode_tokens, seed=self.seed)
            record.update(decode_tok_s=d["tok_s"], ms_per_step=d["ms_per_step"], decode_peak_mem_gb=d["peak_mem_gb"])
        value = {"prefill": lambda: record["prefill_tok_s"], "decode": lambda: record["decode_tok_s"],
                 "both": lambda: math.sqrt(record["prefill_tok_s"] * record["decode_tok_s"])}[self.metric]()
        record.update(status=COMPLETE, value=value)
        if prompts:
            record["outputs"] = _greedy(model, self.model, prompts, max_new_tokens, profile.prefill_chunk)
        return record


def _greedy(model, tokenizer_dir, prompts: list[str], max_new_tokens: int,
            prefill_chunk: int | None = None) -> list[dict[str, str]]:
    """Greedy continuations of ``prompts`` (one {"prompt", "text"} record per prompt) with the
    tokenizer of ``tokenizer_dir``."""
    from ..generation import xLSTMRunner
    from ..generation.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    runner = xLSTMRunner(model, tokenizer, prefill_chunk_size=prefill_chunk)
    out = []
    for prompt in prompts:
        ids = runner.generate(prompt, max_tokens=max_new_tokens, temperature=0.0)
        out.append({"prompt": prompt, "text": tokenizer.decode(ids)})
    return out


# ------------------------------------------------------------------------------ training
@dataclass
class TrainObjective(Objective):
    """Validation loss after ``token_budget`` training tokens of a fresh xLSTM-Large.

    ``data``: text / directory / JSON Lines paths; ``tokenizer``: a tokenizer.json (``prepare``
    trains a byte-level BPE of ``vocab_size`` into the run directory when None). Widths, heads
    and depths whose parameter count exceeds ``param_budget`` are rejected.
    """

    data: tuple[str, ...] = ()
    tokenizer: str | None = None
    vocab_size: int = 512
    token_budget: int = 100_000
    param_budget: int = 2_000_000
    seq_len: int = 64
    val_fraction: float = 0.1
    text_field: str = "text"
    seed: int = 0
    base_profile: str = "exact-fp32"
    widths: tuple[int, ...] = (32, 64, 128, 256)
    heads: tuple[int, ...] = (1, 2, 4)
    max_depth: int = 4
    batches: tuple[int, ...] = (4, 8, 16, 32)
    runs_dir: str | None = None
    name: str = field(default="train", init=False)
    direction: str = field(default="minimize", init=False)
    metric: str = field(default="val_loss", init=False)

    def __post_init__(self) -> None:
        for name in ("widths", "heads", "batches"):
            _check_choices(name, getattr(self, name))
        _check_int("max_depth", self.max_depth)
        # (else every trial was rejected as an invalid shape)
        if not any(E % h == 0 and (E // 2) % h == 0 and E // 2 >= h for E in self.widths for h in self.heads):
            raise ValueError(f"no width {self.widths!r} splits into heads {self.heads!r} (E and E / 2 must divide)")

    def cache_key(self) -> tuple:
        return ("train", self.data, self.tokenizer, self.seq_len, self.val_fraction, self.seed, self.text_field)

    def prepare(self, out_dir: Path) -> None:
        from ..training.data import load_documents, save_tokenizer, tokenizer_config_dict, train_bpe_tokenizer

        if self.runs_dir is None:
            self.runs_dir = str(out_dir / "trials")
        if self.tokenizer is None:
            target = out_dir / "tokenizer"
            if not (target / "tokenizer.json").is_file():
                docs = load_documents(self.data, self.text_field)
                tok = train_bpe_tokenizer((d.text for d in docs), self.vocab_size, show_progress=False)
                save_tokenizer(tok, target, tokenizer_config_dict(tok))
            self.tokenizer = str(target / "tokenizer.json")
        self.check_data()
        self.check_budget()

    def check_budget(self) -> None:
        """ObjectiveError when even the smallest model searched (the narrowest width, one block)
        has more parameters than ``param_budget``: every trial would be rejected."""
        from ..models.xlstm_large import xLSTMLarge
        from ..training.trainer import count_parameters

        E = min(self.widths)
        config = self._config(E, min((h for h in self.heads if E % h == 0), default=1), 1)
        smallest = count_parameters(xLSTMLarge(config))
        if smallest > self.param_budget:
            raise ObjectiveError(f"--param-budget {self.param_budget:,} is below the smallest model searched "
                                 f"({smallest:,} parameters: width {E}, one block, a vocabulary of "
                                 f"{config.vocab_size:,}); every trial would be rejected")

    def _config(self, embedding_dim: int, num_heads: int, num_blocks: int):
        """A trial's model shape: xLSTM-Large with tied embeddings over the tokenizer's vocabulary
        (rounded up to a multiple of 64). ConfigError for a shape that cannot be."""
        from ..config import xLSTMConfig

        vocab = int(math.ceil(self._data()[0].get_vocab_size() / 64) * 64)
        return xLSTMConfig(embedding_dim=embedding_dim, num_heads=num_heads, num_blocks=num_blocks, vocab_size=vocab,
                           tie_word_embeddings=True, chunk_size=min(64, self.seq_len))

    def check_data(self) -> None:
        """ObjectiveError unless the data holds one batch of the smallest batch size searched and
        one validation window (the bounds PackedBatches and validation_windows enforce): with less,
        every trial fails on it. Batch sizes the data cannot fill leave the search space (said on
        stderr): each trial drawing one failed on it."""
        _, train, val = self._data()
        batch = min(self.batches)
        need_train = (batch + 1) * self.seq_len  # a batch of seq_len + 1 windows after an offset < seq_len
        need_val = self.seq_len + 1
        if len(train) < need_train or len(val) < need_val:
            raise ObjectiveError(
                f"too little data for --objective train: it needs {need_train:,} training tokens (the smallest "
                f"batch searched, {batch} x {self.seq_len + 1}) and {need_val:,} validation tokens (one window); "
                f"the data gives {len(train):,} training and {len(val):,} validation tokens (--val-fraction "
                f"{self.val_fraction:g} of {len(train) + len(val):,}); give more data, or lower --seq-len"
                + ("" if len(val) >= need_val else " or raise --val-fraction"))
        fits = tuple(b for b in self.batches if (b + 1) * self.seq_len <= len(train))
        if fits != tuple(self.batches):
            left = sorted(set(self.batches) - set(fits))
            print(f"xlstm-metal tune: batch size(s) {', '.join(map(str, left))} left out of the search: "
                  f"the data gives {len(train):,} training tokens, a batch of b needs (b + 1) x {self.seq_len}",
                  file=sys.stderr)
            self.batches = fits

    def suggest(self, trial) -> dict[str, Any]:
        return {
            "lr": trial.suggest_float("lr", 1e-4, 3e-2, log=True),
            "warmup_fraction": trial.suggest_float("warmup_fraction", 0.0, 0.3),
            "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.2),
            "batch_size": trial.suggest_categorical("batch_size", list(self.batches)),
            "embedding_dim": trial.suggest_categorical("embedding_dim", list(self.widths)),
            "num_heads": trial.suggest_categorical("num_heads", list(self.heads)),
            "num_blocks": trial.suggest_int("num_blocks", 1, self.max_depth),
        }

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "data": list(self.data), "tokenizer": self.tokenizer,
                "token_budget": self.token_budget, "param_budget": self.param_budget, "seq_len": self.seq_len,
                "base_profile": self.base_profile, "base_settings": base_settings(self.loaded_profile()),
                "space": {"lr": "1e-4..3e-2 (log)", "warmup_fraction": "0..0.3", "weight_decay": "0..0.2",
                          "batch_size": list(self.batches), "embedding_dim": list(self.widths),
                          "num_heads": list(self.heads), "num_blocks": f"1..{self.max_depth}"}}

    def can_generate(self) -> bool:
        return True

    def _data(self):
        key = self.cache_key()
        if key not in _CACHE:
            from ..training.data import load_documents, load_tokenizer_file, split_stream, tokenize_documents

            tokenizer = load_tokenizer_file(self.tokenizer)
            docs = load_documents(self.data, self.text_field)
            from ..training.data import BOS_TOKEN, EOS_TOKEN

            stream = tokenize_documents(tokenizer, docs, tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN))
            train, val = split_stream(stream, self.val_fraction, self.seed)
            _CACHE[key] = (tokenizer, train, val)
        return _CACHE[key]

    def evaluate(self, params, prompts=None, max_new_tokens=32) -> dict[str, Any]:
        import mlx.core as mx

        from ..config import ConfigError
        from ..models.xlstm_large import xLSTMLarge
        from ..profiles import apply_profile, init_gates
        from ..training.trainer import Trainer, TrainingConfig, TrainingDiverged, count_parameters, init_xlstm_large

        _, train_stream, val_stream = self._data()
        try:
            config = self._config(params["embedding_dim"], params["num_heads"], params["num_blocks"])
        except ConfigError as err:
            return {"status": REJECTED, "value": None, "reason": f"invalid shape: {err}"}
        profile = self.loaded_profile()
        config = apply_profile(config, profile.replace(chunk_size=None, prefill_chunk=None,
                                                       kernels={**profile.kernels, "chunkwise": "chunkwise"}))
        mx.random.seed(self.seed)
        model = xLSTMLarge(config)
        n_params = count_parameters(model)
        if n_params > self.param_budget:
            return {"status": REJECTED, "value": None, "params": n_params,
                    "reason": f"{n_params:,} parameters > budget {self.param_budget:,}"}
        init_xlstm_large(model, self.seed)
        init_gates(model, profile.init)
        batch = params["batch_size"]
        steps = max(2, self.token_budget // (batch * self.seq_len))
        warmup = min(int(params["warmup_fraction"] * steps), steps - 1)
        cfg = TrainingConfig(seq_len=self.seq_len, batch_size=batch, steps=steps, lr=params["lr"], warmup=warmup,
                             weight_decay=params["weight_decay"], eval_every=max(1, steps // 4), eval_batches=8,
                             save_every=steps + 1, keep=1, log_every=max(1, steps // 20), seed=self.seed)
        run_dir = Path(self.runs_dir or ".") / f"trial-{params.get('_trial', 0):04d}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # a trial interrupted earlier and run again
        run_dir.mkdir(parents=True)
        tok_dir = Path(self.tokenizer) if Path(self.tokenizer).is_dir() else Path(self.tokenizer).parent
        trainer = Trainer(model, train_stream, val_stream, cfg, run_dir, tok_dir, progress=False)
        try:
            result = trainer.train()
        except TrainingDiverged as err:  # a failed trial (never a NaN value), not a crashed sweep
            return {"status": DIVERGED, "value": None, "reason": str(err), "params": n_params, "steps": steps,
                    "diverged_step": err.step, "run_dir": str(run_dir)}
        record = {"status": COMPLETE, "value": float(result.best_val_loss), "val_loss": float(result.best_val_loss),
                  "val_ppl": math.exp(result.best_val_loss), "params": n_params, "steps": steps,
                  "tokens": int(result.tokens), "run_dir": str(run_dir)}
        if prompts:
            record["outputs"] = _greedy(model, tok_dir, prompts, max_new_tokens)
        return record


# ------------------------------------------------------------------------------ test functions
@dataclass
class FunctionObjective(Objective):
    """Minimise a known function of ``dims`` floats in [-5.12, 5.12]: "sphere" (sum x^2) or
    "rastrigin" (10 d + sum x^2 - 10 cos 2 pi x); both have their minimum 0 at x = 0.

    ``rendezvous``: a directory where each trial leaves a file and waits (up to
    ``rendezvous_timeout`` s) until ``peers`` files exist; the record says whether it met them,
    which shows that a backend ran that many trials at once.
    """

    function: str = "sphere"
    dims: int = 4
    rendezvous: str | None = None
    peers: int = 2
    rendezvous_timeout: float = 60.0
    name: str = field(default="function", init=False)
    direction: str = field(default="minimize", init=False)
    metric: str = field(default="f", init=False)

    def __post_init__(self) -> None:  # (an unknown function failed every trial; dims 0 "found" 0)
        if self.function not in ("sphere", "rastrigin"):
            raise ValueError(f"function must be sphere or rastrigin, got {self.function!r}")
        _check_int("dims", self.dims)

    def suggest(self, trial) -> dict[str, Any]:
        return {f"x{i}": trial.suggest_float(f"x{i}", -5.12, 5.12) for i in range(self.dims)}

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "function": self.function, "dims": self.dims}

    def evaluate(self, params, prompts=None, max_new_tokens=32) -> dict[str, Any]:
        xs = [params[f"x{i}"] for i in range(self.dims)]
        if self.function == "sphere":
            value = sum(x * x for x in xs)
        elif self.function == "rastrigin":
            value = 10 * len(xs) + sum(x * x - 10 * math.cos(2 * math.pi * x) for x in xs)
        else:
            raise ValueError(f"unknown function {self.function!r}")
        record: dict[str, Any] = {"status": COMPLETE, "value": value}
        if self.rendezvous:
            path = Path(self.rendezvous)
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{os.getpid()}-{params.get('_trial', 0)}").write_text("")
            deadline = time.monotonic() + self.rendezvous_timeout
            while len(list(path.iterdir())) < self.peers and time.monotonic() < deadline:
                time.sleep(0.05)
            record["met_peers"] = len(list(path.iterdir())) >= self.peers
        return record
