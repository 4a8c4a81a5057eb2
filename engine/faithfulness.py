"""Faithfulness of explanation maps: does the model's answer live where the map points?

    predict = lambda x: runtime.run(x, maps=False)[0]        # images -> probabilities (N, C)
    classes = meta.predicted_indices(predict(images))        # the explained class per image
    curves = deletion_insertion(images, maps, classes, predict, steps=10)
    morf, lerf = road(images, maps, classes, predict, rng=np.random.default_rng(0))
    top = keep_top_vs_random(images, maps, classes, predict, rng=np.random.default_rng(0))

Every function takes a batch of photos (N, H, W, 3) RGB 0-255, their maps (N, h, w) on any
grid (upsampled here, bilinear), the class each map explains, and ``predict``, any function
"images -> probabilities": so any runtime can be scored. Each perturbation step is ONE call of
``predict`` on the whole batch. Pure numpy (plus scipy's sparse solver for the imputation).

The tests, all on the probability of the explained class:

- **Deletion / insertion** (Petsiuk et al. 2018, RISE): remove (deletion) or add back
  (insertion) the pixels in map order, most relevant first, in ``steps`` equal steps. Removed
  pixels are filled with a heavily **blurred copy** of the photo (the insertion canvas too): it
  keeps the photo's colours and rough layout, so the curve measures the loss of the detail the
  map points at rather than the shock of flat or black patches (which themselves push the model
  out of its training distribution). Deletion area: lower is better; insertion: higher.
- **ROAD** (Rong et al. 2022): remove the most (MoRF) or the least (LeRF) relevant fractions of
  the pixels and fill them by **noisy linear imputation** (each removed pixel the weighted mean
  of its 8 neighbours, solved as one sparse linear system, plus a little noise), which leaves no
  edge or flat patch that betrays the removed region's shape. A faithful map: MoRF falls fast,
  LeRF stays high; the score is the mean gap LeRF - MoRF (higher is better).
- **Keep top vs random** (issue 12's protocol, exactly): keep only the ``keep`` (20 %) share
  of pixels the bilinearly upsampled map ranks highest, the rest filled with the photo's mean
  colour (per channel), and compare with keeping ``round(keep * cells)`` random cells of a
  ``grid`` (10 of 7 x 7), same fill, ONE random draw per photo: the map wins on a photo when
  its region keeps the explained class's probability strictly higher (a tie is a loss: the
  random region "does as well"); mean drops of that probability for both. Extra, named apart:
  the same comparison against ``draws`` - 1 more random draws, averaged (``win_share``: the
  same expected value, less noise from the draw); the first draw is the protocol's.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]

#: default steps of the deletion and insertion curves (steps + 1 points, 0 % .. 100 %)
STEPS = 10
#: removed fractions of the ROAD comparison
ROAD_FRACTIONS = (0.2, 0.4, 0.6, 0.8)
#: random draws per photo in the keep-top test: the first is the protocol's, the mean over all
#: is reported beside it (same expectation, a fraction of the draw's noise)
KEEP_DRAWS = 8
#: noise of the linear imputation, in pixel values 0-255 (1 % of the range)
ROAD_NOISE = 2.55
#: the imputation is solved on a grid this many times coarser (speed; 1 = full resolution)
ROAD_SCALE = 4


# -- maps and orders ---------------------------------------------------------------------------
def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of maps (N, h, w) to (N, H, W), pixel centres aligned (like cv2/TF)."""
    maps = np.asarray(maps, np.float64)
    n, h, w = maps.shape
    H, W = size
    if (h, w) == (H, W):
        return maps.copy()

    def axis(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, src - 1), pos - lo

    y0, y1, wy = axis(h, H)
    x0, x1, wx = axis(w, W)
    rows = maps[:, y0, :] * (1 - wy)[None, :, None] + maps[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def ranking(saliency: np.ndarray) -> np.ndarray:
    """Rank of each pixel (N, H, W): 0 = most relevant; ties keep raster order (stable)."""
    n = len(saliency)
    flat = np.asarray(saliency, np.float64).reshape(n, -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None, :].repeat(n, 0), axis=1)
    return ranks.reshape(saliency.shape)


