"""LowRA (methods.md §4): learned per-channel codebooks and mixed 1/2/3/4-bit rows under an average budget.

Data-free. For every target Linear ``W (out, in)``:

1. block normalisation: ``a`` = absmax of each block of ``block_size`` columns (fp16, rounded up), ``u = w / a``;
2. for every channel group (``channel_group`` consecutive rows) and every candidate width ``b``, a weighted
   Lloyd–Max fit of ``2**b`` levels to the group's ``u`` with weights ``ω = a²`` (so the fitted error is the
   squared error of ``W`` itself), initialised from the NF-b codebook; the error ``E[group, b]`` is kept;
   with ``scale_search="mse"`` (default) each block's scale is then searched among ``p·a`` (clipping) for the
   least error with that codebook, and the codebook is refitted once to the new scales;
3. one global precision assignment over all layers (:mod:`.precision`) that meets the average code-bit
   ``budget`` and minimises ``Σ E``;
4. codes = nearest level of each row's codebook; stored as a :class:`~lowbit.qmixed.MixedCodebookWeight`.

Step 2's weights can include the Hessian diagonal (``hessian_weighted``; needs calibration): then the error
being minimised is ``Σ a²·diag(H)_j (u − m)²``, an estimate of the layer's output error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import StepConfig
from ..errors import LowbitError
from ..formats.base import as_storage_scale
from ..formats.codebook import normal_float_levels
from ..memory import trim_heap
from ..models import DECODER
from ..qmixed import WIDTHS, MixedCodebookWeight, block_absmax
from ..qtensor import check_group_size, padded_groups
from ..registry import register
from .base import Step, install, select_targets
from .precision import assign_widths, check_budget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowRAConfig(StepConfig):
    """LowRA: learned codebooks, per-row widths from ``widths``, average code bits ≤ ``budget``."""

    step = "lowra"
    budget: float = 2.0  # average code bits per weight over all target layers (scales/codebooks not counted)
    widths: tuple[int, ...] = WIDTHS  # candidate widths per channel group
    block_size: int = 64  # input columns per absmax scale
    channel_group: int = 1  # consecutive rows sharing one width and codebook
    scope: str = "model"  # model: one budget across all layers | layer: each layer meets the budget on its own
    iters: int = 30  # Lloyd–Max iterations at most (stops early when the error settles)
    scale_search: str = "mse"  # mse: per block, the clipped scale of least (weighted) error | none: block absmax
    # (measured at b2.0, data-free: absmax 225,504 -> mse 34,944)
    targets: tuple[str, ...] = (DECODER,)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if not self.widths or not set(self.widths) <= set(WIDTHS):
            raise LowbitError(f"widths must be a non-empty subset of {WIDTHS}, got {self.widths!r}")
        object.__setattr__(self, "widths", tuple(sorted(set(self.widths))))
        check_budget(self.budget, self.widths)
        check_group_size(self.block_size)
        if self.scope not in ("model", "layer"):
            raise LowbitError(f"scope must be 'model' or 'layer', got {self.scope!r}")
        if not isinstance(self.channel_group, int) or self.channel_group < 1:
            raise LowbitError(f"channel_group must be a positive integer, got {self.channel_group!r}")
        if self.iters < 1:
            raise LowbitError(f"iters must be at least 1, got {self.iters!r}")
        if self.scale_search not in ("none", "mse"):
            raise LowbitError(f"scale_search must be 'none' or 'mse', got {self.scale_search!r}")


    def describe(self) -> str:
        widths = "/".join(map(str, self.widths))
        return f"{self.step}(avg {self.budget} bits, widths {widths}, block {self.block_size}, scope {self.scope})"


def initial_levels(bits: int, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Starting codebook ``(groups, 2**bits)``: NF-b, or for 1 bit the weighted means of each sign."""
    if bits == 1:
        pos = ((u > 0) * weight * u).sum(1) / ((u > 0) * weight).sum(1).clamp(min=1e-30)
        neg = ((u <= 0) * weight * u).sum(1) / ((u <= 0) * weight).sum(1).clamp(min=1e-30)
        return torch.stack([neg.clamp(max=0) - 1e-4, pos.clamp(min=0) + 1e-4], dim=1)
    return normal_float_levels(bits).to(u.device).expand(u.shape[0], -1).clone()


