"""The tolerance and latency guard of ``quant.qdq``: measure, attribute, keep the fewest in float.

Per-layer sensitivity differs by orders of magnitude (DESIGN.md), so instead of asking the user
which layers to leave in float, the guard:

1. builds the fully quantized candidate on a copy of the graph (calibration is done once, so
   any subset of layers can be materialised again cheaply) and runs it in onnxruntime with the
   fusions users deploy;
2. if it misses the recipe's tolerance, attributes the error to layers: in one run of the
   candidate and the float graph with every layer's input and output exposed, a layer's share
   is the relative error it *adds* (error at its output minus error at its input);
3. probes latency: onnxruntime's profiler times every layer's kernel in the float graph and in
   the fully quantized candidate, so each layer's gain from int8 is measured, not assumed
   (on CPUs without VNNI many small or depthwise convolutions gain nothing);
4. measures latency against the float graph (interleaved runs, median) and, if the quantized
   model is slower, drops the layers int8 speeds up least until it is faster, or gives up on
   quantization for the model altogether ("never ship a model slower than the original") before
   any accuracy search is paid for;
5. returns layers to float for accuracy as a knapsack (error per millisecond saved, errors adding
   in quadrature, the budget searched with real runs), then tries to re-quantize each returned
   layer (best value first) and keeps it if the tolerance still holds; the latency check runs
   again on the result.

Every decision is reported with its numbers.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxshrink import runtime
from onnxshrink.calibration import collect
from onnxshrink.ir import edit
from onnxshrink.kernels import quantize as qk
from onnxshrink.passes import qdq_probe
from onnxshrink.passes.qdq_materialise import WeightConfig, materialise, weight_dtypes
from onnxshrink.passes.qdq_opset import raise_opset
from onnxshrink.passes.qdq_plan import PlanOptions
from onnxshrink.passes.qdq_plan import plan as make_plan
from onnxshrink.recipe.schema import Tolerance
from onnxshrink.validate.bounded import probability_outputs
from onnxshrink.validate.compare import compare_output, judge

logger = logging.getLogger(__name__)

#: Builds the graph with every planned layer quantized except those at the given node indices.
Build = Callable[[frozenset[int]], gs.Graph]


@dataclass
class GuardReport:
    """What the guard decided and measured (JSON-ready through `to_dict`)."""

    tolerance: dict[str, float]
    kept_float: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0
    final_failures: list[str] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)
    gave_up: str | None = None
    ranking: str = ""
    probe: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for PassResult.stats."""
        out: dict[str, Any] = {
            "tolerance": self.tolerance,
            "kept_float": self.kept_float,
            "evaluations": self.evaluations,
        }
        if self.final_failures:
            out["final_failures"] = self.final_failures
        if self.latency:
            out["latency"] = self.latency
        if self.gave_up:
            out["gave_up"] = self.gave_up
        if self.ranking:
            out["ranking"] = self.ranking
        if self.probe:
            out["probe"] = self.probe
        return out


