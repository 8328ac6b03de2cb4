"""Wiring specs: cells with parameters and connections between their ports, as YAML/JSON or
through the Python builder :class:`Wiring`.

Smallest form (a cell's parameters beside its ``type``; ``from``/``to`` take ``cell`` or
``cell.port``; ``polarity``, ``density``, ``mask`` and sharing are optional)::

    cells:
      a: {type: linear_projection, dim: 16}
      b: {type: linear_projection, dim: 16}
    connections:
      - {from: a, to: b, polarity: -1, density: 0.5}

Full form: ``params`` (defaults a user may override), ``derived`` (expressions over params,
evaluated in order), ``inputs`` / ``outputs`` of the wiring (port -> size; addressed as
``in.PORT`` / ``out.PORT``; when left out, ``in.x`` feeds the first cell's first input and the
last cell's first output is ``out.y``), and ``seed`` (random masks). A string value starting
with ``$`` is an expression over the params: ``$dim``, ``$int(dim * qk_dim_factor)``.

Connections: without ``weight``, ``density`` or ``mask`` a connection is a wire (sizes must
match); with them it carries a weight matrix [to size, from size] under a binary mask (random at
``density`` with the connection's ``seed``, or the ``mask`` given as a 0/1 matrix) whose masked
entries stay exactly zero. ``polarity: -1`` (inhibitory) subtracts the contribution. Several
connections into one port add up. A cell may take its projection from another
(``share: a`` - one parameter array; ``share: {cell: a, features: n}`` - the first n output
features shared); attention and memory cells take ``kv_heads`` for grouped key/value sharing.
A cell or connection with ``when: $expr`` is left out where the expression is false.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

RESERVED = ("in", "out")
_FUNCTIONS = {
    "int": int, "float": float, "round": round, "max": max, "min": min, "abs": abs,
    "round_up": lambda value, multiple: int(math.ceil(value / multiple) * multiple),
}


class WiringError(ValueError):
    """A wiring that cannot be built; the message names the cell, port or connection."""


# ------------------------------------------------------------------------------ expressions
def evaluate(expr: str, names: dict[str, Any], where: str) -> Any:
    """Value of a ``$`` expression: numbers, names in ``names``, + - * / // % **, comparisons,
    ``a if c else b`` and int/float/round/max/min/abs/round_up(value, multiple)."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise WiringError(f"{where}: cannot parse expression {expr!r}") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str, type(None))):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in names:
                return names[node.id]
            raise WiringError(f"{where}: unknown name {node.id!r} in {expr!r}; known: {', '.join(sorted(names))}")
        if isinstance(node, ast.BinOp):
            ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                   ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
                   ast.Pow: lambda a, b: a**b}
            if type(node.op) in ops:
                a, b = ev(node.left), ev(node.right)
                if not all(isinstance(v, (int, float)) for v in (a, b)):  # 'ab' * 10**10
                    raise WiringError(f"{where}: {expr!r}: arithmetic takes numbers")
                if isinstance(node.op, ast.Pow) and isinstance(a, int) and isinstance(b, int) \
                        and b * max(abs(a), 1).bit_length() > 4096:  # 10**10**10 hung
                    raise WiringError(f"{where}: {expr!r}: too large")
                try:
                    value = ops[type(node.op)](a, b)
                except ArithmeticError as err:
                    raise WiringError(f"{where}: {expr!r}: {err}") from None
                if isinstance(value, complex):  # (-8) ** 0.5
                    raise WiringError(f"{where}: {expr!r} is not a real number")
                return value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else (not value if isinstance(node.op, ast.Not) else value)
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            a, b = ev(node.left), ev(node.comparators[0])
            cmp = {ast.Eq: a == b, ast.NotEq: a != b, ast.Lt: a < b, ast.LtE: a <= b, ast.Gt: a > b, ast.GtE: a >= b}
            if type(node.ops[0]) in cmp:
                return cmp[type(node.ops[0])]
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
                and not node.keywords:
            try:
                return _FUNCTIONS[node.func.id](*[ev(a) for a in node.args])
            except (TypeError, ValueError, ArithmeticError) as err:  # int(1e400), round_up(5, 0)
                raise WiringError(f"{where}: {expr!r}: {err}") from None
        raise WiringError(f"{where}: unsupported expression {expr!r}")

    return ev(tree)