def top_mask(ranks: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` most relevant pixels (N, H, W) bool, from :func:`ranking`."""
    count = int(round(fraction * ranks[0].size))
    return ranks < count


def blur(images: np.ndarray, radius: int) -> np.ndarray:
    """Three box blurs of width ``2 radius + 1`` per axis (close to a Gaussian of sigma
    ~ radius), edges padded by replication. images (N, H, W, C)."""
    x = np.asarray(images, np.float64)
    for ax in (1, 2):
        for _ in range(3):
            pad = [(0, 0)] * x.ndim
            pad[ax] = (radius + 1, radius)
            c = np.cumsum(np.pad(x, pad, mode="edge"), axis=ax)
            hi = np.take(c, np.arange(2 * radius + 1, c.shape[ax]), axis=ax)
            lo = np.take(c, np.arange(0, c.shape[ax] - 2 * radius - 1), axis=ax)
            x = (hi - lo) / (2 * radius + 1)
    return x


def _probs_of(predict: Predict, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    probs = np.asarray(predict(np.asarray(images, np.float32)), np.float64)
    return probs[np.arange(len(classes)), classes]


def auc(curve: np.ndarray) -> np.ndarray:
    """Area under curves (N, P) sampled evenly on [0, 1] (trapezoids): (N,)."""
    curve = np.asarray(curve, np.float64)
    return (curve[..., 1:] + curve[..., :-1]).sum(axis=-1) / (2.0 * (curve.shape[-1] - 1))


# -- deletion / insertion ----------------------------------------------------------------------
class Curves(NamedTuple):
    fractions: np.ndarray  # (P,) 0 .. 1
    deletion: np.ndarray   # (N, P) probability of the explained class
    insertion: np.ndarray  # (N, P)


def deletion_insertion(images: np.ndarray, maps: np.ndarray, classes: np.ndarray,
                       predict: Predict, steps: int = STEPS, blur_radius: int | None = None
                       ) -> Curves:
    """Deletion and insertion curves; removed pixels come from :func:`blur` of the photo
    (radius: an eighth of the shorter side by default)."""
    images = np.asarray(images, np.float64)
    n, H, W, _ = images.shape
    ranks = ranking(upsample(maps, (H, W)))
    canvas = blur(images, blur_radius or max(1, min(H, W) // 8))
    fractions = np.linspace(0.0, 1.0, steps + 1)
    deletion = np.empty((n, steps + 1))
    insertion = np.empty((n, steps + 1))
    for s, f in enumerate(fractions):
        mask = top_mask(ranks, f)[..., None]
        deletion[:, s] = _probs_of(predict, np.where(mask, canvas, images), classes)
        insertion[:, s] = _probs_of(predict, np.where(mask, images, canvas), classes)
    return Curves(fractions, deletion, insertion)


# -- ROAD ----------------------------------------------------------------------------------
_NEIGHBOURS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


def linear_impute(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Fill ``removed`` pixels (H, W bool) of ``image`` (H, W, C): each the weighted mean of its
    in-image 8 neighbours (direct 1/6, diagonal 1/12, renormalised at the border), known
    neighbours fixed: one sparse linear system per image, all channels at once (ROAD)."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    image = np.asarray(image, np.float64)
    H, W, C = image.shape
    out = image.copy()
    ys, xs = np.nonzero(removed)
    m = len(ys)
    if m == 0:
        return out
    index = -np.ones((H, W), np.int64)
    index[ys, xs] = np.arange(m)
    # weight sum of in-image neighbours, for renormalisation at the borders
    total = np.zeros(m)
    for dy, dx, wgt in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        total += wgt * ((ny >= 0) & (ny < H) & (nx >= 0) & (nx < W))
    rows, cols, vals = [np.arange(m)], [np.arange(m)], [np.ones(m)]
    rhs = np.zeros((m, C))
    for dy, dx, wgt in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        k = np.flatnonzero(inside)
        j = index[ny[k], nx[k]]
        w = wgt / total[k]
        unknown = j >= 0
        rows.append(k[unknown])
        cols.append(j[unknown])
        vals.append(-w[unknown])
        known = ~unknown
        rhs[k[known]] += w[known, None] * image[ny[k[known]], nx[k[known]]]
    a = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(m, m))
    out[ys, xs] = splu(a).solve(rhs)
    return out


def coarse_linear_impute(image: np.ndarray, removed: np.ndarray, scale: int = ROAD_SCALE
                         ) -> np.ndarray:
    """:func:`linear_impute` solved on a ``scale`` times coarser grid (scale x scale block means; a
    block with any removed pixel is unknown), upsampled bilinearly into the removed pixels; the
    kept pixels stay exact. Many times faster (a 224 px photo: 56 x 56 unknowns at most at scale 4); ``scale=1`` or a size that ``scale``
    does not divide solves at full resolution."""
    H, W, C = image.shape
    if scale <= 1 or H % scale or W % scale:
        return linear_impute(image, removed)
    image = np.asarray(image, np.float64)
    blocks = image.reshape(H // scale, scale, W // scale, scale, C).mean(axis=(1, 3))
    unknown = removed.reshape(H // scale, scale, W // scale, scale).any(axis=(1, 3))
    solved = linear_impute(blocks, unknown)
    filled = np.stack([upsample(solved[None, :, :, c], (H, W))[0] for c in range(C)], axis=-1)
    return np.where(removed[..., None], filled, image)


def noisy_linear_impute(images: np.ndarray, removed: np.ndarray, rng: np.random.Generator,
                        noise: float = ROAD_NOISE, scale: int = ROAD_SCALE) -> np.ndarray:
    """:func:`coarse_linear_impute` of each image plus Gaussian noise (std ``noise``) on the
    filled pixels, clipped to 0-255."""
    out = np.stack([coarse_linear_impute(x, r, scale) for x, r in zip(images, removed)])
    out += rng.normal(0.0, noise, out.shape) * removed[..., None]
    return np.clip(out, 0.0, 255.0)


def road(images: np.ndarray, maps: np.ndarray, classes: np.ndarray, predict: Predict,
         rng: np.random.Generator, fractions: tuple[float, ...] = ROAD_FRACTIONS,
         noise: float = ROAD_NOISE, scale: int = ROAD_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """Probability of the explained class after removing the most (MoRF) and the least (LeRF)
    relevant ``fractions`` of the pixels, imputed: two arrays (N, len(fractions))."""
    images = np.asarray(images, np.float64)
    n, H, W, _ = images.shape
    ranks = ranking(upsample(maps, (H, W)))
    total = H * W
    morf = np.empty((n, len(fractions)))
    lerf = np.empty((n, len(fractions)))
    for s, f in enumerate(fractions):
        most = top_mask(ranks, f)
        least = ranks >= total - int(round(f * total))
        morf[:, s] = _probs_of(predict, noisy_linear_impute(images, most, rng, noise, scale),
                               classes)
        lerf[:, s] = _probs_of(predict, noisy_linear_impute(images, least, rng, noise, scale),
                               classes)
    return morf, lerf


# -- keep top vs random ------------------------------------------------------------------------
class KeepTop(NamedTuple):
    original: np.ndarray  # (N,) probability of the explained class on the photo
    top: np.ndarray       # (N,) ... with only the map's top ``keep`` share kept
    random: np.ndarray    # (N, D) ... with only random cells kept; [:, 0]: the protocol's draw

    @property
    def wins(self) -> np.ndarray:
        """The protocol: the map's region keeps the class strictly better than the first
        random draw (ties lose). (N,) bool."""
        return self.top > self.random[:, 0]

    @property
    def win_share(self) -> np.ndarray:
        """Share of all the random draws the map's region beats, per photo: (N,) in [0, 1]."""
        return (self.top[:, None] > self.random).mean(axis=1)


def random_cells(n: int, size: tuple[int, int], grid: tuple[int, int], keep: float,
                 rng: np.random.Generator) -> np.ndarray:
    """(n, H, W) bool: ``round(keep * cells)`` random cells of a ``grid`` over each image."""
    H, W = size
    gh, gw = grid
    cells = gh * gw
    count = int(round(keep * cells))
    chosen = np.zeros((n, cells), bool)
    for i in range(n):
        chosen[i, rng.choice(cells, count, replace=False)] = True
    cy = np.minimum(np.arange(H) * gh // H, gh - 1)
    cx = np.minimum(np.arange(W) * gw // W, gw - 1)
    return chosen.reshape(n, gh, gw)[:, cy][:, :, cx]


def keep_top_vs_random(images: np.ndarray, maps: np.ndarray, classes: np.ndarray,
                       predict: Predict, rng: np.random.Generator, keep: float = 0.2,
                       grid: tuple[int, int] = (7, 7), draws: int = KEEP_DRAWS) -> KeepTop:
    """Keep the map's top ``keep`` share vs ``keep`` of random grid cells (``draws`` draws per
    photo, the first one drawn for all photos before the others); rest: the mean colour."""
    images = np.asarray(images, np.float64)
    n, H, W, _ = images.shape
    mean = images.mean(axis=(1, 2), keepdims=True)
    top = top_mask(ranking(upsample(maps, (H, W))), keep)[..., None]
    cells = [random_cells(n, (H, W), grid, keep, rng)[..., None] for _ in range(max(1, draws))]
    return KeepTop(_probs_of(predict, images, classes),
                   _probs_of(predict, np.where(top, images, mean), classes),
                   np.stack([_probs_of(predict, np.where(c, images, mean), classes)
                             for c in cells], axis=1))


# -- summary -------------------------------------------------------------------------------------
def summarize(curves: Curves, morf: np.ndarray, lerf: np.ndarray, top: KeepTop,
              road_fractions: tuple[float, ...] = ROAD_FRACTIONS) -> dict:
    """The numbers of one method on one sample (plain floats, for JSON and the model card)."""
    del_auc, ins_auc = auc(curves.deletion), auc(curves.insertion)
    return {
        "images": int(len(top.original)),
        "deletion_auc": float(del_auc.mean()),
        "insertion_auc": float(ins_auc.mean()),
        "road_morf": float(morf.mean()),
        "road_lerf": float(lerf.mean()),
        "road_gap": float((lerf - morf).mean()),
        "keep_top_win_rate": float(top.wins.mean()),
        "keep_top_win_rate_se": float(np.sqrt(top.wins.mean() * (1 - top.wins.mean())
                                              / max(1, len(top.wins)))),
        "keep_top_win_rate_draws": float(top.win_share.mean()),
        "keep_top_draws": int(top.random.shape[1]),
        "keep_top_drop": float((top.original - top.top).mean()),
        "keep_random_drop": float((top.original - top.random[:, 0]).mean()),
        "curves": {"fractions": curves.fractions.round(4).tolist(),
                   "deletion": curves.deletion.mean(axis=0).round(5).tolist(),
                   "insertion": curves.insertion.mean(axis=0).round(5).tolist(),
                   "road_fractions": list(road_fractions), "road_morf": morf.mean(axis=0).round(5).tolist(),
                   "road_lerf": lerf.mean(axis=0).round(5).tolist()},
    }