class Evaluator:
    """Runs candidates on the feeds and judges them against the float graph's outputs.

    Most candidates the guard tries fail, and they fail on the same few hard samples, so
    samples run hardest first (ordered by the last candidate's error) and a candidate that
    breaks the tolerance on the first `early` samples (or the first 3 x `early`) is rejected
    without running the rest.
    Worst-sample bounds (cosine, max_abs) are exact on any subset; pooled ones (rel L2, SNR)
    are judged on the subset, a conservative reading. A candidate is accepted only on all
    samples. `reference`: the original model's outputs on the feeds (``Context.
    reference_outputs``), so that the tolerance is held against the original; without it the
    float `graph` runs for one (on `session` when the caller has one).
    """

    def __init__(
        self,
        graph: gs.Graph,
        feeds: Sequence[dict[str, np.ndarray]],
        workdir: Path,
        tolerance: Tolerance,
        early: int = 4,
        files: ModelFiles | None = None,
        session: Any = None,
        reference: list[list[Any]] | None = None,
    ) -> None:
        self.graph = graph
        self.feeds = feeds  # a lazy sequence stays lazy: one sample in memory at a time
        self.workdir = workdir
        self.tolerance = tolerance
        self.early = early
        self.files = files or ModelFiles(workdir)
        self.output_names = [t.name for t in graph.outputs]
        self.probabilities = probability_outputs(graph)
        if reference is None:
            sess = session if session is not None else self._session(graph, "guard_ref")
            reference = [sess.run(self.output_names, f) for f in self.feeds]
            del sess
        self.reference = reference
        self.hard = list(range(len(self.feeds)))
        self.runs = 0

    def _session(self, graph: gs.Graph, stem: str) -> Any:
        """A session with every fusion deployment gets (the float graph and the full candidate
        are exported once and reused)."""
        with self.files.exported(graph, stem) as model:
            return model.session(opt="all")

    def failures(self, candidate: gs.Graph, session: Any = None) -> list[str]:
        """The tolerance bounds the candidate breaks (fused kernels, as deployed; `session`:
        one the caller already has on the candidate, with every fusion)."""
        self.runs += 1
        sess = session if session is not None else self._session(candidate, "guard")
        got: dict[int, list[Any]] = {}
        bad: list[str] = []
        # hardest first, judged after 4, 12 and all samples: a candidate that breaks a bound
        # on a sample the ordering did not know yet (the first one judged) stops halfway
        cuts = [0, self.early, 3 * self.early, len(self.hard)]
        for a, b in itertools.pairwise(cuts):
            batch = self.hard[a:b]
            if not batch:
                continue
            for i in batch:
                got[i] = sess.run(self.output_names, self.feeds[i])
            bad = self._judge(got)
            if bad:
                break
        self._reorder(got)
        return bad

    def _judge(self, got: dict[int, list[Any]]) -> list[str]:
        bad = []
        for j, name in enumerate(self.output_names):
            refs = [np.asarray(self.reference[i][j]) for i in got]
            if not refs or refs[0].dtype.kind != "f":
                continue
            cands = [np.asarray(g[j]) for g in got.values()]
            bad += [
                f"{name}: {f}"
                for f in judge(
                    compare_output(name, refs, cands),
                    self.tolerance,
                    probability=name in self.probabilities,
                ).failures
            ]
        return bad

    def _reorder(self, got: dict[int, list[Any]]) -> None:
        """Hardest samples first: largest relative error over the float outputs."""
        err = {i: _relative_error(self.reference[i], g) for i, g in got.items()}
        self.hard.sort(key=lambda i: (-err.get(i, -1.0), i))

    def output_error(self, candidate: gs.Graph, samples: int) -> float:
        """Relative L2 error of every float output over the `samples` hardest feeds (fused)."""
        sess = self._session(candidate, "guard")
        err2 = ref2 = 0.0
        for i in self.hard[:samples]:
            out = sess.run(self.output_names, self.feeds[i])
            e2, r2 = _squared_error(self.reference[i], out)
            err2, ref2 = err2 + e2, ref2 + r2
        return float(np.sqrt(err2 / ref2)) if ref2 > 0 else 0.0

    def isolated_error(
        self, build: Build, layers: dict[int, tuple[str, str]], samples: int = 2
    ) -> dict[int, float]:
        """Output error with only one layer quantized, for each layer (its true sensitivity:
        local error times whatever the rest of the network does to it), on the `samples`
        hardest feeds: where a worst-sample bound breaks (on the detector, 2 samples instead
        of 4 cut this ranking from 9 to 5 s and kept the same layer on top)."""
        every = frozenset(layers)
        return {k: self.output_error(build(every - {k}), samples) for k in sorted(layers)}

    def added_error(
        self, candidate: gs.Graph, layers: dict[int, tuple[str, str]]
    ) -> dict[int, float]:
        """Relative L2 error each layer adds (output error minus input error), per node index.

        Both graphs run side by side one sample at a time and only running sums are kept, so
        memory holds one sample's activations, not every sample's.
        """
        inputs = {t.name for t in self.graph.inputs}
        names = sorted({n for pair in layers.values() for n in pair} - inputs)
        err2 = dict.fromkeys(names, 0.0)
        ref2 = dict.fromkeys(names, 0.0)
        ref_s = _session(self.graph, names, self.workdir, "attr_ref")
        cand_s = _session(candidate, names, self.workdir, "attr_cand")
        for feed in self.feeds:
            for n, r, c in zip(names, ref_s.run(names, feed), cand_s.run(names, feed)):
                r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
                if r64.shape == c64.shape:
                    err2[n] += float(np.sum((r64 - c64) ** 2))
                    ref2[n] += float(np.sum(r64**2))
        err = {n: float(np.sqrt(err2[n] / ref2[n])) if ref2[n] > 0 else 0.0 for n in names}
        err.update(dict.fromkeys(inputs, 0.0))  # model inputs are fed unchanged
        return {k: max(err[o] - err[i], 0.0) for k, (i, o) in layers.items()}