def _resolve_value(value: Any, names: dict[str, Any], where: str) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        return evaluate(value[1:].strip(), names, where)
    if isinstance(value, list):
        return [_resolve_value(v, names, where) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_value(v, names, f"{where}.{k}") for k, v in value.items()}
    return value


def _when(value: Any, where: str) -> bool:
    if not isinstance(value, bool):  # "no" (JSON, quoted YAML) was true: the cell was kept
        raise WiringError(f"{where}: when must be true or false (or a $ expression giving one), got {value!r}")
    return value


def _seed(value: Any, where: str) -> int:
    """A mask seed: a non-negative integer (numpy's generators take no other)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WiringError(f"{where} must be a non-negative integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------- the spec
@dataclass
class Connection:
    """One connection between ports, as resolved (sizes not yet checked)."""

    src: str
    dst: str
    polarity: int = 1
    density: float | None = None
    mask: list | None = None
    weight: bool = False
    seed: int | None = None
    nonnegative: bool = False

    @property
    def weighted(self) -> bool:
        return self.weight or self.density is not None or self.mask is not None


@dataclass
class ResolvedSpec:
    """A spec with every expression evaluated: what the builder consumes."""

    name: str
    cells: dict[str, dict[str, Any]]
    connections: list[Connection]
    inputs: dict[str, int] | None
    outputs: dict[str, int] | None
    seed: int
    params: dict[str, Any] = field(default_factory=dict)


_CONNECTION_KEYS = {"from", "to", "polarity", "density", "mask", "weight", "seed", "nonnegative", "when"}


def declared_params(data: dict[str, Any]) -> set[str]:
    """The names a spec's dict form takes as parameters: its params and its derived values."""
    return {*(data.get("params") or {}), *(data.get("derived") or {})}


