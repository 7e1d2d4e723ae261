"""Dataset mixing: how many records of each dataset the training split holds.

``dataset.weights`` gives each entry of ``dataset.names`` a share of the training records (``dataset.mix_by=records``)
or of the training tokens (``mix_by=tokens``); ``dataset.mix_size`` says how big the mix is:

* ``under`` (the default): the largest mix that repeats no record. The dataset that runs out first is used whole,
  the others are down-sampled to their share;
* ``over``: the smallest mix that uses every record. The dataset that needs it most is used whole (once), the
  others are repeated (up-sampled) to their share;
* ``N`` (e.g. ``20000``): N records (``mix_by=records``) or N tokens (``mix_by=tokens``);
* ``Nx`` (e.g. ``2x``, ``0.5x``): N times what is available, i.e. N epochs of the unmixed data, re-weighted.

Without weights every dataset keeps its natural share, so ``under`` and ``over`` are the plain concatenation
(every record once, nothing mixed) and ``N``/``Nx`` scale all datasets alike.

A dataset that needs ``k.f`` times its records gets ``k`` full copies plus a random ``f`` of them, drawn from
``(train.seed, dataset name)`` and its count alone: the mix is the same on every run and for every world size (it is
built in the launcher, before packing), and a dataset's draw does not change when another dataset's weight does.
Counts are exact (largest remainder rounding); by tokens, each dataset's share is met to within one record. The mix is built from the training
split only: the records ``dataset.val_size`` holds out are taken first, so no repeated record is both trained and
evaluated.

LLaMA-Factory's spelling is accepted and translated (``dataset.mix_strategy``, ``dataset.interleave_probs``):

=====================================================  ===============================================
LLaMA-Factory                                          here
=====================================================  ===============================================
``mix_strategy: concat`` (its default)                 nothing (every record once)
``interleave_under`` + ``interleave_probs: a,b,c``     ``dataset.weights=[a,b,c] dataset.mix_size=under``
``interleave_over`` + ``interleave_probs: a,b,c``      ``dataset.weights=[a,b,c] dataset.mix_size=over``
``interleave_under``/``over`` without probs            ``dataset.weights=[1,1,...]`` (it alternates them)
``interleave_once``                                    nothing (every record once, in another order)
=====================================================  ===============================================

LLaMA-Factory draws the source of each record at random (shares hold in expectation, the stopping point varies) and
splits off ``val_size`` after mixing; here the counts are exact and the held-out records are never repeated.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # the config imports this module for its checks
    from launcher.config import DatasetConfig

MIX_BY = ("records", "tokens")
LF_STRATEGIES = ("concat", "interleave_under", "interleave_over", "interleave_once")
_MULTIPLE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)x$")


class MixError(ValueError):
    """A mix that cannot be built from the data at hand (e.g. a weighted dataset with no usable record)."""


@dataclass(frozen=True)
class MixSpec:
    """The resolved mix: ``weights`` empty means natural shares."""

    weights: tuple[float, ...] = ()
    by: str = "records"
    size: str = "under"

    @property
    def identity(self) -> bool:
        """Every record exactly once: nothing to do."""
        return not self.weights and self.size in ("under", "over")

    def key(self) -> str:
        """Canonical text for the preparation cache key (all identity mixes are the same)."""
        return "concat" if self.identity else f"weights={list(self.weights)};by={self.by};size={self.size}"

    def describe(self) -> str:
        if self.identity:
            return "every record once"
        shares = "natural shares" if not self.weights else \
            "weights " + "/".join(f"{w / sum(self.weights):.3g}" for w in self.weights)
        return f"{shares} of the {self.by}, size {self.size}"


def parse_size(size: str) -> tuple[str, float]:
    """``under``/``over`` -> (that, 0); ``2x`` -> ("times", 2.0); ``20000`` -> ("count", 20000). ValueError else."""
    text = str(size).strip()
    if text in ("under", "over"):
        return text, 0.0
    if _MULTIPLE.match(text) and float(text[:-1]) > 0:
        return "times", float(text[:-1])
    if text.isdigit() and int(text) > 0:
        return "count", float(int(text))
    raise ValueError(text)


def _lf_probs(value: Any) -> list[float]:
    """LLaMA-Factory's ``interleave_probs``: "0.6,0.3,0.1" (its own format) or a list."""
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, (int, float)) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(value)
    return [float(x) for x in items]


