"""Per-layer weight type for ``quant.dynamic``: int8 unless the kernel's saturation costs more.

int8 weights run onnxruntime's u8s8 kernels, the fastest on x86; on CPUs without VNNI their
int16 pair sums saturate (``kernels.saturation``). On MiniLM that is not rare: emulated on
the samples, saturation takes 1-6% off the accumulators of the attention output projections
and costs one of 32 nearest-neighbour decisions, while uint8 weights everywhere (u8u8
kernels, which cannot saturate) ran 2-18% slower at one thread in five direct runs. So each
layer is measured: its rounding error (int8 codes against the float product) and the error
saturation adds, both on the same rows; the layer gets uint8 weights (the same codes shifted
by 128, so the same rounding) only where saturation adds more than rounding already costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxshrink.kernels import quantize as qk
from onnxshrink.kernels.saturation import dynamic_u8, saturation_error


@dataclass
class _Consumer:
    weight: np.ndarray  # float [K, N]
    qparams: qk.QParams  # its int8 parameters (codes are made when measured, then dropped)
    round2: float = 0.0
    sat2: float = 0.0
    ref2: float = 0.0


@dataclass
class SaturationProbe:
    """Observer of one input tensor: rounding and saturation error of each layer reading it,
    on at most `max_rows` rows (the first samples' tokens), kept as the codes
    DynamicQuantizeLinear gives them and measured once all are in (one product per layer)."""

    max_rows: int = 512
    consumers: dict[int, _Consumer] = field(default_factory=dict)
    rows: int = 0
    kept: list[tuple[np.ndarray, np.ndarray, float, int]] = field(default_factory=list)

    def add(self, key: int, weight: np.ndarray, qparams: qk.QParams) -> None:
        """A layer reading this tensor: its weight [K, N] and int8 parameters."""
        self.consumers[key] = _Consumer(weight, qparams)

    def update(self, x: np.ndarray) -> None:
        """One sample, quantized as DynamicQuantizeLinear would (whole tensor at once)."""
        if self.rows >= self.max_rows or not self.consumers:
            return
        x = np.asarray(x, np.float32)
        if x.ndim == 0 or x.size == 0:
            return
        codes, sx, zp = dynamic_u8(x)
        k, take = x.shape[-1], self.max_rows - self.rows
        rows = x.reshape(-1, k)[:take]
        self.kept.append((rows.copy(), codes.reshape(-1, k)[:take].astype(np.uint8), sx, zp))
        self.rows += len(rows)

    def finish(self) -> None:
        """Both errors of every layer on all kept rows."""
        if not self.kept:
            return
        x = np.concatenate([k[0] for k in self.kept])
        codes = np.concatenate([k[1] for k in self.kept]).astype(np.float32)
        steps = np.concatenate([np.full(len(k[0]), k[2], np.float32) for k in self.kept])
        zps = np.concatenate([np.full(len(k[0]), k[3], np.float32) for k in self.kept])
        self.kept = []
        centred = codes - zps[:, None]
        for c in self.consumers.values():
            if c.weight.shape[0] != x.shape[1]:
                continue
            exact = x @ c.weight
            q = qk.quantize(c.weight, c.qparams)
            step = steps[:, None] * np.asarray(c.qparams.scale, np.float32)
            got = (centred @ q.astype(np.float32)) * step
            lost = saturation_error(codes, q) * step
            c.round2 += float(np.sum((got - exact).astype(np.float64) ** 2))
            c.sat2 += float(np.sum(lost.astype(np.float64) ** 2))
            c.ref2 += float(np.sum(exact.astype(np.float64) ** 2))


def needs_uint8(probes: Sequence[SaturationProbe]) -> dict[int, dict[str, float]]:
    """Per layer key measured: relative rounding and saturation error, and the verdict
    (``uint8`` 1.0 where saturation adds more error than rounding)."""
    out: dict[int, dict[str, float]] = {}
    for probe in probes:
        probe.finish()
        for key, c in probe.consumers.items():
            if c.ref2 <= 0:
                continue
            rounding = float(np.sqrt(c.round2 / c.ref2))
            saturation = float(np.sqrt(c.sat2 / c.ref2))
            out[key] = {
                "rounding": rounding,
                "saturation": saturation,
                "uint8": float(saturation > rounding),
            }
    return out