class WiringSpec:
    """A wiring spec (the dict form of YAML/JSON files). ``resolve(**overrides)`` evaluates the
    parameters; ``to_dict()`` gives back the dict (what config.json stores)."""

    def __init__(self, data: dict[str, Any], source: str = "<spec>"):
        if not isinstance(data, dict):
            raise WiringError(f"{source}: a wiring spec must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"name", "description", "params", "derived", "inputs", "outputs", "cells",
                               "connections", "seed"}
        if unknown:
            raise WiringError(f"{source}: unknown top-level key(s) {sorted(unknown)}")
        cells = data.get("cells")
        if not isinstance(cells, dict) or not cells:
            raise WiringError(f"{source}: 'cells' must be a non-empty mapping of name -> {{type: ..., params}}")
        if not isinstance(data.get("connections", []), list):
            raise WiringError(f"{source}: 'connections' must be a list")
        for key in ("params", "derived"):  # a list was a TypeError / AttributeError traceback
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise WiringError(f"{source}: '{key}' must be a mapping, got {type(data[key]).__name__}")
        self.data = copy.deepcopy(data)
        self.source = source

    @property
    def name(self) -> str:
        return str(self.data.get("name") or (Path(self.source).stem if self.source != "<spec>" else "wiring"))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "WiringSpec":
        """Read a .yaml/.yml/.json spec; WiringError naming the file if it is unreadable."""
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise WiringError(f"cannot read wiring spec {path}: {err}") from None
        return cls(parse_text(text, str(path)), str(path))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def unknown_params(self, names: Iterable[Any]) -> str:
        """"" when the spec declares each of ``names`` (its params and derived values), else what
        an error says: "unknown param(s) ...; it takes ..."."""
        known = declared_params(self.data)
        unknown = sorted(str(k) for k in names if k not in known)
        return f"unknown param(s) {', '.join(unknown)}; it takes {', '.join(sorted(map(str, known))) or 'none'}" \
            if unknown else ""

    def resolve(self, overrides: dict[str, Any] | None = None) -> ResolvedSpec:
        """Evaluate params (defaults, then ``overrides``), derived values and every ``$`` value."""
        d = self.data
        params = dict(d.get("params") or {})
        overrides = dict(overrides or {})
        unknown = self.unknown_params(overrides)
        if unknown:  # a misspelt parameter (num_head: 8) was ignored and the default built
            raise WiringError(f"{self.name}: {unknown}")
        for key, value in overrides.items():  # a switch set to "yes_please" was simply true
            if isinstance(params.get(key), bool) and not isinstance(value, bool):
                raise WiringError(f"parameter {key!r} is a switch: give true or false, got {value!r}")
        names = {**params, **overrides}
        for key in list(names):  # defaults may be expressions of other params (kv_heads: $num_heads)
            if key not in overrides:
                names[key] = _resolve_value(names[key], names, f"params.{key}")
        for key, expr in (d.get("derived") or {}).items():
            if key not in overrides:
                names[key] = _resolve_value(expr, names, f"derived.{key}")
        cells = {}
        for name, body in d["cells"].items():
            if not isinstance(name, str) or not name or any(not part.isidentifier() for part in name.split(".")):
                raise WiringError(f"cell name {name!r} must be dotted identifiers (e.g. mlstm_layer.q)")
            if name.split(".")[0] in RESERVED:  # in.q was read as the wiring's input q in a connection
                raise WiringError(f"cell name {name!r}: {name.split('.')[0]!r} is reserved for the wiring's "
                                  "inputs/outputs (in.PORT, out.PORT)")
            if not isinstance(body, dict) or "type" not in body:
                raise WiringError(f"cell {name!r} needs a mapping with a 'type'")
            body = _resolve_value(body, names, f"cells.{name}")
            if not _when(body.pop("when", True), f"cell {name!r}"):
                continue  # a cell this parameter setting leaves out
            cells[name] = body
        connections = []
        for index, c in enumerate(d.get("connections") or []):
            if not isinstance(c, dict) or "from" not in c or "to" not in c:
                raise WiringError(f"connection {index} needs 'from' and 'to', got {c!r}")
            unknown = set(c) - _CONNECTION_KEYS
            if unknown:
                raise WiringError(f"connection {index} ({c['from']} -> {c['to']}): unknown key(s) {sorted(unknown)}")
            c = _resolve_value(c, names, f"connections[{index}]")
            if not _when(c.pop("when", True), f"connection {index} ({c['from']} -> {c['to']})"):
                continue
            polarity = c.get("polarity", 1)
            if polarity not in (1, -1) or isinstance(polarity, bool):
                raise WiringError(f"connection {index} ({c['from']} -> {c['to']}): polarity must be +1 or -1, "
                                  f"got {polarity!r}")
            density = c.get("density")
            if density is not None and (isinstance(density, bool) or not (isinstance(density, (int, float))
                                                                          and 0 < density <= 1)):  # true was 1
                raise WiringError(f"connection {index} ({c['from']} -> {c['to']}): density must be in (0, 1], "
                                  f"got {density!r}")
            if density is not None and c.get("mask") is not None:  # the mask was taken, the density ignored
                raise WiringError(f"connection {index} ({c['from']} -> {c['to']}): give a density (a random mask) "
                                  "or a mask, not both")
            flags = {}
            for key in ("weight", "nonnegative"):
                flags[key] = c.get(key, False)
                if not isinstance(flags[key], bool):
                    raise WiringError(f"connection {index} ({c['from']} -> {c['to']}): {key} must be true or false, "
                                      f"got {flags[key]!r}")
            conn_seed = c.get("seed")
            if conn_seed is not None:
                conn_seed = _seed(conn_seed, f"connection {index} ({c['from']} -> {c['to']}): seed")
            connections.append(Connection(str(c["from"]), str(c["to"]), int(polarity), density, c.get("mask"),
                                          flags["weight"], conn_seed, flags["nonnegative"]))
        inputs = _resolve_value(d.get("inputs"), names, "inputs")
        outputs = _resolve_value(d.get("outputs"), names, "outputs")
        for label, ports in (("inputs", inputs), ("outputs", outputs)):
            if ports is not None and (not isinstance(ports, dict) or not ports or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ports.values())):
                raise WiringError(f"'{label}' must map port names to positive sizes, got {ports!r}")
        seed = _seed(_resolve_value(d.get("seed", 0), names, "seed"), "seed")
        return ResolvedSpec(self.name, cells, connections, inputs, outputs, seed, names)


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict:
    """json's object hook: a key given twice is refused (json keeps the last one silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise WiringError(f"duplicate key {key!r} in a JSON object (a second cell, parameter or port of "
                              "one name replaced the first)")
        out[key] = value
    return out


def _unique_key_loader():
    """PyYAML's SafeLoader refusing a mapping key given twice (it kept the last one silently: a
    second cell of one name dropped the first). Merged keys (``<<``) may still be overridden."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = loader.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base constructor names it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def parse_text(text: str, source: str) -> dict:
    """A spec dict from JSON or YAML text. A key given twice in one mapping (two cells of one
    name, a parameter set twice) is a WiringError naming it: the parsers kept the last silently."""
    import yaml

    try:
        if source.endswith(".json"):
            try:
                data = json.loads(text, object_pairs_hook=_unique_json_object)
            except WiringError as err:
                raise WiringError(f"{source}: {err}") from None
        else:
            data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader)
    except json.JSONDecodeError as err:
        raise WiringError(f"{source} is not valid JSON: {err}") from None
    except yaml.YAMLError as err:  # PyYAML's message spans lines (context, a caret): one line here
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(err, "problem", None) or " ".join(str(err).split())
        raise WiringError(f"{source} is not valid YAML: {where}{what}") from None
    if not isinstance(data, dict):
        raise WiringError(f"{source}: a wiring spec must be a mapping, got {type(data).__name__}")
    if _size(data, {}) > 10**7:  # aliases: 600 bytes hung, &r [*r] a RecursionError
        raise WiringError(f"{source}: over 10**7 values (YAML aliases repeat them)")
    return data


