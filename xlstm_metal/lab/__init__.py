"""The architecture lab: declarative wirings of LIV-style cells, MAD synthetic tasks, and
evolutionary architecture search.

- :mod:`~xlstm_metal.lab.cells`: the cell registry (ports, per-cell recurrent state);
  :func:`register_cell` adds user cells.
- :mod:`~xlstm_metal.lab.spec`: wiring specs (YAML/JSON) and the :class:`Wiring` builder.
- :mod:`~xlstm_metal.lab.wiring`: :class:`WiredBlock`, run in topological stages.
- :mod:`~xlstm_metal.lab.model`: :class:`LabModel` (blocks into models; config.json round trip),
  wired equivalents of the hand-written xLSTM-Large and 2024 sLSTM models.
- :mod:`~xlstm_metal.lab.mad`: the MAD tasks; :mod:`~xlstm_metal.lab.genome` and
  :mod:`~xlstm_metal.lab.evolve`: genomes and the search.
"""

from .cells import CellError, LabCell, build_cell, cell_types, register_cell
from .library import arch_names, block_spec_names, load_arch, load_spec
from .model import LabConfig, LabModel, build_model, load_wired, training_model, wired_equivalent
from .spec import Wiring, WiringError, WiringSpec, topological_stages
from .wiring import WiredBlock, build_block

__all__ = [
    "CellError", "LabCell", "build_cell", "cell_types", "register_cell",
    "arch_names", "block_spec_names", "load_arch", "load_spec",
    "LabConfig", "LabModel", "build_model", "load_wired", "training_model", "wired_equivalent",
    "Wiring", "WiringError", "WiringSpec", "topological_stages",
    "WiredBlock", "build_block",
]