def _session(graph: gs.Graph, names: list[str], workdir: Path, stem: str) -> Any:
    """A session on `graph` exposing `names` as extra outputs."""
    model = collect.instrumented_model(graph, names, workdir / f"{stem}.onnx")
    try:
        return model.session(opt="basic")
    finally:
        model.remove()


def _squared_error(ref: Sequence[Any], got: Sequence[Any]) -> tuple[float, float]:
    """(sum of squared errors, sum of squared reference values) over the float outputs."""
    err2 = ref2 = 0.0
    for r, c in zip(ref, got):
        r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
        if r64.dtype.kind == "f" and r64.shape == c64.shape:
            err2 += float(np.sum((r64 - c64) ** 2))
            ref2 += float(np.sum(r64**2))
    return err2, ref2


def _relative_error(ref: Sequence[Any], got: Sequence[Any]) -> float:
    err2, ref2 = _squared_error(ref, got)
    return float(np.sqrt(err2 / ref2)) if ref2 > 0 else float(err2 > 0)


def accuracy_guard(
    build: Build,
    evaluator: Evaluator,
    layers: dict[int, tuple[str, str]],
    describe: Callable[[int], dict[str, Any]],
    report: GuardReport,
    gains: dict[int, float] | None = None,
    max_evaluations: int = 24,
    max_isolated: int = 128,
) -> frozenset[int]:
    """A cheap set of layer indices to keep in float so that the tolerance holds.

    A knapsack: each layer has an error (isolated sensitivity: output error with only that
    layer quantized, on a few samples, when there are at most `max_isolated` of them, else the
    error it adds locally in one run of the full candidate) and a value (the milliseconds int8
    saves on it, from the latency probe; without one, every layer is worth the same). Errors
    of independent layers add in quadrature, so for an error budget B the layers are quantized
    greedily in order of error per value while the sum of squared errors fits B, skipping the
    ones that would overflow it (one very sensitive layer does not block the cheaper ones
    after it). The budget is searched with real onnxruntime runs (the additive model is only
    a guide): halved, quartered and so on from the whole until a set holds, then bisected;
    then each float layer is tried back in int8, best value first. Before the search,
    the most sensitive layer alone is tried in float: when one layer is the culprit (on the
    detector, one convolution with 5x the isolated error of any other), that is the fewest,
    found in one run.
    """
    full = build(frozenset())
    failures = evaluator.failures(full)
    if not failures:
        report.evaluations = evaluator.runs
        return frozenset()
    if len(layers) <= max_isolated:
        share = evaluator.isolated_error(build, layers)
        report.ranking = "isolated output error (2 hardest samples)"
    else:
        share = evaluator.added_error(full, layers)
        report.ranking = "local added error"
    if gains:
        report.ranking += " per ms saved"
    cost = _error_per_gain(share, gains or {})
    order = sorted(layers, key=lambda k: (cost[k], k))  # best to quantize first
    every = frozenset(layers)

    def kept_float(budget: float) -> frozenset[int]:
        used, quantized = 0.0, []
        for k in order:
            if used + share[k] ** 2 <= budget:
                quantized.append(k)
                used += share[k] ** 2
        return every - frozenset(quantized)

    best: frozenset[int] | None = None
    tried: dict[frozenset[int], bool] = {frozenset(): False}
    worst = max(layers, key=lambda k: (share[k], -k))
    if len(layers) > 1 and share[worst] > 0:
        # one layer may be all it takes (often the case: one outlier layer dominates); if so
        # it is the fewest, and the budget search would spend several runs to find it
        alone = frozenset({worst})
        tried[alone] = not evaluator.failures(build(alone))
        if tried[alone]:
            best = alone
    lo = min((share[k] ** 2 for k in order if share[k] > 0), default=0.0) * 0.5
    hi = sum(share[k] ** 2 for k in order)  # everything quantized: known to fail

    def holds(budget: float) -> bool | None:
        """Whether the layer set of `budget` holds the tolerance (None: it is every layer)."""
        nonlocal best
        chosen = kept_float(budget)
        if chosen == every:
            return None
        if chosen not in tried:
            tried[chosen] = not evaluator.failures(build(chosen))
        if tried[chosen] and (best is None or len(chosen) < len(best)):
            best = chosen
        return tried[chosen]

    # gallop down from the whole budget (1/2, 1/4, 1/16, ...): models usually need a few layers
    # in float, and these budgets leave few there. Bisecting up from the smallest budget
    # instead spent six passing runs on the recognizer with 3-6 of 13 layers in int8, which
    # the put-back loop below then returned to int8 one run at a time.
    exponent = 1
    while best is None and evaluator.runs < max_evaluations // 2:
        budget = hi * 2.0**-exponent
        ok = holds(budget) if budget > lo else None
        if ok is None:
            break
        if ok:
            lo = budget
        else:
            hi, exponent = budget, exponent * 2
    for _ in range(12):  # then bisect the budget on a log scale
        if best is not None and len(best) == 1:
            break  # one layer in float: none fewer would hold (all quantized fails)
        if evaluator.runs >= max_evaluations // 2 or hi <= lo * 1.05:
            break
        mid = float(np.sqrt(lo * hi)) if lo > 0 else hi / 4
        if holds(mid):
            lo = mid
        else:
            hi = mid
    if best is None:
        chosen = kept_float(lo)
        if chosen not in tried and chosen != every:
            tried[chosen] = not evaluator.failures(build(chosen))
        if chosen == every or not tried[chosen]:
            report.gave_up = (
                f"tolerance not met unless (nearly) every layer stays float ({'; '.join(failures)})"
            )
            report.final_failures = failures
            report.evaluations = evaluator.runs
            return every
        best = chosen
    # put back the most valuable ones while the tolerance still holds
    for k in sorted(best, key=lambda k: (cost[k], k)):
        if evaluator.runs >= max_evaluations:
            break
        trial = best - {k}
        if trial not in tried:
            tried[trial] = not evaluator.failures(build(trial))
        if tried[trial]:
            best = trial
    for k in sorted(best, key=lambda k: -cost[k]):
        entry = {**describe(k), "error": round(share[k], 6)}
        if gains and k in gains:
            entry["int8_saves_ms"] = round(gains[k], 4)
        report.kept_float.append({**entry, "reason": "returned to float by the tolerance guard"})
    report.evaluations = evaluator.runs
    return best


