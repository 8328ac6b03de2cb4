"""WiredBlock: an MLX module built from a wiring spec and run in topological stages.

Parameters sit where the cell names put them: a cell named ``mlstm_layer.q`` keeps its weight
at ``mlstm_layer.q.weight`` (so a spec can reproduce a hand-written block's checkpoint keys);
weighted connections keep ``synapses.N.weight`` and their frozen binary ``synapses.N.mask``.

Execution: Kahn's algorithm orders the cells into stages (a cell runs once every cell feeding it
has run). A cycle is allowed only through a recurrent (stateful) cell: the connections that
close it into that cell deliver the previous time step's value, kept in the block state, and
such a block runs token by token. The block state is a flat tuple: each stateful cell's state
in declaration order, then the delayed connection values.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from ..cells.xlstm_2024 import Module2024
from ..models.xlstm_large import check_state
from .cells import CellError, build_cell, cell_types
from .spec import RESERVED, ResolvedSpec, WiringError, WiringSpec, strongly_connected, topological_stages


class Synapse(Module2024):
    """One connection. A wire passes x (times its polarity); a weighted connection computes
    polarity * x (W * mask)^T with W [out, in] and a frozen binary mask [out, in]. Masked
    weights start at zero and get zero gradient, so they stay exactly zero under any optimiser
    (AdamW's decay of a zero is zero)."""

    def __init__(self, in_size: int, out_size: int, polarity: int = 1, mask: np.ndarray | None = None,
                 nonnegative: bool = False):
        super().__init__()
        self.polarity = polarity
        self.nonnegative = nonnegative
        self.weighted = mask is not None
        if mask is not None:
            fan_in = max(1.0, float(mask.sum()) / out_size)
            w = mx.random.normal((out_size, in_size)) * fan_in**-0.5
            self.mask = mx.array(mask.astype(np.float32))
            self.weight = mx.abs(w) * self.mask if nonnegative else w * self.mask
            self.freeze(keys=["mask"], recurse=False)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.weighted:
            return -x if self.polarity < 0 else x
        w = self.weight * mx.stop_gradient(self.mask)
        if self.nonnegative:
            w = mx.abs(w)
        y = x @ w.T
        return -y if self.polarity < 0 else y


class _Container(Module2024):
    """Holds the cells under a dotted name prefix (``mlstm_layer`` of ``mlstm_layer.q``)."""


def _make_mask(conn, in_size: int, out_size: int, seed: int, where: str) -> np.ndarray | None:
    if not conn.weighted:
        return None
    if conn.mask is not None:
        try:
            mask = np.asarray(conn.mask, dtype=np.float64)
        except (TypeError, ValueError):
            raise WiringError(f"{where}: mask must be a 0/1 matrix") from None
        if mask.shape != (out_size, in_size):
            raise WiringError(f"{where}: mask has shape {mask.shape}, the connection needs "
                              f"[{out_size}, {in_size}] (to size, from size)")
        if not np.isin(mask, (0.0, 1.0)).all():
            raise WiringError(f"{where}: mask entries must be 0 or 1")
        return mask
    if conn.density is None or conn.density >= 1:
        return np.ones((out_size, in_size))
    rng = np.random.default_rng(seed)
    return (rng.random((out_size, in_size)) < conn.density).astype(np.float64)


class WiredBlock(Module2024):
    """A block built from a wiring spec.

    ``block(x, state=None) -> (y, state)``: x [B, S, in size] (a dict of ports when the wiring has
    several inputs), y likewise for the outputs; ``state`` is the flat tuple described in the
    module docstring (None: zeros). ``block.stages`` lists the cell names per stage.
    """

    def __init__(self, spec: WiringSpec | dict, params: dict[str, Any] | None = None):
        super().__init__()
        if isinstance(spec, dict):
            spec = WiringSpec(spec)
        resolved = spec.resolve(params)
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "resolved", resolved)
        self._build(resolved)

    # ----------------------------------------------------------------------------- building
    def _build(self, r: ResolvedSpec) -> None:
        names = list(r.cells)
        cells: dict[str, Any] = {}
        for name, body in r.cells.items():
            params = {k: v for k, v in body.items() if k not in ("type", "share")}
            share = body.get("share")
            if share is not None:
                share = {"cell": share} if isinstance(share, str) else share
                # a misspelt key ("featurs") was ignored: every feature shared
                if not isinstance(share, dict) or "cell" not in share or set(share) - {"cell", "features"}:
                    raise WiringError(f"cell {name!r}: share must be a cell name or {{cell: NAME, features: N}}")
            if share is not None:
                src = r.cells.get(share["cell"])
                if src is None:
                    raise WiringError(f"cell {name!r} shares the featurizer of unknown cell {share['cell']!r}")
                if share["cell"] == name:
                    raise WiringError(f"cell {name!r} cannot share its own featurizer")
                for cell_name, type_name in ((name, body["type"]), (share["cell"], src["type"])):
                    if not getattr(cell_types().get(type_name), "shareable", False):
                        raise WiringError(f"cell {name!r} shares {share['cell']!r}: only linear projections share "
                                          f"featurizers ({cell_name!r} is a {type_name})")
                rows = share.get("features")
                if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
                    # 0 or -1 shared every row and kept an own weight nothing read
                    raise WiringError(f"cell {name!r}: share features must be a positive integer, got {rows!r}")
                params["shared_rows"] = rows if rows is not None else -1  # -1: all (set below)
            try:
                if share is not None and params["shared_rows"] == -1:
                    probe = build_cell(body["type"], {k: v for k, v in params.items() if k != "shared_rows"})
                    params["shared_rows"] = probe.output_ports.get("y", 0)
                cells[name] = build_cell(body["type"], params)
            except CellError as err:
                raise WiringError(f"cell {name!r}: {err}") from None
            except TypeError as err:
                raise WiringError(f"cell {name!r}: {err}") from None
            self._place(name, cells[name])
        # Sharing: one parameter array (the source's), shapes checked here.
        shares: dict[str, str] = {}
        for name, body in r.cells.items():
            share = body.get("share")
            if share is None:
                continue
            src = share if isinstance(share, str) else share["cell"]
            a, b = cells[src], cells[name]
            if getattr(a, "heads", 1) > 1 or getattr(b, "heads", 1) > 1:
                raise WiringError(f"cell {name!r} shares {src!r}: headwise projections cannot be shared")
            if body.get("share") and isinstance(r.cells[src].get("share"), (str, dict)):
                raise WiringError(f"cell {name!r} shares {src!r}, which itself shares another cell's featurizer")
            if a.input_ports["x"] != b.input_ports["x"]:
                raise WiringError(f"cell {name!r} shares {src!r}: input sizes differ "
                                  f"({b.input_ports['x']} vs {a.input_ports['x']})")
            if b.shared_rows > a.output_ports["y"]:
                raise WiringError(f"cell {name!r} shares {b.shared_rows} features of {src!r}, "
                                  f"which has {a.output_ports['y']}")
            shares[name] = src

        inputs = r.inputs
        outputs = r.outputs
        connections = list(r.connections)
        first, last = names[0], names[-1]
        if inputs is None:
            port, size = next(iter(cells[first].input_ports.items()))
            inputs = {"x": size}
            fed = {c.dst for c in connections}
            if f"{first}.{port}" not in fed and not (first in fed and len(cells[first].input_ports) == 1):
                connections.insert(0, _implicit("in.x", f"{first}.{port}"))
        if outputs is None:
            port, size = next(iter(cells[last].output_ports.items()))
            outputs = {"y": size}
            # as for in.x: a spec that connects out.y itself gets no second (implicit) connection,
            # which added the last cell's output to it again
            if not any(c.dst in ("out", "out.y") for c in connections):
                connections.append(_implicit(f"{last}.{port}", "out.y"))
        object.__setattr__(self, "input_ports", dict(inputs))
        object.__setattr__(self, "output_ports", dict(outputs))

        # Resolve endpoints and sizes; create the synapses.
        incoming: dict[tuple[str, str], list[int]] = {}
        ends = []
        self.synapses = []
        for index, c in enumerate(connections):
            where = f"connection {index} ({c.src} -> {c.dst})"
            s_cell, s_port, s_size = self._endpoint(c.src, cells, "from", where, inputs, outputs)
            d_cell, d_port, d_size = self._endpoint(c.dst, cells, "to", where, inputs, outputs)
            if not c.weighted and s_size != d_size:
                raise WiringError(
                    f"{where}: port size mismatch: {s_cell}.{s_port} has {s_size} features, {d_cell}.{d_port} "
                    f"takes {d_size} (a weighted connection - weight: true, density or mask - maps between sizes)")
            seed = c.seed if c.seed is not None else r.seed * 1_000_003 + index
            mask = _make_mask(c, s_size, d_size, seed, where)
            self.synapses.append(Synapse(s_size, d_size, c.polarity, mask, c.nonnegative))
            ends.append((s_cell, s_port, d_cell, d_port))
            incoming.setdefault((d_cell, d_port), []).append(index)

        for name, cell in cells.items():
            for port in cell.input_ports:
                if (name, port) not in incoming:
                    raise WiringError(f"cell {name!r} ({r.cells[name]['type']}): input port {port!r} is not connected")
        for port in outputs:
            if ("out", port) not in incoming:
                raise WiringError(f"wiring output {port!r} is not connected")
        # A cell whose outputs reach no wiring output computed nothing the block returns, and its
        # parameters (counted against evolve's budget) never trained, without a word: refused. A
        # projection whose weight another reads (share) counts as used.
        live, grew = {"out"}, True
        while grew:
            grew = False
            for s_cell, _, d_cell, _ in ends:
                if d_cell in live and s_cell not in live:
                    live.add(s_cell)
                    grew = True
            for name, src in shares.items():
                if name in live and src not in live:
                    live.add(src)
                    grew = True
        dead = [n for n in names if n not in live]
        if dead:
            raise WiringError(f"cell(s) {', '.join(map(repr, dead))} reach no output of the wiring: connect them "
                              "(through other cells) to out, or leave them out")

        # Cycles: allowed only through stateful cells; the closing connections into them are delayed.
        edges = [(s, d) for s, _, d, _ in ends if s in cells and d in cells]
        comp = strongly_connected(names, edges)
        sizes: dict[int, int] = {}
        for n in names:
            sizes[comp[n]] = sizes.get(comp[n], 0) + 1
        delayed = set()
        for index, (s, _, d, _) in enumerate(ends):
            if s in cells and d in cells and comp[s] == comp[d] and (sizes[comp[d]] > 1 or s == d) \
                    and getattr(cells[d], "stateful", False):
                delayed.add(index)
        order_edges = [(s, d) for i, (s, _, d, _) in enumerate(ends) if s in cells and d in cells and i not in delayed]
        stages = topological_stages(names, order_edges)

        # Execution plan: per cell, per input port, the (connection index, source key, delayed).
        plan = []
        for stage in stages:
            for name in stage:
                ports = [(port, [(i, (ends[i][0], ends[i][1]), i in delayed) for i in incoming[(name, port)]])
                         for port in cells[name].input_ports]
                plan.append((name, tuple(name.split(".")), ports, shares.get(name)))
        out_plan = [(port, [(i, (ends[i][0], ends[i][1])) for i in incoming[("out", port)]]) for port in outputs]
        state_cells = [n for n in names if getattr(cells[n], "stateful", False)]
        state_sizes = {n: len(cells[n].zero_state(1)) for n in state_cells}
        delayed_list = sorted(delayed)
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "_out_plan", out_plan)
        object.__setattr__(self, "_state_cells", state_cells)
        object.__setattr__(self, "_state_sizes", state_sizes)
        object.__setattr__(self, "_delayed", delayed_list)
        object.__setattr__(self, "_delayed_sizes", [self._src_size(ends[i], cells, inputs) for i in delayed_list])
        object.__setattr__(self, "_ends", ends)
        object.__setattr__(self, "cell_names", names)

    @staticmethod
    def _src_size(end, cells, inputs) -> int:
        s_cell, s_port = end[0], end[1]
        return inputs[s_port] if s_cell == "in" else cells[s_cell].output_ports[s_port]

    def _place(self, name: str, cell) -> None:
        parts = name.split(".")
        node = self
        for depth, part in enumerate(parts[:-1]):
            if part in node and not isinstance(node[part], _Container):
                raise WiringError(f"cell name {name!r} nests under cell {'.'.join(parts[: depth + 1])!r}")
            if part not in node:
                if part == "synapses":
                    raise WiringError(f"cell name {name!r}: 'synapses' is reserved")
                setattr(node, part, _Container())
            node = node[part]
        if parts[-1] in node:
            raise WiringError(f"cell name {name!r} collides with another cell's name prefix")
        if node is self and parts[-1] == "synapses":
            raise WiringError("cell name 'synapses' is reserved")
        setattr(node, parts[-1], cell)

    def _endpoint(self, ref: str, cells, kind: str, where: str, inputs, outputs) -> tuple[str, str, int]:
        """(cell, port, size) of a ``from``/``to`` reference."""
        if ref in RESERVED or ref.split(".")[0] in RESERVED and ref.count(".") == 1:
            pseudo, _, port = ref.partition(".")
            ports = inputs if pseudo == "in" else outputs
            if (pseudo == "in") != (kind == "from"):
                raise WiringError(f"{where}: '{pseudo}' can only be a connection's "
                                  f"{'from' if pseudo == 'in' else 'to'}")
            if not port:
                if len(ports) != 1:
                    raise WiringError(f"{where}: the wiring has several {pseudo}puts ({', '.join(ports)}): "
                                      f"name one as {pseudo}.PORT")
                port = next(iter(ports))
            if port not in ports:
                raise WiringError(f"{where}: the wiring has no {'input' if pseudo == 'in' else 'output'} {port!r}; "
                                  f"it has {', '.join(ports)}")
            return pseudo, port, ports[port]
        if ref in cells:
            cell, port = ref, None
        else:
            cell, _, port = ref.rpartition(".")
            if cell not in cells:
                raise WiringError(f"{where}: no cell named {(cell or ref)!r}; "
                                  f"cells: {', '.join(cells)}")
        ports = cells[cell].output_ports if kind == "from" else cells[cell].input_ports
        label = "output" if kind == "from" else "input"
        if port is None:
            if len(ports) != 1:
                raise WiringError(f"{where}: cell {cell!r} has several {label} ports ({', '.join(ports)}): "
                                  f"name one as {cell}.PORT")
            port = next(iter(ports))
        if port not in ports:
            raise WiringError(f"{where}: cell {cell!r} has no {label} port {port!r}; its {label}s: {', '.join(ports)}")
        return cell, port, ports[port]

    # ------------------------------------------------------------------------------ running
    def cell(self, name: str):
        """The cell module named ``name``, looked up in the module tree."""
        node = self
        for part in name.split("."):
            node = node[part]
        return node

    def make_state(self, batch_size: int = 1) -> tuple:
        """The zero state (a flat tuple)."""
        out: list = []
        for name in self._state_cells:
            out.extend(self.cell(name).zero_state(batch_size))
        for size in self._delayed_sizes:
            out.append(mx.zeros((batch_size, 1, size)))
        return tuple(out)

    def _split_state(self, state) -> tuple[dict[str, Any], list]:
        if state is None:
            return {}, [None] * len(self._delayed)
        per_cell, offset = {}, 0
        for name in self._state_cells:
            count = self._state_sizes[name]
            per_cell[name] = tuple(state[offset : offset + count]) if count else ()
            offset += count
        return per_cell, list(state[offset:])

    def _inputs(self, x) -> dict[str, mx.array]:
        """``x`` as {port: array}, each [B, S, port size] of one B and S; ValueError naming the
        port otherwise (a missing port was a KeyError, an extra one ignored, a wrong size an
        MLX broadcast error deep in the block)."""
        ports = self.input_ports
        if isinstance(x, dict):
            missing = [p for p in ports if p not in x]
            extra = [str(k) for k in x if k not in ports]
            if missing or extra:
                raise ValueError(f"the wiring's inputs are {', '.join(ports)}: "
                                 + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                             + ([f"no input port {', '.join(extra)}"] if extra else [])))
            inputs = x
        elif len(ports) > 1:
            raise ValueError(f"the wiring has several inputs ({', '.join(ports)}): pass a dict of them")
        else:
            inputs = {next(iter(ports)): x}
        lead = None
        for port, value in inputs.items():
            shape = tuple(getattr(value, "shape", ()))
            if not isinstance(value, mx.array) or len(shape) != 3 or shape[-1] != ports[port]:
                got = f"shape {shape}" if isinstance(value, mx.array) else type(value).__name__
                raise ValueError(f"input {port!r} must be an array [B, S, {ports[port]}], got {got}")
            if lead is not None and shape[:2] != lead:
                raise ValueError(f"inputs of one call need one batch and sequence length [B, S]: {lead} and "
                                 f"{shape[:2]} ({port!r})")
            lead = shape[:2]
        return inputs

    def _check_state(self, state, batch: int) -> None:
        want = sum(self._state_sizes.values()) + len(self._delayed)
        if state is not None and (not isinstance(state, (list, tuple)) or len(state) != want):
            got = f"{len(state)} arrays" if isinstance(state, (list, tuple)) else type(state).__name__
            raise ValueError(f"the state of wiring {self.resolved.name} is a tuple of {want} arrays (make_state), "
                             f"got {got}")
        check_state(None if state is None else [state], batch, 1)  # another batch: broadcast silently

    def __call__(self, x, state: tuple | None = None):
        inputs = self._inputs(x)
        self._check_state(state, next(iter(inputs.values())).shape[0])  # another block's: read misaligned
        if self._delayed:
            seq = next(iter(inputs.values())).shape[1]
            if seq > 1:
                outs = []
                for t in range(seq):
                    y, state = self._run({k: v[:, t : t + 1] for k, v in inputs.items()}, state)
                    outs.append(y)
                merged = {k: mx.concatenate([o[k] for o in outs], axis=1) for k in outs[0]}
                return (merged if isinstance(x, dict) or len(merged) > 1 else next(iter(merged.values()))), state
        y, state = self._run(inputs, state)
        return (y if isinstance(x, dict) or len(y) > 1 else next(iter(y.values()))), state

    def _run(self, inputs: dict[str, mx.array], state):
        cell_states, delayed_values = self._split_state(state)
        values: dict[tuple[str, str], mx.array] = {("in", k): v for k, v in inputs.items()}
        synapses = self.synapses
        delayed_index = {i: j for j, i in enumerate(self._delayed)}
        new_states: dict[str, tuple] = {}
        for name, path, ports, share in self._plan:
            cell = self
            for part in path:
                cell = cell[part]
            args = {}
            for port, sources in ports:
                acc = None
                for index, key, is_delayed in sources:
                    if is_delayed:
                        v = delayed_values[delayed_index[index]]
                        if v is None:  # zero state: nothing arrived yet
                            batch = next(iter(inputs.values())).shape[0]
                            v = mx.zeros((batch, 1, self._delayed_sizes[delayed_index[index]]))
                    else:
                        v = values[key]
                    v = synapses[index](v)
                    acc = v if acc is None else acc + v
                args[port] = acc
            if share is None:
                outs, new_state = cell(args, cell_states.get(name))
            else:
                outs, new_state = cell(args, cell_states.get(name), shared_weight=self.cell(share).featurizer())
            if getattr(cell, "stateful", False):
                new_states[name] = tuple(new_state) if new_state is not None else ()
            for port, value in outs.items():
                values[(name, port)] = value
        result = {}
        for port, sources in self._out_plan:
            acc = None
            for index, key in sources:
                v = synapses[index](values[key])
                acc = v if acc is None else acc + v
            result[port] = acc
        flat: list = []
        for name in self._state_cells:
            flat.extend(new_states[name])
        for index in self._delayed:
            s_cell, s_port = self._ends[index][0], self._ends[index][1]
            flat.append(values[(s_cell, s_port)])
        return result, tuple(flat)

    # ----------------------------------------------------------------------------- describing
    def describe(self) -> str:
        """The wiring as text: cells (type, ports, parameters) by stage, then connections."""
        r: ResolvedSpec = self.resolved
        lines = [f"wiring {r.name}: inputs {self.input_ports}, outputs {self.output_ports}"]
        for number, stage in enumerate(self.stages):
            for name in stage:
                cell = self.cell(name)
                share = r.cells[name].get("share")
                lines.append(f"  stage {number}: {name} = {r.cells[name]['type']}{cell.describe()}"
                             + (f" shares {share}" if share else ""))
        for index, (s_cell, s_port, d_cell, d_port) in enumerate(self._ends):
            syn = self.synapses[index]
            extra = []
            if syn.polarity < 0:
                extra.append("inhibitory")
            if syn.weighted:
                density = float(np.asarray(syn.mask).mean())
                extra.append(f"weights {tuple(syn.mask.shape)} density {density:.2f}")
            if index in self._delayed:
                extra.append("delayed one step")
            lines.append(f"  {s_cell}.{s_port} -> {d_cell}.{d_port}" + (f" ({', '.join(extra)})" if extra else ""))
        return "\n".join(lines)


def _implicit(src: str, dst: str):
    from .spec import Connection

    return Connection(src, dst)


def build_block(spec: WiringSpec | dict | str, params: dict[str, Any] | None = None) -> WiredBlock:
    """A WiredBlock from a spec, a spec dict, or a shipped spec name / spec file path."""
    from .library import load_spec

    if isinstance(spec, str):
        spec = load_spec(spec)
    return WiredBlock(spec, params)


__all__ = ["WiredBlock", "Synapse", "build_block", "WiringError"]