def _size(obj: Any, memo: dict) -> float:
    if id(obj) not in memo:
        memo[id(obj)] = math.inf  # (a list inside itself)
        kids = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
        memo[id(obj)] = 1 + sum(_size(k, memo) for k in kids)
    return memo[id(obj)]


# ------------------------------------------------------------------------------- the builder
class Wiring:
    """Python builder for wiring specs::

        w = (Wiring("gate_demo", params={"dim": 16})
             .input("x", "$dim")
             .cell("a", "linear_projection", dim="$dim")
             .cell("b", "linear_projection", dim="$dim", share="a")
             .connect("in.x", "a").connect("in.x", "b")
             .connect("a", "out.y").connect("b", "out.y", polarity=-1, density=0.5)
             .output("y", "$dim"))
        block = w.build()            # a WiredBlock; w.spec() is the WiringSpec
    """

    def __init__(self, name: str = "wiring", params: dict[str, Any] | None = None, seed: int = 0):
        self._data: dict[str, Any] = {"name": name, "params": dict(params or {}), "cells": {}, "connections": [],
                                      "seed": seed}

    def param(self, name: str, default: Any) -> "Wiring":
        self._data["params"][name] = default
        return self

    def derive(self, name: str, expression: str) -> "Wiring":
        self._data.setdefault("derived", {})[name] = expression
        return self

    def input(self, port: str, size: int | str) -> "Wiring":
        self._data.setdefault("inputs", {})[port] = size
        return self

    def output(self, port: str, size: int | str) -> "Wiring":
        self._data.setdefault("outputs", {})[port] = size
        return self

    def cell(self, name: str, type: str, **params: Any) -> "Wiring":  # noqa: A002 (spec key)
        if name in self._data["cells"]:
            raise WiringError(f"cell {name!r} is defined twice")
        params = {PARAM_KEYS.get(k, k): v for k, v in params.items()}
        self._data["cells"][name] = {"type": type, **params}
        return self

    def connect(self, src: str, dst: str, *, polarity: int = 1, density: float | None = None, mask: Any = None,
                weight: bool = False, seed: int | None = None, nonnegative: bool = False) -> "Wiring":
        c: dict[str, Any] = {"from": src, "to": dst}
        if polarity != 1:
            c["polarity"] = polarity
        if density is not None:
            c["density"] = density
        if mask is not None:
            c["mask"] = mask.tolist() if hasattr(mask, "tolist") else mask
        if weight:
            c["weight"] = True
        if seed is not None:
            c["seed"] = seed
        if nonnegative:
            c["nonnegative"] = True
        self._data["connections"].append(c)
        return self

    def spec(self) -> WiringSpec:
        return WiringSpec(self._data, self._data["name"])

    def build(self, **overrides: Any):
        from .wiring import WiredBlock

        return WiredBlock(self.spec(), overrides)