def _error_per_gain(share: dict[int, float], gains: dict[int, float]) -> dict[int, float]:
    """Error per millisecond saved; without a probe, the error alone. Gains are floored at a
    small fraction of the largest so that layers int8 does not speed up rank last among
    equally harmful ones but harmless ones still get quantized (they shrink the file)."""
    if not gains:
        return dict(share)
    floor = max(max(gains.values(), default=0.0) * 0.01, 1e-6)
    return {k: e / max(gains.get(k, floor), floor) for k, e in share.items()}


def latency(graph: gs.Graph, files: ModelFiles, stem: str) -> Any:
    """A one-thread onnxruntime session on the exported graph (the caller times it)."""
    with files.exported(graph, stem) as model:
        return model.session(threads=1)


class ModelFiles:
    """Exports graphs for onnxruntime, keeping the ones the guard runs again and again.

    Exporting and writing a 90 MB transformer costs about a second; the float graph and the
    fully quantized candidate are each run by the probe, the latency guard and the accuracy
    guard, so they are written once per guard run (to its scratch folder) and reused.
    """

    def __init__(
        self, workdir: Path, in_order: Callable[[gs.Graph], bool] | None = None
    ) -> None:
        self.workdir = workdir
        self.kept: list[tuple[gs.Graph, collect.ExportedModel]] = []
        self.reusable: list[gs.Graph] = []
        #: Whether a graph is a candidate built clean and in order (written without a copy).
        self.in_order = in_order or (lambda graph: False)

    def keep(self, graph: gs.Graph) -> None:
        """Mark `graph` as worth keeping on disk once exported."""
        if not any(g is graph for g in self.reusable):
            self.reusable.append(graph)

    @contextlib.contextmanager
    def exported(self, graph: gs.Graph, stem: str) -> Iterator[collect.ExportedModel]:
        """The graph's exported model, valid inside the block."""
        for g, model in self.kept:
            if g is graph:
                yield model
                return
        in_place = self.in_order(graph)
        if any(g is graph for g in self.reusable):
            path = self.workdir / f"kept{len(self.kept)}.onnx"
            model = collect.instrumented_model(graph, [], path, in_place=in_place)
            self.kept.append((graph, model))
            yield model
            return
        path = self.workdir / f"{stem}.onnx"
        model = collect.instrumented_model(graph, [], path, in_place=in_place)
        try:
            yield model
        finally:
            model.remove()


