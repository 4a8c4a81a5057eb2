"""The faithfulness metrics on hand-made cases (engine/faithfulness.py, pure numpy).

The "model" here is a function of the pixels written in the test: its probability of class 1
is the share of a small square R (the only informative pixels: a black/white checkerboard on a
gray photo) that still differs from the background. A map that points at R must beat one that
points elsewhere, and a random map must land in between, near chance.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine import faithfulness as F

SIZE = 32
R = (slice(4, 12), slice(18, 26))  # the informative square: 8 x 8 of 32 x 32 (1/16)


def _photos(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 128.0 + rng.normal(0, 2, (n, SIZE, SIZE, 3))
    yy, xx = np.mgrid[0:8, 0:8]
    x[:, R[0], R[1], :] = (((yy + xx) % 2) * 255.0)[None, :, :, None]
    return x


def _predict(images: np.ndarray) -> np.ndarray:
    """P(class 1) = mean over R of |pixel - 128| / 128, clipped to [0, 1]."""
    dev = np.abs(np.asarray(images, np.float64)[:, R[0], R[1], :] - 128.0).mean(axis=(1, 2, 3))
    p = np.clip(dev / 127.0, 0.0, 1.0)
    return np.stack([1 - p, p], axis=1)


def _maps(kind: str, n: int, grid: int = SIZE, seed: int = 1) -> np.ndarray:
    if kind == "random":
        return np.random.default_rng(seed).uniform(size=(n, grid, grid))
    m = np.zeros((n, SIZE, SIZE))
    m[:, R[0], R[1]] = 1.0
    if kind == "elsewhere":
        m = 1.0 - m
    return m


# -- building blocks ---------------------------------------------------------------------------
def test_auc_hand_computed():
    np.testing.assert_allclose(F.auc(np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0, 0.5, 1]])),
                               [1.0, 0.25, 0.5])


def test_upsample_by_hand():
    # 1 x 2 -> 1 x 4, pixel centres aligned: positions -0.25, 0.25, 0.75, 1.25 (clipped)
    got = F.upsample(np.array([[[0.0, 4.0]]]), (1, 4))
    np.testing.assert_allclose(got, [[[0.0, 1.0, 3.0, 4.0]]])
    same = np.arange(6.0).reshape(1, 2, 3)
    np.testing.assert_array_equal(F.upsample(same, (2, 3)), same)


def test_ranking_and_top_mask():
    sal = np.array([[[0.1, 0.9], [0.5, 0.5]]])
    np.testing.assert_array_equal(F.ranking(sal), [[[3, 0], [1, 2]]])  # ties: raster order
    np.testing.assert_array_equal(F.top_mask(F.ranking(sal), 0.5), [[[False, True], [True, False]]])


def test_blur_keeps_constants_and_smooths_edges():
    flat = np.full((1, 10, 12, 3), 77.0)
    np.testing.assert_allclose(F.blur(flat, 2), flat)
    step = np.zeros((1, 10, 20, 1))
    step[:, :, 10:] = 100.0
    b = F.blur(step, 2)[0, 5, :, 0]
    assert b[0] == pytest.approx(0) and b[-1] == pytest.approx(100)
    assert 0 < b[9] < 50 < b[10] < 100 and np.all(np.diff(b) >= -1e-9)


def test_linear_imputation_is_exact_on_a_linear_ramp():
    """A linear function equals the weighted mean of its symmetric neighbours: the hole is
    filled exactly, at full and at coarse resolution."""
    H, W = 24, 24
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    ramp = np.stack([2 * yy + 3 * xx, xx + 10, 200 - yy], -1)
    hole = np.zeros((H, W), bool)
    hole[6:18, 5:15] = True
    np.testing.assert_allclose(F.linear_impute(ramp, hole), ramp, atol=1e-9)
    coarse = F.coarse_linear_impute(ramp, hole, scale=4)
    np.testing.assert_array_equal(coarse[~hole], ramp[~hole])
    assert np.abs(coarse - ramp).max() < 1.0  # block means of a ramp are its centre values
    rng = np.random.default_rng(0)
    noisy = F.noisy_linear_impute(ramp[None], hole[None], rng, noise=2.0, scale=1)[0]
    np.testing.assert_array_equal(noisy[~hole], ramp[~hole])
    assert 1.0 < (noisy - ramp)[hole].std() < 3.0


def test_random_cells_cover_whole_cells():
    rng = np.random.default_rng(0)
    m = F.random_cells(3, (28, 28), (7, 7), 0.2, rng)
    assert m.shape == (3, 28, 28)
    for i in range(3):
        cells = m[i].reshape(7, 4, 7, 4)
        assert (cells.all(axis=(1, 3)) == cells.any(axis=(1, 3))).all()  # whole cells
        assert cells.all(axis=(1, 3)).sum() == 10  # round(0.2 * 49)


# -- the metrics: the right map wins, the wrong one loses, a random one is near chance ---------
def _scores(kind: str, n: int = 8, grid: int = SIZE) -> dict:
    x = _photos(n)
    classes = np.ones(n, int)
    maps = _maps(kind, n, grid)
    curves = F.deletion_insertion(x, maps, classes, _predict, steps=16)
    morf, lerf = F.road(x, maps, classes, _predict, np.random.default_rng(0), scale=1)
    top = F.keep_top_vs_random(x, maps, classes, _predict, np.random.default_rng(0))
    return F.summarize(curves, morf, lerf, top)


def test_map_on_the_informative_pixels_beats_one_elsewhere_and_random_is_between():
    good, bad, rand = _scores("perfect"), _scores("elsewhere"), _scores("random")
    # deletion: lower is better; insertion: higher is better
    assert good["deletion_auc"] < 0.1 < rand["deletion_auc"] < bad["deletion_auc"]
    assert good["insertion_auc"] > 0.9 > rand["insertion_auc"] > bad["insertion_auc"]
    # random order removes the informative pixels in proportion: about the diagonal's 0.5
    assert abs(rand["deletion_auc"] - 0.5) < 0.1 and abs(rand["insertion_auc"] - 0.5) < 0.1
    # ROAD: removing R first kills the class, removing it last keeps it
    assert good["road_gap"] > 0.5 and bad["road_gap"] < -0.5 and abs(rand["road_gap"]) < 0.1
    assert good["keep_top_win_rate"] == 1.0 and bad["keep_top_win_rate"] == 0.0
    assert good["keep_top_drop"] < 0.05 < bad["keep_top_drop"]
    assert len(good["curves"]["deletion"]) == 17 and good["images"] == 8


def test_a_coarse_map_is_upsampled_and_scored():
    """A 4 x 4 map whose top cell holds R still points at it."""
    n = 4
    coarse = np.zeros((n, 4, 4))
    coarse[:, 0, 2] = 1.0  # R = rows 4-12, cols 18-26 lies mostly in cell (0, 2) and (1, 2)
    coarse[:, 1, 2] = 0.9
    x = _photos(n)
    curves = F.deletion_insertion(x, coarse, np.ones(n, int), _predict, steps=10)
    assert F.auc(curves.deletion).mean() < 0.25
    assert F.auc(curves.insertion).mean() > 0.75


def test_each_step_is_one_batched_call():
    calls = []

    def predict(images):
        calls.append(len(images))
        return _predict(images)

    x = _photos(5)
    F.deletion_insertion(x, _maps("perfect", 5), np.ones(5, int), predict, steps=4)
    assert calls == [5] * 10


# -- keep top vs random: issue 12's protocol, worked out by hand ---------------------------------
def test_keep_top_protocol_by_hand():
    """A 28 x 28 'photo' (7 x 7 cells of 4 px) whose class lives in one cell, a map that points
    at that cell. Keeping the map's 20 % keeps the cell whole: p = 1, no drop. A random draw of
    10 cells keeps it only when it picks that cell, and then does as well: a tie, which the
    protocol counts as a loss. So the map wins exactly on the photos whose first draw missed
    the cell, and ``win_share`` is the share of all draws that missed it."""
    n, size, draws = 40, 28, 5
    x = np.random.default_rng(3).integers(0, 256, (n, size, size, 3)).astype(float)  # exact in f32
    cell = (slice(8, 12), slice(16, 20))  # row 2, column 4
    seen = []

    def predict(images):  # P(class 1) = share of the cell's pixels left as they were
        seen.append(images.copy())
        same = (images[:, cell[0], cell[1]] == x[:, cell[0], cell[1]]).all(-1).mean(axis=(1, 2))
        return np.stack([1 - same, same], axis=1)

    maps = np.random.default_rng(4).uniform(0, 0.01, (n, 7, 7))
    maps[:, 2, 4] = 1.0
    top = F.keep_top_vs_random(x, maps, np.ones(n, int), predict, np.random.default_rng(5),
                               draws=draws)
    # by hand: the draws, photo by photo, first draw for all photos before the second
    rng = np.random.default_rng(5)
    picked = np.array([[2 * 7 + 4 in rng.choice(49, 10, replace=False) for _ in range(n)]
                       for _ in range(draws)]).T  # (n, draws)
    assert 0 < picked[:, 0].sum() < n  # both outcomes occur in this sample
    np.testing.assert_array_equal(top.wins, ~picked[:, 0])
    np.testing.assert_allclose(top.win_share, (~picked).mean(axis=1))
    np.testing.assert_array_equal(top.top, 1.0)
    s = F.summarize(F.Curves(np.linspace(0, 1, 2), np.zeros((n, 2)), np.zeros((n, 2))),
                    np.zeros((n, 1)), np.zeros((n, 1)), top)
    assert s["keep_top_win_rate"] == pytest.approx(1 - picked[:, 0].mean())
    assert s["keep_top_win_rate_draws"] == pytest.approx(1 - picked.mean())
    assert s["keep_top_drop"] == 0.0
    assert s["keep_random_drop"] == pytest.approx(1 - picked[:, 0].mean())  # first draw only
    assert s["keep_top_draws"] == draws
    # the fills: the map's top 20 % of pixels (157 of 784) kept, the rest the photo's mean colour
    mean = x.mean(axis=(1, 2), keepdims=True)
    kept = (seen[1] == x).all(-1)
    assert (kept.sum(axis=(1, 2)) == round(0.2 * size * size)).all()
    assert kept[:, cell[0], cell[1]].all()
    np.testing.assert_allclose(np.where(kept[..., None], mean, seen[1]),
                               np.broadcast_to(mean, x.shape), atol=1e-4)
    # each random draw: 10 whole cells kept (160 px), the rest the mean colour
    for images in seen[2:]:
        kept = (images == x).all(-1)
        cells = kept.reshape(n, 7, 4, 7, 4).all(axis=(2, 4))
        np.testing.assert_array_equal(kept, cells.repeat(4, 1).repeat(4, 2))
        assert (cells.sum(axis=(1, 2)) == 10).all()
        np.testing.assert_allclose(np.where(kept[..., None], mean, images),
                                   np.broadcast_to(mean, x.shape), atol=1e-4)
    assert len(seen) == 2 + draws  # original, top, one batched call per draw


def test_keep_top_first_draw_is_the_one_draw_protocol():
    x = _photos(6)
    maps = _maps("random", 6, grid=7)
    one = F.keep_top_vs_random(x, maps, np.ones(6, int), _predict, np.random.default_rng(9), draws=1)
    many = F.keep_top_vs_random(x, maps, np.ones(6, int), _predict, np.random.default_rng(9), draws=4)
    assert one.random.shape == (6, 1) and many.random.shape == (6, 4)
    np.testing.assert_array_equal(one.random[:, 0], many.random[:, 0])
    np.testing.assert_array_equal(one.wins, many.wins)


def test_ties_are_losses():
    """A model that ignores the pixels: every region does as well as the map's."""
    x = _photos(5)
    flat = lambda images: np.tile([0.3, 0.7], (len(images), 1))  # noqa: E731
    top = F.keep_top_vs_random(x, _maps("perfect", 5), np.ones(5, int), flat,
                               np.random.default_rng(0))
    assert not top.wins.any() and (top.win_share == 0).all()
