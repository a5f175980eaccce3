"""``quant.gather``: embedding tables (Gather on a float initializer) stored in int8 or int4.

Word embeddings are often the largest single tensor of a small transformer (all-MiniLM-L6-v2:
30522 x 384 fp32, 47 of its 90 MB), and the MatMul passes never see them. The default form
uses only standard ops and keeps the table compressed in onnxruntime's memory, since the
integer table is what the Gather reads and only the gathered rows become float:

``Gather(table_q, idx) -> Cast -> [Sub(Gather(zero_point, idx))] -> Mul(Gather(scale, idx))``

with one scale (and zero point) per slice along the gather axis, the rows of an embedding.
Measured on all-MiniLM-L6-v2 (onnxruntime 1.32, 1 thread, batch 1): output cosine 0.99997 vs
fp32, latency within noise of fp32. ``DequantizeLinear -> Gather`` dequantizes the whole table
on every run (1.85x latency), and one scale per tensor after the Gather (what
``quantize_dynamic`` writes) loses 28x more cosine (0.99918). The optional
``form = "contrib"`` writes onnxruntime's com.microsoft GatherBlockQuantized instead (uint8
or packed 4-bit, blocks along the row): one kernel, the only way to int4, but other runtimes
do not have it.

A table also read by other nodes (a tied LM head MatMul) is stored once: those readers get
``Cast -> [Sub] -> Mul`` of the same integers, which onnxruntime constant-folds to float at
session load, so they run as fast as before and see exactly the values the Gathers see.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.errors import PreconditionError
from onnxshrink.ir import edit
from onnxshrink.kernels import quantize as qk
from onnxshrink.passes import register
from onnxshrink.passes.base import Context, Pass, PassParams, PassResult, expect

logger = logging.getLogger(__name__)

#: Slices shorter than this are not embeddings: a scale per slice would eat the saving (and
#: the pass's own scale tables, one element per slice, are never quantized again).
MIN_SLICE = 8
_CAST_TO = {
    np.dtype(np.float32): onnx.TensorProto.FLOAT,
    np.dtype(np.float16): onnx.TensorProto.FLOAT16,
}


@dataclass(frozen=True, kw_only=True)
class GatherQuantParams(PassParams):
    """Parameters of ``quant.gather``."""

    #: 8 bits in either form; 4 bits only as GatherBlockQuantized (form = "contrib").
    bits: Literal[4, 8] = 8
    #: "standard": Gather -> Cast -> Mul, any runtime, opset >= 7. "contrib": onnxruntime's
    #: com.microsoft GatherBlockQuantized (2-D tables gathered along axis 0 only).
    form: Literal["standard", "contrib"] = "standard"
    #: Elements of a row sharing one scale (contrib only: a power of two >= 16); 0 means one
    #: scale per row (per slice along the gather axis).
    block_size: int = 0
    #: Signed codes with zero point 0 (one op fewer), or unsigned codes with a zero point.
    symmetric: bool = True
    #: Clip each group's range to minimize rounding error (helps at 4 bits, not at 8).
    weight_calibration: Literal["minmax", "mse"] = "minmax"
    #: Tables with fewer elements stay float (the saving is not worth a kernel change).
    min_params: int = 4096
    #: What to do with a table other nodes also read (a tied LM head): give them the
    #: dequantized table ("dequantize") or leave the table float ("skip").
    shared: Literal["dequantize", "skip"] = "dequantize"

    def check(self) -> None:
        """4 bits and blocks need the contrib form; blocks are powers of two >= 16."""
        expect(
            self.bits == 8 or self.form == "contrib",
            "bits",
            self.bits,
            "8 unless form = 'contrib' (standard ops cannot gather 4-bit values)",
        )
        ok = self.block_size == 0 or (
            self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0
        )
        expect(ok, "block_size", self.block_size, "0 or a power of two >= 16")
        expect(
            self.block_size == 0 or self.form == "contrib",
            "block_size",
            self.block_size,
            "0 unless form = 'contrib' (the standard form scales whole rows)",
        )
        expect(
            not (self.bits == 4 and self.block_size == 0),
            "block_size",
            self.block_size,
            "> 0 when bits = 4 (one 4-bit scale per row loses too much accuracy)",
        )
        expect(self.min_params >= 0, "min_params", self.min_params, "an integer >= 0")


@dataclass
class _Table:
    """One float initializer, the selected Gathers reading it, and its other readers."""

    const: gs.Constant
    values: np.ndarray
    axis: int
    gathers: list[gs.Node]
    others: list[gs.Node] = field(default_factory=list)


@register("quant.gather")
class GatherQuantPass(Pass[GatherQuantParams]):
    """Store the float tables of Gather nodes (embeddings) as int8 (or int4) initializers.

    Ops: Gather whose data input is a float32/float16 initializer with at least
    ``min_params`` elements, along any axis (the contrib form: 2-D tables, axis 0). Each slice
    along the gather axis (an embedding row) gets its own scale, or each ``block_size``
    elements of a row in the contrib form; the gathered rows are dequantized after the
    Gather, so the table stays integer in memory. Readers of the table other than the
    selected Gathers read the same integers dequantized (or the table is skipped, see
    ``shared``). Preconditions: opset >= 7 (standard form). Numeric effect: every gathered
    value within half a step of its row's scale (int8: ~0.7% relative RMS on MiniLM).
    """

    params_type = GatherQuantParams
    default_ops = frozenset({"Gather"})

    def requires(self, graph: gs.Graph, ctx: Context) -> None:
        """Mul with broadcasting (the standard form's dequantization) needs opset 7."""
        opset = int(graph.opset or ctx.opset)
        if self.params.form == "standard" and opset < 7:
            raise PreconditionError(f"quant.gather needs opset >= 7 (model has {opset})")

    def run(self, graph: gs.Graph, targets: Sequence[gs.Node], ctx: Context) -> PassResult:
        """Quantize each eligible table once and rewrite every selected Gather reading it."""
        result = PassResult()
        tables = self._tables(graph, targets, result)
        if not tables:
            return result
        names = edit.NameScope(graph)
        new_nodes: list[gs.Node] = []
        before = after = 0
        shared: dict[str, list[str]] = {}
        for table in tables:
            if self.params.form == "contrib":
                stored, err, granularity = self._contrib(table, names)
            else:
                stored, err, granularity = self._standard(table, names, new_nodes)
            before += table.values.nbytes
            after += stored
            if table.others:
                shared[table.const.name] = [n.name for n in table.others]
            logger.debug(
                "quant.gather: %s %s -> %d bytes", table.const.name, table.values.shape, stored
            )
            for node in table.gathers:
                result.touch(
                    node,
                    table=table.const.name,
                    bits=self.params.bits,
                    granularity=granularity,
                    rel_rms_error=err,
                )
        graph.nodes.extend(new_nodes)
        result.stats.update(
            form=self.params.form,
            bits=self.params.bits,
            tables=len(tables),
            gathers=sum(len(t.gathers) for t in tables),
            table_bytes_before=before,
            table_bytes_after=after,
        )
        if shared:
            result.stats["dequantized_for_other_readers"] = shared
        return result

    def _tables(
        self, graph: gs.Graph, targets: Sequence[gs.Node], result: PassResult
    ) -> list[_Table]:
        """Group eligible Gathers by table; skip (with the reason) what cannot be quantized."""
        groups: dict[str, _Table] = {}
        for node in targets:
            reason = self._eligible(node)
            if reason:
                result.skip(node, reason)
                continue
            const = node.inputs[0]
            assert isinstance(const, gs.Constant)
            axis = int(node.attrs.get("axis", 0)) % len(const.shape)
            if const.name not in groups:
                groups[const.name] = _Table(const, np.asarray(const.values), axis, [])
            groups[const.name].gathers.append(node)
        main = {id(n) for n in graph.nodes}
        tables = []
        for table in groups.values():
            selected = {id(n) for n in table.gathers}
            table.others = [n for n in table.const.outputs if id(n) not in selected]
            reason = self._shared_reason(table, main)
            if reason:
                for node in table.gathers:
                    result.skip(node, reason)
            else:
                tables.append(table)
        return tables

    def _eligible(self, node: gs.Node) -> str | None:
        """Why this Gather is left alone, or None."""
        p = self.params
        if len(node.inputs) < 2:
            return "expected data and indices inputs"
        data = node.inputs[0]
        if not isinstance(data, gs.Constant):
            return "table is computed, not an initializer"
        dtype = _dtype(data)
        if dtype not in _CAST_TO:
            return f"table dtype {dtype} is not float32/float16"
        shape = [int(d) for d in data.shape]
        size = int(np.prod(shape))
        if not shape:
            return "table is a scalar"
        if size < p.min_params:
            return f"table has {size} elements, below min_params = {p.min_params}"
        axis = int(node.attrs.get("axis", 0)) % len(shape)
        if shape[axis] == 0 or size // shape[axis] < MIN_SLICE:
            return f"gathered slices have fewer than {MIN_SLICE} elements (not an embedding)"
        if p.form == "contrib":
            if len(shape) != 2 or axis != 0:
                return "GatherBlockQuantized (form = 'contrib') takes 2-D tables gathered on axis 0"
            if p.bits == 4 and shape[1] % 2:
                return "4-bit rows are packed in pairs: the row length must be even"
        return None

    def _shared_reason(self, table: _Table, main: set[int]) -> str | None:
        """Why a table read by more than the selected Gathers is left float, or None."""
        if len({int(n.attrs.get("axis", 0)) % table.values.ndim for n in table.gathers}) > 1:
            return "the table is gathered along different axes (one scale layout per table)"
        if not table.others:
            return None
        readers = ", ".join(f"{n.op} {n.name!r}" for n in table.others)
        if any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in table.others):
            return f"the table already carries Q/DQ ({readers})"
        if self.params.shared == "skip":
            return f"the table is also read by {readers} (shared = 'skip')"
        if self.params.form == "contrib":
            return (
                f"the table is also read by {readers}; only GatherBlockQuantized reads its layout"
            )
        if any(id(n) not in main for n in table.others):
            return f"the table is also read inside a subgraph ({readers})"
        return None

    def _qparams(
        self, w: np.ndarray, dtype: str, axis: int, block: int | None, ftype: np.dtype
    ) -> qk.QParams:
        """Scales from the table's range, rounded to the table's float type before use.

        Quantizing with the scales exactly as stored keeps every value within half a step.
        """
        p = self.params
        choose = qk.mse_weight_qparams if p.weight_calibration == "mse" else qk.weight_qparams
        qp = choose(w, dtype, axis=axis, block_size=block, symmetric=p.symmetric)
        if ftype == np.float16:
            qp = replace(qp, scale=qk.scales_as(qp.scale, np.float16).astype(np.float32))
        return qp

    def _standard(
        self, table: _Table, names: edit.NameScope, new_nodes: list[gs.Node]
    ) -> tuple[int, float, str]:
        """Gather -> Cast -> [Sub] -> Mul on int8/uint8 codes; (bytes, error, granularity)."""
        p = self.params
        ftype = table.values.dtype
        w = np.asarray(table.values, dtype=np.float32)  # no copy of a float32 table
        qp = self._qparams(w, "int8" if p.symmetric else "uint8", table.axis, None, ftype)
        q = qk.quantize(w, qp)
        view = [1] * w.ndim
        view[table.axis] = -1
        base = table.const.name
        codes = gs.Constant(names.fresh(f"{base}_quantized"), q)
        scale = gs.Constant(
            names.fresh(f"{base}_scale"), np.asarray(qp.scale).astype(ftype).reshape(view)
        )
        zero = None
        if not p.symmetric:  # float zero points: (q - zp) is exact in float16 too
            zp = np.asarray(qp.zero_point).astype(ftype).reshape(view)
            zero = gs.Constant(names.fresh(f"{base}_zero_point"), zp)
        for node in table.gathers:
            _rewrite(node, codes, scale, zero, ftype, names, new_nodes)
        if table.others:
            _dequantized_table(table, codes, scale, zero, names, new_nodes)
        stored = q.nbytes + scale.values.nbytes + (zero.values.nbytes if zero is not None else 0)
        err = _rel_error(w, qk.dequantize(q, qp))
        return stored, err, f"per slice along axis {table.axis}"

    def _contrib(self, table: _Table, names: edit.NameScope) -> tuple[int, float, str]:
        """com.microsoft GatherBlockQuantized on uint8 (or packed 4-bit) rows."""
        p = self.params
        ftype = table.values.dtype
        w = np.asarray(table.values, dtype=np.float32)  # no copy of a float32 table
        cols = w.shape[1]
        block = p.block_size or max(16, 1 << (cols - 1).bit_length())  # one block per row
        qp = self._qparams(w, "uint4" if p.bits == 4 else "uint8", 1, block, ftype)
        q = qk.quantize(w, qp)
        zp = np.asarray(qp.zero_point).astype(np.uint8)
        if p.bits == 4:
            data, zp = qk.pack_int4_rows(q), qk.pack_int4_rows(zp)
        else:
            data = q
        base = table.const.name
        scale = np.ascontiguousarray(np.asarray(qp.scale).astype(ftype))
        inputs: list[gs.Tensor] = [
            gs.Constant(names.fresh(f"{base}_quantized"), data),
            gs.Constant(names.fresh(f"{base}_scale"), scale),
        ]
        if not p.symmetric:  # symmetric codes centre on 2^(bits-1), the op's default
            inputs.append(gs.Constant(names.fresh(f"{base}_zero_point"), zp))
        for node in table.gathers:
            idx = node.inputs[1]
            node.op = "GatherBlockQuantized"
            node.domain = "com.microsoft"
            node.attrs.clear()
            node.attrs.update(bits=p.bits, block_size=block, gather_axis=0, quantize_axis=1)
            node.inputs.clear()
            node.inputs.extend([inputs[0], idx, *inputs[1:]])
        stored = data.nbytes + scale.nbytes + (zp.nbytes if not p.symmetric else 0)
        return stored, _rel_error(w, qk.dequantize(q, qp)), f"blocks of {block} along rows"