def timed_ratio(
    quant: Any,
    base: Any,
    feed: dict[str, np.ndarray],
    threshold: float = 1.0,
    budget_s: float = 1.0,
    rounds: int = 5,
) -> tuple[float, float, float]:
    """Latency of two sessions measured in alternation: (quant_ms, base_ms, ratio), the times
    as medians and the ratio as the median of the pairs' ratios (each pair ran back to back,
    so a slow spell of the machine, which lasts seconds here, cancels out within it).

    After `rounds` pairs, timing stops as soon as the threshold is decided: the ratio is far
    (10%) from it, or it lies more than three robust standard errors from it (median and
    MAD of the pairs' log ratios: a few pairs hit by another process do not stall it, where
    a sign test needed every one of 7 pairs on one side). Otherwise it goes on to at least
    3 x `rounds` pairs and `budget_s`, and the estimate decides. On a shared 2-core machine
    five pairs of a 100 ms detector moved its ratio between 0.89 and 1.02 on the same graphs.
    """
    for s in (quant, base):
        s.run(None, feed)
    tq: list[float] = []
    tb: list[float] = []
    deadline = time.perf_counter() + budget_s
    while True:
        for s, acc in ((quant, tq), (base, tb)):
            t0 = time.perf_counter()
            s.run(None, feed)
            acc.append(time.perf_counter() - t0)
        n = len(tq)
        if n < rounds:
            continue
        logs = np.log(np.maximum(tq, 1e-9) / np.maximum(tb, 1e-9))
        center = float(np.median(logs))
        ratio = math.exp(center)
        far = not 0.9 * threshold <= ratio <= 1.1 * threshold
        # the deviation, robustly: MAD x 1.4826, or the interquartile range / 1.349 where pairs
        # fall in two clusters (MAD is 0 for 3 vs 2 equal values); the median's standard
        # error is 1.2533 x the deviation / sqrt(n)
        q1, q3 = np.percentile(logs, [25, 75])
        spread = max(1.4826 * float(np.median(np.abs(logs - center))), float(q3 - q1) / 1.349)
        decided = abs(center - math.log(threshold)) > 3 * 1.2533 * spread / math.sqrt(n)
        spent = n >= 3 * rounds and time.perf_counter() >= deadline
        if far or decided or spent or n >= 200:
            runtime.release_arena(quant, feed)
            return float(np.median(tq)) * 1e3, float(np.median(tb)) * 1e3, ratio