def nearest(levels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``levels (G, K)`` for each of ``u (G, N)`` (int64 ``(G, N)``)."""
    thresholds = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
    return torch.searchsorted(thresholds, u.contiguous())


class SortedGroups:
    """Each group's values sorted once, with prefix sums of ``ω``, ``ωu`` and ``ωu²`` (fp64), so one Lloyd step
    costs ``O(G·K·log N)`` instead of ``O(G·N)``: the values between two thresholds are a contiguous run.

    Ties follow :func:`nearest`: a value equal to a threshold belongs to the lower level.
    """

    def __init__(self, u: torch.Tensor, weight: torch.Tensor):
        order = u.argsort(dim=1)
        self.u = u.gather(1, order).contiguous()
        w = weight.gather(1, order).double()
        ud = self.u.double()
        zero = torch.zeros(u.shape[0], 1, dtype=torch.float64)
        self.s0 = torch.cat([zero, w.cumsum(1)], dim=1)
        self.s1 = torch.cat([zero, (w * ud).cumsum(1)], dim=1)
        self.s2 = torch.cat([zero, (w * ud * ud).cumsum(1)], dim=1)

    def bin_sums(self, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Σω``, ``Σωu``, ``Σωu²`` ``(G, K)`` over the values nearest to each of ``levels (G, K)``."""
        thresholds = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
        cut = torch.searchsorted(self.u, thresholds, right=True)  # values <= threshold go to the lower level
        n = self.u.shape[1]
        edges = torch.cat([torch.zeros_like(cut[:, :1]), cut, torch.full_like(cut[:, :1], n)], dim=1)
        lo, hi = edges[:, :-1], edges[:, 1:]
        return tuple(s.gather(1, hi) - s.gather(1, lo) for s in (self.s0, self.s1, self.s2))

    def error(self, levels: torch.Tensor) -> torch.Tensor:
        """``Σ ω (u − m_nearest)²`` per group (fp64)."""
        c0, c1, c2 = self.bin_sums(levels)
        m = levels.double()
        return (c2 - 2 * m * c1 + m * m * c0).sum(1).clamp(min=0)


def lloyd_fit(u: torch.Tensor, weight: torch.Tensor, bits: int, iters: int = 30, tol: float = 1e-6,
              groups: SortedGroups | None = None, init: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Lloyd–Max codebooks for each row of ``u``.

    Args:
        u: ``(G, N)`` normalised values of each group.
        weight: ``(G, N)`` non-negative weights ω.
        groups: ``SortedGroups(u, weight)`` when the caller fits several widths (it is built otherwise).
        init: starting levels ``(G, 2**bits)`` (default: :func:`initial_levels`).
    Returns:
        ``levels (G, 2**bits)`` sorted, fp16-representable (as stored), and ``error (G,)`` = ``Σ ω (u − m)²``
        of nearest-level encoding with those stored levels.
    """
    groups = groups or SortedGroups(u, weight)
    levels = (initial_levels(bits, u, weight) if init is None else init).double()
    prev = None
    for _ in range(iters):
        c0, c1, _ = groups.bin_sums(levels)
        levels = torch.where(c0 > 0, c1 / c0.clamp(min=1e-300), levels).sort(dim=1).values
        err = float(groups.error(levels).sum())
        if prev is not None and prev - err <= tol * max(prev, 1e-30):
            break
        prev = err
    levels = levels.to(torch.float16).float().sort(dim=1).values
    return levels, groups.error(levels).float()


@dataclass
class LayerFit:
    """Everything LowRA learned for one layer before widths are chosen."""

    scales: dict[int, torch.Tensor]  # width -> (out, blocks) fp16-representable block scales
    levels: dict[int, torch.Tensor]  # width -> (groups, 2**b)
    errors: torch.Tensor  # (groups, len(widths))
    group_rows: int  # rows per channel group

    def row_scales(self, row_width: torch.Tensor) -> torch.Tensor:
        """Block scales ``(out, blocks)`` of each row at its chosen width ``row_width (out,)``."""
        out = torch.empty_like(next(iter(self.scales.values())))
        for b, s in self.scales.items():
            rows = row_width == b
            out[rows] = s[rows]
        return out


def normalise(w: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(absmax (out, blocks), u (out, in), a² (out, in))`` for ``w (out, in)``."""
    out_f, in_f = w.shape
    absmax = block_absmax(w, block_size)
    a = absmax.unsqueeze(-1).expand(-1, -1, block_size).reshape(out_f, -1)[:, :in_f]
    u = w.float() / a
    return absmax, u, a * a


SCALE_GRID = tuple(1.0 - 0.02 * i for i in range(16))  # block-scale shrink factors tried by scale_search="mse"


def search_block_scales(w: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, col_weight: torch.Tensor,
                        block_size: int, grid: tuple[float, ...] = SCALE_GRID) -> torch.Tensor:
    """Per block, the scale ``p·absmax`` (``p`` in ``grid``, fp16-representable) whose nearest-level encoding
    with the row's codebook ``levels (out, K)`` has the least ``Σ_j col_weight_j (w − a·m)²``.

    Args: ``w (out, in)``, ``absmax (out, blocks)``, ``col_weight (in,)``. Returns scales ``(out, blocks)``.
    """
    out_f, in_f = w.shape
    wb = padded_groups(w.float(), block_size)  # (out, blocks, bs)
    cw = padded_groups(col_weight.float().reshape(1, -1), block_size)  # (1, blocks, bs), zero padding
    thresholds = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()
    best, best_err = absmax.clone(), torch.full_like(absmax, float("inf"))
    for p in grid:
        a = as_storage_scale(absmax * p)
        u = (wb / a.unsqueeze(-1)).reshape(out_f, -1).contiguous()
        m = torch.gather(levels, 1, torch.searchsorted(thresholds, u)).reshape(wb.shape)
        err = ((wb - m * a.unsqueeze(-1)) ** 2 * cw).sum(-1)
        better = err < best_err
        best = torch.where(better, a, best)
        best_err = torch.where(better, err, best_err)
    return best


def fit_layer(w: torch.Tensor, config: LowRAConfig, col_weight: torch.Tensor | None = None) -> LayerFit:
    """Codebooks, block scales and errors of ``w (out, in)`` at every candidate width (``col_weight (in,)``
    optional). With ``scale_search="mse"``, each width's block scales are searched for its fitted codebooks
    (:func:`search_block_scales`) and the codebooks refitted once to the new scales."""
    out_f, in_f = w.shape
    c = config.channel_group
    if out_f % c:
        raise LowbitError(f"channel_group={c} does not divide the layer's {out_f} output rows; use a divisor")
    absmax, u, a2 = normalise(w, config.block_size)
    cw = torch.ones(in_f) if col_weight is None else col_weight.float().clamp(min=0)
    omega = a2 * cw.unsqueeze(0)
    ug, omega = u.reshape(out_f // c, c * in_f), omega.reshape(out_f // c, c * in_f)
    levels, errors, scales = {}, [], {}
    groups = SortedGroups(ug, omega)
    for b in config.widths:
        levels[b], e = lloyd_fit(ug, omega, b, config.iters, groups=groups)
        scales[b] = absmax
        if config.scale_search == "mse":
            scales[b] = search_block_scales(w, absmax, levels[b].repeat_interleave(c, dim=0), cw, config.block_size)
            a = scales[b].repeat_interleave(config.block_size, dim=1)[:, :in_f]
            ub, wt = (w.float() / a).reshape(out_f // c, -1), (a * a * cw).reshape(out_f // c, -1)
            levels[b], e = lloyd_fit(ub, wt, b, config.iters, init=levels[b])
        errors.append(e)
    return LayerFit(scales, levels, torch.stack(errors, dim=1), c)


def encode_layer(w: torch.Tensor, fit: LayerFit, choice: torch.Tensor, widths: tuple[int, ...],
                 block_size: int) -> MixedCodebookWeight:
    """Codes of ``w`` with each group's chosen width (``choice`` indexes ``widths``) -> mixed packed weight."""
    out_f, in_f = w.shape
    row_width = torch.tensor(widths)[choice].repeat_interleave(fit.group_rows)
    scales = fit.row_scales(row_width)
    u = w.float() / scales.repeat_interleave(block_size, dim=1)[:, :in_f]
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    books = {}
    for b in widths:
        rows = (row_width == b).nonzero().squeeze(1)
        book = fit.levels[b].repeat_interleave(fit.group_rows, dim=0)  # (out, 2**b)
        books[b] = book
        if rows.numel():
            codes[rows] = nearest(book[rows], u[rows]).to(torch.uint8)
    return MixedCodebookWeight.from_rows(codes, row_width, books, scales, block_size)


@register("step", "lowra")
class LowRA(Step):
    Config = LowRAConfig

    def fit(self, name: str, weight: torch.Tensor, col_weight: torch.Tensor | None = None) -> LayerFit:
        return fit_layer(weight, self.config, col_weight)

    def apply(self, model: nn.Module, calib=None) -> nn.Module:
        c: LowRAConfig = self.config
        targets = select_targets(model, c.targets, c.ignore)
        fits = {}
        for t in tqdm(targets, desc=f"lowra fit b{c.budget}", unit="layer", leave=False):
            fits[t.name] = self.fit(t.name, t.weight())
            trim_heap()  # the fit's sorted copies are many times the layer: keep the heap from growing
        choices = self.assign(fits, {t.name: t.columns for t in targets})
        for t in targets:
            install(model, t, encode_layer(t.weight(), fits[t.name], choices[t.name], c.widths, c.block_size))
            trim_heap()  # the float weight just replaced
        return model

    def assign(self, fits: dict[str, LayerFit], columns: dict[str, int]) -> dict[str, torch.Tensor]:
        """Chosen width index per channel group of every layer (``columns``: each layer's packed input columns),
        within the budget (model- or layer-wide)."""
        c: LowRAConfig = self.config

        def sizes(name):
            f = fits[name]
            return torch.full((f.errors.shape[0],), f.group_rows * columns[name])

        if c.scope == "layer":
            return {n: assign_widths(f.errors, sizes(n), c.widths, c.budget) for n, f in fits.items()}
        names = list(fits)
        errors = torch.cat([fits[n].errors for n in names])
        choice = assign_widths(errors, torch.cat([sizes(n) for n in names]), c.widths, c.budget)
        bits = float((torch.tensor(c.widths)[choice] * torch.cat([sizes(n) for n in names])).sum())
        log.info("lowra: %d layers, average code bits %.4f (budget %s)", len(names),
                 bits / sum(fits[n].errors.shape[0] * fits[n].group_rows * columns[n] for n in names),
                 c.budget)
        out, start = {}, 0
        for n in names:
            k = fits[n].errors.shape[0]
            out[n] = choice[start:start + k]
            start += k
        return out