def _rewrite(
    node: gs.Node,
    codes: gs.Constant,
    scale: gs.Constant,
    zero: gs.Constant | None,
    ftype: np.dtype,
    names: edit.NameScope,
    new_nodes: list[gs.Node],
) -> None:
    """Gather the codes, then dequantize only the gathered rows with their gathered scales."""
    base = node.name or "Gather"
    y, idx = node.outputs[0], node.inputs[1]
    attrs = dict(node.attrs)
    gathered = gs.Variable(names.fresh(f"{base}_quantized"), codes.values.dtype)
    node.inputs[0] = codes
    node.outputs[0] = gathered
    x = gs.Variable(names.fresh(f"{base}_float"), ftype)
    new_nodes.append(edit.cast_node(names, base, gathered, x, _CAST_TO[np.dtype(ftype)]))
    if zero is not None:
        zp = gs.Variable(names.fresh(f"{base}_zero_point"), ftype)
        centred = gs.Variable(names.fresh(f"{base}_centred"), ftype)
        new_nodes += [
            gs.Node("Gather", names.fresh(f"{base}_zero_point_Gather"), attrs, [zero, idx], [zp]),
            gs.Node("Sub", names.fresh(f"{base}_Sub"), inputs=[x, zp], outputs=[centred]),
        ]
        x = centred
    s = gs.Variable(names.fresh(f"{base}_scale"), ftype)
    new_nodes += [
        gs.Node("Gather", names.fresh(f"{base}_scale_Gather"), attrs, [scale, idx], [s]),
        gs.Node("Mul", names.fresh(f"{base}_Mul"), inputs=[x, s], outputs=[y]),
    ]


