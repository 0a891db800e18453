"""Completeness of RoPE (Su, "Transformer升级之路：6"): exp(nB) = Z·RoPE_n(θ)·Zᵀ via scipy's real Schur form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import expm, schur

from lightning_tiger.nn.general_rotary import GeneralRotaryEmbedding
from lightning_tiger.nn.rotary import RotaryEmbedding


def random_skew(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a - a.T


def block_rope(n: float, thetas: np.ndarray) -> np.ndarray:
    """Standard block-diagonal rotation with blocks [[cos, −sin], [sin, cos]] of angle n·θ_k."""
    d = 2 * len(thetas)
    r = np.zeros((d, d))
    for k, t in enumerate(thetas):
        c, s = np.cos(n * t), np.sin(n * t)
        r[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = [[c, -s], [s, c]]
    return r


def schur_thetas(t: np.ndarray) -> np.ndarray:
    d = t.shape[0]
    # T is block-diagonal with 2×2 blocks [[0, −θ], [θ, 0]] (θ_k = T[2k+1, 2k]); off-block entries vanish
    off = t.copy()
    for k in range(d // 2):
        off[2 * k : 2 * k + 2, 2 * k : 2 * k + 2] = 0
    assert np.abs(off).max() < 1e-10
    assert np.allclose(np.diag(t), 0, atol=1e-10)
    return np.array([t[2 * k + 1, 2 * k] for k in range(d // 2)])


@pytest.mark.parametrize("d", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_expm_equals_z_rope_zt(d, seed):
    b = random_skew(d, seed)
    t, z = schur(b, output="real")
    thetas = schur_thetas(t)
    np.testing.assert_allclose(z @ z.T, np.eye(d), atol=1e-12)
    for n in (-3, -1, 0, 1, 2, 7):
        np.testing.assert_allclose(expm(n * b), z @ block_rope(n, thetas) @ z.T, atol=1e-10)


@pytest.mark.parametrize("d", [4, 8])
def test_module_rotation_and_scores_equal_standard_rope_in_rotated_basis(d):
    b = random_skew(d, 3) * 0.5
    t, z = schur(b, output="real")
    thetas = schur_thetas(t)
    grope = GeneralRotaryEmbedding(d, generator=torch.from_numpy(b))
    pos = torch.tensor([-4, 0, 1, 5, 9])
    r = grope.rotation(pos).double().numpy()
    for idx, n in enumerate(pos.tolist()):
        np.testing.assert_allclose(r[idx], expm(n * b), atol=1e-5)
        np.testing.assert_allclose(r[idx].T @ r[idx], np.eye(d), atol=1e-5)
    # scores of the general form == standard (block-diagonal) RoPE on (Zᵀq, Zᵀk)
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((5, d)), rng.standard_normal((5, d))
    qg, kg = grope(torch.from_numpy(q)[None, :, None], torch.from_numpy(k)[None, :, None], positions=pos)
    general = (qg[0, :, 0].double() @ kg[0, :, 0].double().T).numpy()
    zq, zk = q @ z, k @ z  # rows of Zᵀq
    std = np.stack([block_rope(n, thetas) @ zq[i] for i, n in enumerate(pos.tolist())])
    stk = np.stack([block_rope(n, thetas) @ zk[i] for i, n in enumerate(pos.tolist())])
    np.testing.assert_allclose(general, std @ stk.T, atol=1e-4)
    # and the relative property: score depends on n − m only
    s1 = (expm(2 * b) @ q[0]) @ (expm(5 * b) @ k[0])
    s2 = (expm(-10 * b) @ q[0]) @ (expm(-7 * b) @ k[0])
    assert s1 == pytest.approx(s2, abs=1e-10)


def test_default_generator_matches_standard_rope_spectrum():
    torch.manual_seed(0)
    d = 8
    grope = GeneralRotaryEmbedding(d)
    t, _ = schur(grope.generator.double().numpy(), output="real")
    got = np.sort(np.abs(schur_thetas(t)))
    expected = np.sort(RotaryEmbedding(d).inv_freq.double().numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert grope.to(torch.bfloat16).generator.dtype == torch.float32


def test_rejects_non_skew_generator():
    with pytest.raises(ValueError, match="skew"):
        GeneralRotaryEmbedding(4, generator=torch.eye(4))
    with pytest.raises(ValueError, match="head_dim"):
        GeneralRotaryEmbedding(3)