def problems(d: DatasetConfig) -> list[str]:
    """Every mistake in the mix settings of ``d``, each naming the key and the fix (for launcher.validate)."""
    e: list[str] = []
    lf = d.mix_strategy is not None or d.interleave_probs is not None
    if d.mix_by not in MIX_BY:
        e.append(f"dataset.mix_by={d.mix_by!r} is not one of {', '.join(MIX_BY)}.")
    if d.mix_size is not None:
        try:
            parse_size(d.mix_size)
        except ValueError:
            e.append(f"dataset.mix_size={d.mix_size!r} is not a size: use under (repeat nothing), over (use every "
                     f"record), a count (e.g. 20000 records, or tokens with mix_by=tokens) or a multiple (e.g. 2x).")
    if lf and (d.weights or d.mix_size is not None):
        e.append("dataset.mix_strategy/interleave_probs (LLaMA-Factory's spelling) and dataset.weights/mix_size say "
                 "the same thing: keep one (see the table in README, 'Mixing datasets').")
        return e
    key, weights = "dataset.weights", list(d.weights)
    if lf:
        if d.mix_strategy is not None and d.mix_strategy not in LF_STRATEGIES:
            return e + [f"dataset.mix_strategy={d.mix_strategy!r} is not one of {', '.join(LF_STRATEGIES)}."]
        if d.interleave_probs is None:
            return e
        if d.mix_strategy in (None, "concat", "interleave_once"):
            return e + [f"dataset.interleave_probs is given but dataset.mix_strategy="
                        f"{d.mix_strategy or 'concat'} does not mix by probabilities: set dataset.mix_strategy="
                        f"interleave_under (or interleave_over), or drop interleave_probs."]
        key = "dataset.interleave_probs"
        try:
            weights = _lf_probs(d.interleave_probs)
        except (TypeError, ValueError):
            return e + [f"{key}={d.interleave_probs!r} is not a list of numbers: write it as 0.6,0.3,0.1 (YAML) or "
                        f"[0.6,0.3,0.1]."]
    if not weights:
        return e
    names = list(d.names)
    if len(weights) != len(names):
        e.append(f"{key} has {len(weights)} value(s) for the {len(names)} dataset(s) of dataset.names "
                 f"({', '.join(names)}): give one weight per name, in the same order, e.g. "
                 f"{key}=[{','.join(['1'] * len(names))}].")
    negative = [f"{w:g} for {n!r}" for n, w in zip(names, weights) if w < 0]
    if negative:
        e.append(f"{key} has negative weights ({', '.join(negative)}): a weight is a share, 0 or more.")
    elif not any(w > 0 for w in weights):
        e.append(f"{key} are all 0: give at least one dataset a positive weight.")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        e.append(f"dataset.names lists {', '.join(map(repr, twice))} more than once while {key} weighs them: name "
                 f"each dataset once and give it the sum of its weights.")
    return e


def resolve(d: DatasetConfig) -> MixSpec:
    """The mix ``d`` asks for, LLaMA-Factory's spelling translated (``d`` passed :func:`problems`)."""
    if d.mix_strategy is None and d.interleave_probs is None:
        return MixSpec(tuple(float(w) for w in d.weights), d.mix_by, str(d.mix_size or "under").strip())
    strategy = d.mix_strategy or "concat"
    if strategy in ("concat", "interleave_once"):
        return MixSpec((), d.mix_by, "under")
    weights = _lf_probs(d.interleave_probs) if d.interleave_probs is not None else [1.0] * len(d.names)
    return MixSpec(tuple(weights), d.mix_by, strategy.removeprefix("interleave_"))


