"""The specs shipped with the lab (``xlstm_metal/lab/specs``): block wirings and architectures.

A block spec (``cells`` + ``connections``) is found by name (``mlstm``, ``xlstm_large_block``,
...) or path; an architecture (``blocks``: a list of block spec names or
``{spec: NAME|PATH|{...}, params: {...}}``) by name (``mlstm``, ``hybrid``, ``swiglu-only``,
...) or path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .spec import WiringError, WiringSpec, parse_text

SPEC_DIR = Path(__file__).parent / "specs"
ARCH_DIR = SPEC_DIR / "archs"
#: The keys of an architecture: its blocks, the model options LabConfig.from_arch takes, the
#: sizes `train --arch` takes, and what evolve writes beside them.
ARCH_KEYS = frozenset({"name", "description", "blocks", "out_norm", "norm_eps", "tie_word_embeddings",
                       "output_logit_soft_cap", "layout", "embedding_dim", "vocab_size", "genome"})


def block_spec_names() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def arch_names() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.yaml"))


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise WiringError(f"cannot read {path}: {err}") from None
    return parse_text(text, str(path))


def load_spec(name_or_path: str | Path | dict | WiringSpec) -> WiringSpec:
    """A block spec: a WiringSpec, a spec dict, a shipped name, or a .yaml/.json path."""
    if isinstance(name_or_path, WiringSpec):
        return name_or_path
    if isinstance(name_or_path, dict):
        return WiringSpec(name_or_path)
    text = str(name_or_path)
    shipped = SPEC_DIR / f"{text}.yaml"
    if shipped.is_file() and "/" not in text:
        return WiringSpec(_read(shipped), str(shipped))
    path = Path(text).expanduser()
    if path.is_file():
        return WiringSpec.from_file(path)
    raise WiringError(f"no block spec {text!r}: not a file and not a shipped spec ({', '.join(block_spec_names())})")


def load_arch(name_or_path: str | Path | dict) -> dict[str, Any]:
    """An architecture dict ``{name, blocks: [{spec: dict, params: dict}], ...}`` with every
    block spec inlined. A shipped arch name, an arch file, or a single block spec (file or
    shipped name), which makes a two-block model of that block. An arch file's relative block
    spec paths are read beside it (where the file is there; else from the working directory)."""
    base = None  # the arch file's folder: its relative block spec paths are read from there
    if isinstance(name_or_path, dict):
        data = dict(name_or_path)
        source = "<arch>"
    else:
        text = str(name_or_path)
        shipped = ARCH_DIR / f"{text}.yaml"
        if shipped.is_file() and "/" not in text:
            data, source = _read(shipped), str(shipped)
        elif (SPEC_DIR / f"{text}.yaml").is_file() and "/" not in text:
            data, source = {"name": text, "blocks": [text, text]}, text
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                raise WiringError(
                    f"no architecture {text!r}: not a file and not a shipped arch ({', '.join(arch_names())}) "
                    f"or block spec ({', '.join(block_spec_names())})")
            data, source, base = _read(path), str(path), path.parent
            if "cells" in data:  # a block spec: two blocks of it
                data = {"name": data.get("name") or path.stem, "blocks": [data, data]}
    if "cells" in data and "blocks" not in data:
        data = {"name": data.get("name", "wiring"), "blocks": [data, data]}
    blocks = data.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise WiringError(f"{source}: an architecture needs a non-empty 'blocks' list")
    unknown = sorted(str(k) for k in data if k not in ARCH_KEYS)
    if unknown:  # a misspelt option (tie_word_embedding: true, embeding_dim: 64) was ignored, without a word
        raise WiringError(f"{source}: unknown architecture key(s) {', '.join(unknown)}; an architecture takes "
                          f"{', '.join(sorted(ARCH_KEYS))}")
    out = []
    for index, entry in enumerate(blocks):
        if isinstance(entry, (str, dict)) and not (isinstance(entry, dict) and "spec" in entry):
            entry = {"spec": entry}
        if not isinstance(entry, dict) or "spec" not in entry:
            raise WiringError(f"{source}: block {index} must be a spec name/path or {{spec: ..., params: ...}}")
        unknown = sorted(str(k) for k in entry if k not in ("spec", "params"))
        if unknown:  # e.g. `num_heads: 2` beside `spec:` (it goes under params:), silently dropped before
            raise WiringError(f"{source}: block {index} has unknown key(s) {', '.join(unknown)}; a block is "
                              "{spec: ..., params: {...}}")
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise WiringError(f"{source}: block {index} params must be a mapping")
        spec = entry["spec"]
        shipped = "/" not in spec and (SPEC_DIR / f"{spec}.yaml").is_file() if isinstance(spec, str) else False
        if base is not None and isinstance(spec, str) and not shipped \
                and not Path(spec).expanduser().is_absolute() and (base / spec).is_file():
            # beside the arch file, as written there (it was read from the working directory: not
            # found, or another file of that name)
            spec = base / spec
        spec = load_spec(spec)
        unknown = spec.unknown_params(params)
        if unknown:  # a misspelt parameter changed nothing, without a word
            raise WiringError(f"{source}: block {index} ({spec.name}): {unknown}")
        out.append({"spec": spec.to_dict(), "params": dict(params)})
    return {**{k: v for k, v in data.items() if k != "blocks"}, "blocks": out}


__all__ = ["load_spec", "load_arch", "block_spec_names", "arch_names", "SPEC_DIR"]