#: Builder keyword -> spec key (``in``/``out`` are Python keywords).
PARAM_KEYS = {"input_size": "in", "output_size": "out"}


# ------------------------------------------------------------------------------ graph order
def topological_stages(nodes: list[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    """Kahn's algorithm by levels: stage k holds the nodes whose predecessors all sit in stages
    < k (in ``nodes`` order). Raises WiringError naming a cycle if there is one."""
    indegree = {n: 0 for n in nodes}
    successors: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        successors[a].append(b)
        indegree[b] += 1
    order = {n: i for i, n in enumerate(nodes)}
    stage = [n for n in nodes if indegree[n] == 0]
    stages, seen = [], 0
    while stage:
        stages.append(stage)
        seen += len(stage)
        nxt = []
        for n in stage:
            for m in successors[n]:
                indegree[m] -= 1
                if indegree[m] == 0:
                    nxt.append(m)
        stage = sorted(set(nxt), key=order.__getitem__)
    if seen != len(nodes):
        raise WiringError(f"cycle {' -> '.join(find_cycle([n for n in nodes if indegree[n] > 0], edges))} "
                          "is not broken by a recurrent cell")
    return stages


def find_cycle(nodes: list[str], edges: list[tuple[str, str]]) -> list[str]:
    """One cycle among ``nodes`` (as a closed path a -> b -> ... -> a)."""
    inside = set(nodes)
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        if a in inside and b in inside:
            succ[a].append(b)
    for start in nodes:
        path, on_path, stack = [], set(), [(start, iter(succ[start]))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                on_path.discard(path.pop())
                continue
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            path.append(nxt)
            on_path.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    return nodes[:1] + nodes[:1]


def strongly_connected(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Tarjan's strongly connected components: node -> component id."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        succ[a].append(b)
    index, low, comp, stack, on = {}, {}, {}, [], set()
    counter = [0, 0]

    def visit(v):  # recursion depth is bounded by the cell count (small)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            while True:
                w = stack.pop()
                on.discard(w)
                comp[w] = counter[1]
                if w == v:
                    break
            counter[1] += 1

    for n in nodes:
        if n not in index:
            visit(n)
    return comp


__all__ = ["WiringSpec", "Wiring", "WiringError", "Connection", "ResolvedSpec", "topological_stages", "evaluate"]