def _dequantized_table(
    table: _Table,
    codes: gs.Constant,
    scale: gs.Constant,
    zero: gs.Constant | None,
    names: edit.NameScope,
    new_nodes: list[gs.Node],
) -> None:
    """The whole table as float for its other readers: all-constant, so onnxruntime folds it."""
    base = table.const.name
    ftype = table.values.dtype
    x = gs.Variable(names.fresh(f"{base}_float"), ftype, list(table.values.shape))
    new_nodes.append(edit.cast_node(names, base, codes, x, _CAST_TO[np.dtype(ftype)]))
    if zero is not None:
        centred = gs.Variable(names.fresh(f"{base}_centred"), ftype, list(table.values.shape))
        new_nodes.append(
            gs.Node("Sub", names.fresh(f"{base}_Sub"), inputs=[x, zero], outputs=[centred])
        )
        x = centred
    out = gs.Variable(names.fresh(f"{base}_dequantized"), ftype, list(table.values.shape))
    new_nodes.append(gs.Node("Mul", names.fresh(f"{base}_Mul"), inputs=[x, scale], outputs=[out]))
    edit.redirect(table.const, out)


def _dtype(t: gs.Tensor) -> np.dtype | None:
    """The tensor's numpy dtype, or None when it has none (bfloat16, strings, unknown)."""
    try:
        return np.dtype(t.dtype) if t.dtype is not None else None
    except TypeError:
        return None


def _rel_error(w: np.ndarray, wq: np.ndarray) -> float:
    """Relative RMS error of the dequantized table (reported per Gather)."""
    ref2 = _sum_squares(w)
    err2 = _sum_squares(np.subtract(w, wq, out=wq))  # wq is a temporary: reused
    return round(float(np.sqrt(err2 / max(ref2, 1e-60))), 6)


def _sum_squares(a: np.ndarray, chunk: int = 1 << 20) -> float:
    """Sum of squares of a float32 array without a float64 copy (per-chunk dot products)."""
    flat = a.ravel()
    parts = (flat[i : i + chunk] for i in range(0, flat.size, chunk))
    return sum(float(np.dot(part, part)) for part in parts)
