"""Per-column weight range for ``quant.dynamic``: int8 unless the kernel's saturation costs more.

int8 weights run onnxruntime's u8s8 kernels, the fastest on x86; on CPUs without VNNI their
int16 pair sums saturate (``kernels.saturation``). On MiniLM that is not rare: emulated on
the samples, saturation takes 2-7% off the accumulators of the attention output projections
(up to five times their rounding error) and costs one of 32 nearest-neighbour decisions.
Two forms keep the same kernels: 7-bit codes ([-64, 63], which cannot saturate, at about
twice the rounding error) and full int8. uint8 weights (u8u8 kernels) avoid saturation at
full precision but ran 7-11% slower at one thread and 18-26% at two in interleaved A/B runs
of the same MiniLM weights, so they are not among the choices. Each output column has its
own scale, so each column is measured on the same rows in both forms (rounding, plus
saturation for int8, as the kernel computes it) and takes the one with the lower error: on
MiniLM 11% of the columns go 7-bit, and layer 0's attention output projection's error drops
from 7.5% to 1.5%.
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
    options: dict[str, qk.QParams]  # candidate weight parameters, per output column
    codes: dict[str, np.ndarray] = field(default_factory=dict)  # made when measured
    err2: dict[str, np.ndarray] = field(default_factory=dict)  # per column: rounding + saturation
    sat2: dict[str, np.ndarray] = field(default_factory=dict)  # per column: saturation alone
    ref2: np.ndarray | None = None  # per column


@dataclass
class Choice:
    """One layer's weights as measured: codes and per-column scales taking, column by
    column, the option with the lower error; and each option's relative error."""

    codes: np.ndarray
    scale: np.ndarray
    taken: dict[str, int]  # columns per option
    errors: dict[str, float]


@dataclass
class SaturationProbe:
    """Observer of one input tensor: the output error of each layer reading it in each weight
    form (rounding, plus saturation as the kernel computes it), per output column, on at most
    `max_rows` rows (the first samples' tokens), kept as DynamicQuantizeLinear codes and
    measured once all are in (one product per layer and option)."""

    max_rows: int = 512
    consumers: dict[int, _Consumer] = field(default_factory=dict)
    rows: int = 0
    kept: list[tuple[np.ndarray, np.ndarray, float, int]] = field(default_factory=list)

    def add(self, key: int, weight: np.ndarray, options: dict[str, qk.QParams]) -> None:
        """A layer reading this tensor: its weight [K, N] and per-column parameters to compare
        (the first option wins ties)."""
        self.consumers[key] = _Consumer(weight, options)

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
        """Every option's error, for every layer, on all kept rows."""
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
            c.ref2 = _col2(exact)
            for name, qp in c.options.items():
                q = c.codes[name] = qk.quantize(c.weight, qp)
                step = steps[:, None] * np.asarray(qp.scale, np.float32)
                lost = saturation_error(codes, q) * step
                got = (centred @ q.astype(np.float32)) * step
                got -= lost  # what the kernel really returns
                c.err2[name] = _col2(got - exact)
                c.sat2[name] = _col2(lost)


def _col2(a: np.ndarray) -> np.ndarray:
    return np.sum(np.square(a, dtype=np.float64), axis=0)


def choose(probes: Sequence[SaturationProbe]) -> dict[int, Choice]:
    """Per layer key measured: its weights, each column in the option with the lower error."""
    out: dict[int, Choice] = {}
    for probe in probes:
        probe.finish()
        for key, c in probe.consumers.items():
            if c.ref2 is None or not c.err2:
                continue
            names = list(c.options)
            errs = np.stack([c.err2[n] for n in names])  # [options, N]
            best = np.argmin(errs, axis=0)  # the first option on a tie
            cols = np.arange(errs.shape[1])
            codes = np.stack([c.codes[n] for n in names])[best, :, cols].T
            scales = np.stack(
                [np.broadcast_to(np.asarray(c.options[n].scale, np.float32), cols.shape)
                 for n in names]
            )[best, cols]
            total = max(float(c.ref2.sum()), 1e-300)
            errors = {n: float(np.sqrt(c.err2[n].sum() / total)) for n in names}
            errors.update({f"{n}_saturation": float(np.sqrt(c.sat2[n].sum() / total))
                           for n in names})
            errors["chosen"] = float(np.sqrt(errs[best, cols].sum() / total))
            out[key] = Choice(
                np.ascontiguousarray(codes), scales.astype(np.float32),
                {n: int(np.sum(best == i)) for i, n in enumerate(names)}, errors,
            )
    return out