def latency_guard(
    build: CandidateBuilder,
    graph: gs.Graph,
    excluded: frozenset[int],
    gains: dict[int, float],
    feed: dict[str, np.ndarray],
    workdir: Path,
    report: GuardReport,
    max_ratio: float = 1.0,
    max_tries: int = 4,
) -> frozenset[int] | None:
    """Exclusions that make the quantized graph faster than `graph`; None if none does.

    The layers that int8 speeds up least go back to float first: every layer the probe found
    slower in int8 at once, then a quarter of the rest at a time, while that still helps (a
    drop that leaves the ratio no lower ends the search)."""
    files = build.files(workdir)
    base = latency(graph, files, "latency_float")
    current = excluded
    candidates = sorted((k for k in gains if k not in excluded), key=lambda k: (gains[k], k))
    slower = [k for k in candidates if gains[k] <= 0]
    probed_slower = sum(gains[k] for k in candidates) <= 0 and 0 < len(slower) < len(candidates)
    if probed_slower:  # the probe already shows int8 as a whole is slower: skip that timing
        current = current | frozenset(slower)
    previous = float("inf")
    for tried in range(max_tries + 1):
        quant = latency(build(current), files, "latency_quant")
        q, b, ratio = timed_ratio(quant, base, feed, max_ratio)
        report.latency = {
            "float_ms": round(b, 4),
            "quantized_ms": round(q, 4),
            "ratio": round(ratio, 3),
            "threads": 1,
        }
        if ratio <= max_ratio:
            return current
        remaining = [k for k in candidates if k not in current]
        slower = [k for k in remaining if gains[k] <= 0]
        first = tried == 0 and not probed_slower
        # a quarter of what is still int8 (of every layer, after the slower ones went back at
        # once on the detector, it was 15 of the 17 left: the retry had nothing to time)
        step = max(1, len(remaining) // 4)
        drop = slower if first and 0 < len(slower) < len(remaining) else remaining[:step]
        if tried == max_tries or len(drop) >= len(remaining) or ratio >= previous:
            break
        previous = ratio
        current = current | frozenset(drop)
    report.gave_up = (
        f"the quantized model was not faster than float ({ratio:.2f}x at 1 thread, "
        f"{max_ratio:g}x needed); left in float"
    )
    return None


def _kept_for_latency(
    report: GuardReport,
    new: frozenset[int],
    gains: dict[int, float],
    describe: Callable[[int], dict[str, Any]],
) -> None:
    for k in sorted(new):
        report.kept_float.append(
            {
                **describe(k),
                "int8_saves_ms": round(gains[k], 4),
                "reason": "returned to float by the latency guard",
            }
        )


class CandidateBuilder:
    """Materialises the plan on a copy of the float graph, minus some layers (by node index).

    Calibration happened once on the float graph; activation parameters are keyed by tensor
    name and the copy keeps every name and the node order, so any subset costs one
    materialise and no new calibration.
    """

    def __init__(
        self,
        graph: gs.Graph,
        targets: Sequence[gs.Node],
        opts: PlanOptions,
        act_qparams: dict[str, qk.QParams],
        means: dict[int, np.ndarray],
        wcfg: WeightConfig,
        weight_choice: str,
    ) -> None:
        index = {id(n): i for i, n in enumerate(graph.nodes)}
        self.graph = graph
        self.target_idx = [index[id(t)] for t in targets]
        self.opts = opts
        self.act_qparams = act_qparams
        self.means = {index[k]: v for k, v in means.items() if k in index}
        self.wcfg = wcfg
        self.weight_choice = weight_choice
        self._full: gs.Graph | None = None
        self._files: ModelFiles | None = None
        self._made: weakref.WeakValueDictionary[int, gs.Graph] = weakref.WeakValueDictionary()

    def files(self, workdir: Path) -> ModelFiles:
        """The guard run's exported models (the float graph and the full candidate kept)."""
        if self._files is None or self._files.workdir != workdir:
            self._files = ModelFiles(workdir, in_order=self.made)
            self._files.keep(self.graph)
        return self._files

    def made(self, graph: gs.Graph) -> bool:
        """Whether `graph` is a candidate this builder made (clean and in order)."""
        return self._made.get(id(graph)) is graph

    def __call__(self, excluded: frozenset[int]) -> gs.Graph:
        if not excluded and self._full is not None:
            return self._full  # built once: the probe and both guards run it
        copy = self.graph.copy()
        raise_opset(copy, max(13, int(copy.opset or 1)), edit.NameScope(copy))
        targets = [copy.nodes[i] for i in self.target_idx if i not in excluded]
        plan = make_plan(copy, targets, self.opts)
        dtypes = weight_dtypes(plan, self.act_qparams, self.weight_choice)
        means = {id(copy.nodes[i]): m for i, m in self.means.items()}
        materialise(copy, plan, self.act_qparams, edit.NameScope(copy), self.wcfg, dtypes, means)
        copy.cleanup(remove_unused_graph_inputs=False).toposort()
        self._made[id(copy)] = copy
        if not excluded:
            self._full = copy
            if self._files is not None:
                self._files.keep(copy)
        return copy


def layer_gains(
    build: CandidateBuilder, layers: dict[int, gs.Node], feed: dict[str, np.ndarray], workdir: Path
) -> tuple[dict[int, float], float]:
    """Milliseconds int8 saves on each layer at one thread: the float time minus the int8 time
    of the layer's kernels and of those around it (its activation, its Q/DQ pairs: see
    `qdq_probe.regions`), from onnxruntime's profiler on the float graph and on the fully
    quantized candidate. Layers the profiler does not name (fused under another name) get
    the measured time per multiply-accumulate of the others. Also returns the candidate's
    total kernel time over the float graph's (what no layer is charged for included)."""
    if not layers:
        return {}, 1.0
    files = build.files(workdir)
    with (
        files.exported(build.graph, "probe_float") as float_model,
        files.exported(build(frozenset()), "probe_quant") as quant_model,
    ):
        times = qdq_probe.paired_node_times([float_model, quant_model], feed, workdir)
    t_float, t_quant = (qdq_probe.layer_times(t, layers, build.graph) for t in times)
    total_float, total_quant = (sum(t.values()) for t in times)
    ratio = total_quant / total_float if total_float > 0 else 1.0
    macs = {k: layer_macs(n) for k, n in layers.items()}
    gains = {k: t_float[k] - t_quant[k] for k in layers if k in t_float and k in t_quant}
    measured_macs = sum(macs[k] for k in gains)
    per_mac = sum(gains.values()) / measured_macs if measured_macs > 0 else 0.0
    return {k: gains.get(k, per_mac * macs[k]) for k in layers}, ratio


def layer_macs(node: gs.Node) -> float:
    """Multiply-accumulates of a linear layer per sample, from static shapes when known."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    weight = float(np.prod(w.shape)) if w is not None and w.shape else 1.0
    y = node.outputs[0]
    dims = [d for d in (y.shape or []) if isinstance(d, int)]
    if node.op in ("Conv", "ConvTranspose"):
        return weight * float(np.prod(dims[2:])) if len(dims) > 2 else weight
    return weight * (float(np.prod(dims[1:-1])) if len(dims) > 2 else 1.0)


@dataclass
class GuardOutcome:
    """Layers (node indices) to keep in float, or None to leave the model unquantized; `gains`
    are the probe's milliseconds saved per layer (empty when latency was not probed)."""

    excluded: frozenset[int] | None
    report: GuardReport
    gains: dict[int, float] = field(default_factory=dict)


def latency_gate(
    build: CandidateBuilder,
    anchors: Sequence[gs.Node],
    feed: dict[str, np.ndarray],
    tolerance: Tolerance,
    workdir: Path,
    max_ratio: float = 1.0,
) -> GuardOutcome:
    """Probe and latency guard alone: which layers int8 must leave in float to beat float.

    Speed does not depend on the calibrated ranges, so this runs on a candidate calibrated
    on one sample, before the full calibration is paid for (a model int8 cannot make faster
    is left in float at a fraction of the cost)."""
    graph = build.graph
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    report = GuardReport(tolerance=tolerance.to_dict())
    by_index = {index[id(a)]: a for a in anchors}
    gains, ratio = layer_gains(build, by_index, feed, workdir)
    if gains:
        report.probe = {
            "layers_timed": len(gains),
            "int8_slower": sum(g <= 0 for g in gains.values()),
            "saved_ms": round(sum(gains.values()), 3),
            "kernel_time_ratio": round(ratio, 3),
        }
        if ratio > max_ratio and all(g <= 0 for g in gains.values()):
            # slower on every layer and as a whole: no subset to time
            report.gave_up = (
                f"int8 was not faster than float on any layer in onnxruntime's profile "
                f"({ratio:.2f}x overall at 1 thread, {max_ratio:g}x needed); left in float"
            )
            return GuardOutcome(None, report, gains)
    first = latency_guard(build, graph, frozenset(), gains, feed, workdir, report, max_ratio)
    if first is not None:
        _kept_for_latency(report, first, gains, functools.partial(_describe, graph))
    return GuardOutcome(first, report, gains)


def _below_resolution(
    more: frozenset[int], gains: dict[int, float], report: GuardReport
) -> bool:
    """Whether returning `more` to float cannot move the timed ratio measurably: what the probe
    says int8 saves on them is under 1% of the float time (timing the candidate again would
    take 15 pairs near the threshold, 4 s on a 100 ms model, to measure noise). Only what int8
    saves counts: layers it made slower do not offset it (their probe readings are as noisy)."""
    float_ms = float(report.latency.get("float_ms", 0.0))
    saved = sum(max(gains.get(k, 0.0), 0.0) for k in more)
    return bool(more) and bool(gains) and float_ms > 0 and saved < 0.01 * float_ms


def _describe(graph: gs.Graph, k: int) -> dict[str, Any]:
    """How reports name layer `k` (a node index)."""
    return {"node": graph.nodes[k].name, "op": graph.nodes[k].op}


def run_guard(
    mode: str,
    build: CandidateBuilder,
    anchors: Sequence[gs.Node],
    feeds: Sequence[dict[str, np.ndarray]],
    tolerance: Tolerance,
    workdir: Path,
    max_ratio: float = 1.0,
    start: GuardOutcome | None = None,
    recheck_latency: bool = False,
    reference: list[list[Any]] | None = None,
) -> GuardOutcome:
    """Latency, accuracy, latency again, as `mode` asks ("accuracy", "latency" or "both").

    Speed is checked first because it is cheap (one build, one timing) and decisive: a model
    int8 cannot make faster is left in float before any accuracy search is paid for. `start`
    is a `latency_gate` outcome already measured (on a quickly calibrated candidate): its
    exclusions and probe are reused; `recheck_latency` times the final candidate even when
    the accuracy guard returned no layer to float (the candidate changed since the gate).
    `reference`: the original's outputs on `feeds` (see `Evaluator`)."""
    graph = build.graph
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    layers = {index[id(a)]: (a.inputs[0].name, a.outputs[0].name) for a in anchors}

    describe = functools.partial(_describe, graph)
    # the probe times this machine: only the modes that care about latency use it, so that
    # "accuracy" decides from the samples alone (reproducible byte for byte)
    timed = mode in ("latency", "both") and bool(feeds)
    feed = dict(feeds[0]) if feeds else {}
    if start is None and timed:
        start = latency_gate(build, anchors, feed, tolerance, workdir, max_ratio)
    report = start.report if start is not None else GuardReport(tolerance=tolerance.to_dict())
    gains = start.gains if start is not None else {}
    if start is not None and start.excluded is None:
        return GuardOutcome(None, report, gains)
    excluded: frozenset[int] = (
        start.excluded if start is not None and start.excluded is not None else frozenset()
    )
    if mode in ("accuracy", "both"):
        evaluator = Evaluator(
            graph, feeds, workdir, tolerance, files=build.files(workdir), reference=reference
        )
        rest = {k: v for k, v in layers.items() if k not in excluded}
        pre = excluded

        def build_rest(more: frozenset[int]) -> gs.Graph:
            return build(more | pre)

        more = accuracy_guard(build_rest, evaluator, rest, describe, report, gains)
        if report.gave_up:
            return GuardOutcome(None, report)
        excluded = excluded | more
        if timed and not recheck_latency and _below_resolution(more, gains, report):
            report.latency["not_retimed"] = (
                "the layers returned to float save under 1% of the float time in the probe"
            )
        elif timed and (more or recheck_latency):  # still faster than float?
            final = latency_guard(build, graph, excluded, gains, feed, workdir, report, max_ratio)
            if final is None:
                return GuardOutcome(None, report)
            # float is not always closer: a layer back in float changes its neighbours' Q/DQ
            if final != excluded and (broken := evaluator.failures(build(final))):
                report.gave_up = (
                    "no layer set is both within the tolerance and faster than float "
                    f"({'; '.join(broken)}); left in float"
                )
                report.final_failures = broken
                return GuardOutcome(None, report)
            _kept_for_latency(report, final - excluded, gains, describe)
            excluded = final
    return GuardOutcome(excluded, report, gains)