# --------------------------------------------------------------------------------------------- the mix
def _largest_remainder(targets: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total``, each within 1 of its target (Hamilton's method; ties go to the first)."""
    base = np.floor(targets).astype(np.int64)
    short = total - int(base.sum())
    if short > 0:
        order = np.argsort(-(targets - base), kind="stable")
        base[order[:short]] += 1
    return base


def _draw(available: np.ndarray, amount: float, lengths: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Indices (positions in ``available``) for ``amount`` records, or tokens when ``lengths`` is given: whole
    copies of the dataset, then a random part of it."""
    n = len(available)
    total = float(lengths.sum()) if lengths is not None else float(n)
    copies = int(amount // total) if total else 0
    rest = amount - copies * total
    perm = rng.permutation(n)
    if lengths is None:
        part = perm[:int(round(rest))]
    else:  # the prefix of the permutation whose tokens come closest to the rest
        cum = np.r_[0, np.cumsum(lengths[perm])]
        m = int(np.searchsorted(cum, rest))
        m = m if m <= n and (m == 0 or cum[m] - rest <= rest - cum[m - 1]) else m - 1
        part = perm[:m]
    return np.concatenate([np.tile(np.arange(n), copies), part]).astype(np.int64)


def mix_indices(sources: np.ndarray, lengths: np.ndarray, names: Sequence[str], spec: MixSpec, seed: int
                ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Row indices of the mixed training split (sorted, repeats adjacent) and one report row per dataset:
    name, share (the asked share, None for natural), available/used records, available/used tokens.

    ``sources[i]`` is the position in ``names`` of row ``i``'s dataset, ``lengths[i]`` its tokens.
    """
    k = len(names)
    rows_of = [np.flatnonzero(sources == i) for i in range(k)]
    avail_records = np.array([len(r) for r in rows_of], dtype=np.float64)
    avail_tokens = np.array([float(lengths[r].sum()) for r in rows_of])
    avail = avail_tokens if spec.by == "tokens" else avail_records
    weights = np.array(spec.weights, dtype=np.float64) if spec.weights else avail.copy()
    if spec.identity:
        picks = list(rows_of)
    else:
        share = weights / weights.sum()
        empty = [names[i] for i in range(k) if share[i] > 0 and avail[i] == 0]
        if empty:
            raise MixError(f"dataset(s) {', '.join(map(repr, empty))} in dataset.names have a weight but no training "
                           f"record left once bad or over-long records are dropped and dataset.val_size is held out: "
                           f"fix their records (python -m launcher.inspect_data shows what was dropped and why), or "
                           f"give them weight 0.")
        kind, value = parse_size(spec.size)
        pos = share > 0
        if kind == "under":
            total = float(np.min(avail[pos] / share[pos]))
        elif kind == "over":
            total = float(np.max(avail[pos] / share[pos]))
        else:
            total = value if kind == "count" else value * float(avail.sum())
        targets = share * total
        if spec.by == "records":
            targets = _largest_remainder(targets, int(np.floor(total + 0.5))).astype(np.float64)
            if kind == "under":  # float noise must never ask for a repeat, nor "over" for less than all
                targets = np.minimum(targets, avail)
            elif kind == "over":
                targets = np.maximum(targets, np.where(pos, avail, 0))
        picks = []
        for i in range(k):
            rng = np.random.default_rng([seed, zlib.crc32(names[i].encode())])
            local = _draw(rows_of[i], targets[i], lengths[rows_of[i]] if spec.by == "tokens" else None, rng)
            picks.append(rows_of[i][local])
    indices = np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)
    report = [{"name": names[i], "share": (float(spec.weights[i] / sum(spec.weights)) if spec.weights else None),
               "available": int(avail_records[i]), "used": int(len(picks[i])),
               "available_tokens": int(avail_tokens[i]), "tokens": int(lengths[picks[i]].sum())} for i in range(k)]
    if len(indices) == 0:
        raise MixError(f"the mix ({spec.describe()}) holds no record: raise dataset.mix_size.")
    return indices, report


def mix_split(train: Any, names: Sequence[str], spec: MixSpec, seed: int) -> tuple[Any, dict[str, Any]]:
    """The training split (a ``datasets.Dataset`` with ``source`` and ``length`` columns) mixed as ``spec`` says,
    and the report for DataStats.mix."""
    cols = train.select_columns(["source", "length"]).with_format("numpy")[:]
    indices, rows = mix_indices(np.asarray(cols["source"]), np.asarray(cols["length"], dtype=np.int64), names,
                                spec, seed)
    mixed = train if spec.identity else train.select(indices)
    return mixed, {"mixed": not spec.identity, "describe": spec.describe(), "datasets": rows}


def mix_table(mix: dict[str, Any]) -> list[str]:
    """The per-dataset lines of the data report: records available/used, repeats, token share."""
    rows = mix.get("datasets") or []
    if len(rows) < 2 and not mix.get("mixed"):
        return []
    total = sum(r["tokens"] for r in rows) or 1
    width = max(7, *(len(r["name"]) for r in rows))
    lines = [f"mix ({mix['describe']}); repeats = used / available:",
             f"  {'dataset':<{width}}  weight  available     used  repeats       tokens  token share"]
    for r in rows:
        share = "-" if r["share"] is None else f"{r['share']:.1%}"
        repeats = r["used"] / r["available"] if r["available"] else 0.0
        lines.append(f"  {r['name']:<{width}}  {share:>6}  {r['available']:>9,}  {r['used']:>7,}  {repeats:>6.2f}×  "
                     f"{r['tokens']:>11,}  {r['tokens'] / total:>10.1%}")
    return lines
