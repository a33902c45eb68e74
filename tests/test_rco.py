"""rco.py: uniform cone samples, Gram-Schmidt, the cone loss's gradient, growing cones, resume."""
import math, os
from types import SimpleNamespace

import pytest
import torch

import common as C
import rco
import rdo
from conftest import HARMFUL, HARMLESS, interrupted_at_call, make_model, train_files


def ks_statistic(xs, cdf):
    """Kolmogorov-Smirnov distance between a sample and a continuous CDF."""
    xs = torch.sort(xs.double()).values
    n = len(xs)
    c = cdf(xs)
    return max((torch.arange(1, n + 1) / n - c).max().item(), (c - torch.arange(n) / n).max().item())


def test_samples_are_unit_and_in_the_cone():
    B = rco.gram_schmidt(torch.randn(3, 20))
    s = rco.sample_coefficients(3, 500, torch.Generator().manual_seed(0))
    r = s @ B
    assert torch.allclose(r.norm(dim=1), torch.ones(500), atol=1e-5)
    assert (r @ B.T >= -1e-6).all()  # every coefficient in the basis is >= 0


def test_samples_are_uniform_on_the_positive_orthant_and_the_convex_sampler_is_not():
    n, g = 4000, torch.Generator().manual_seed(1)
    crit = 1.63 / math.sqrt(n)  # the 1% critical value of the KS test
    uniform_angle = lambda t: t / (math.pi / 2)
    # k = 2: the angle in the quarter circle is uniform on [0, pi/2]
    s = rco.sample_coefficients(2, n, g)
    assert ks_statistic(torch.atan2(s[:, 1], s[:, 0]), uniform_angle) < crit
    # k = 3: uniform on the sphere makes each coordinate of the octant uniform on [0, 1] (Archimedes)
    s = rco.sample_coefficients(3, n, g)
    assert ks_statistic(s[:, 0], lambda x: x) < crit
    # the biased sampler the paper warns about: a uniform convex combination, normalised
    lam = torch.rand(n, 1, generator=g)
    c = torch.cat([lam, 1 - lam], 1)
    c = c / c.norm(dim=1, keepdim=True)
    assert ks_statistic(torch.atan2(c[:, 1], c[:, 0]), uniform_angle) > 2 * crit  # rejected, by a wide margin


def test_gram_schmidt_keeps_order_and_an_orthonormal_prefix():
    A = torch.randn(4, 30, dtype=torch.float64)
    Q = rco.gram_schmidt(A)
    torch.testing.assert_close(Q @ Q.T, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(Q[0], A[0] / A[0].norm())  # b_1 keeps its direction (no sign flips)
    assert (torch.diagonal(Q @ A.T) > 0).all()
    grown = rco.gram_schmidt(torch.cat([Q[:3], torch.randn(1, 30, dtype=torch.float64)]))
    torch.testing.assert_close(grown[:3], Q[:3])  # a (k-1)-cone's basis survives growing it


def test_per_example_directions_match_separate_runs():
    """rdo.loss_and_grad with one direction per example = the mean of one-example runs, loss and gradient."""
    model, tok = make_model("llama")
    tg = [[40, 41], [42, 43, 44]]
    batch = list(zip(HARMFUL[:2], HARMLESS[:2], tg, tg[::-1], tg))
    lam = {"abl": 1.0, "add": 0.2, "ret": 1.0}
    R = torch.randn(2, C.hidden_size(model)).requires_grad_(True)
    both = rdo.loss_and_grad(model, tok, R, batch, 2.0, 1, lam, 2)
    for i in range(2):
        r = R.detach()[i].clone().requires_grad_(True)
        one = rdo.loss_and_grad(model, tok, r, batch[i:i + 1], 2.0, 1, lam, 1)
        torch.testing.assert_close(R.grad[i] * 2, r.grad, rtol=1e-4, atol=1e-6)  # `both` is a mean over 2 rows
        both["loss"] -= one["loss"] / 2
    assert abs(both["loss"]) < 1e-5


def test_cone_gradient_matches_finite_differences():
    model, tok = make_model("llama")
    model.double()
    S = SimpleNamespace(model=model, tok=tok, alpha=2.0, layer=1, lambdas={"abl": 1.0, "add": 0.2, "ret": 1.0}, micro_batch=3)
    tg = [[40, 41], [42, 43, 44]]
    batch = list(zip(HARMFUL[:2], HARMLESS[:2], tg, tg[::-1], tg))
    B0 = rco.gram_schmidt(torch.randn(2, C.hidden_size(model), dtype=torch.float64))

    def loss(B, grad=False):
        B = B.clone().requires_grad_(True)
        out = rco.cone_loss_and_grad(S, B, batch, 3, torch.Generator().manual_seed(5))  # the same samples each call
        return out["loss"], B.grad

    L, G = loss(B0)
    # the losses stay fp64 for an fp64 model, but transformers' RMSNorm computes in fp32: h = 1e-3 balances the
    # central difference's truncation error against that rounding (1e-2 and 1e-4 agree only to ~1e-3)
    E, h = torch.randn_like(B0), 1e-3
    fd = (loss(B0 + h * E)[0] - loss(B0 - h * E)[0]) / (2 * h)
    assert (G * E).sum().item() == pytest.approx(fd, rel=2e-4)


def test_cone_loss_is_the_sample_loss_plus_the_basis_loss():
    """Algorithm 2, lines 4-6: L = L_sample (mean RDO loss of `samples` cone directions s B per example) + L_basis
    (mean RDO loss of every basis vector with every example); dL/dB sums both parts' gradients, through r = s B."""
    model, tok = make_model("llama")
    lam = {"abl": 1.0, "add": 0.2, "ret": 1.0}
    S = SimpleNamespace(model=model, tok=tok, alpha=2.0, layer=1, lambdas=lam, micro_batch=4)
    tg = [[40, 41], [42, 43, 44]]
    batch = list(zip(HARMFUL[:2], HARMLESS[:2], tg, tg[::-1], tg))
    B = rco.gram_schmidt(torch.randn(2, C.hidden_size(model))).requires_grad_(True)
    out = rco.cone_loss_and_grad(S, B, batch, 3, torch.Generator().manual_seed(5))

    def rdo_rows(dirs, rows):  # one direction per row
        R = dirs.detach().clone().requires_grad_(True)
        return rdo.loss_and_grad(model, tok, R, rows, 2.0, 1, lam, 4), R.grad

    s = rco.sample_coefficients(2, 2 * 3, torch.Generator().manual_seed(5))  # the same draws: 3 per example
    sample, g_sample = rdo_rows(s @ B, [x for x in batch for _ in range(3)])
    basis, g_basis = rdo_rows(torch.cat([B, B]), [x for x in batch for _ in range(2)])  # (example, b_i) pairs
    assert out["sample"] == pytest.approx(sample["loss"], rel=1e-6)
    assert out["basis"] == pytest.approx(basis["loss"], rel=1e-6)
    assert out["loss"] == pytest.approx(sample["loss"] + basis["loss"], rel=1e-6)
    for key in lam:
        assert out[f"sample_{key}"] == pytest.approx(sample[key], rel=1e-6)
        assert out[f"basis_{key}"] == pytest.approx(basis[key], rel=1e-6)
    torch.testing.assert_close(B.grad, s.T @ g_sample + g_basis.view(2, 2, -1).sum(0), rtol=1e-5, atol=1e-7)


def test_bypass_score_is_the_refusal_score_with_the_direction_ablated():
    model, tok = make_model("llama")
    S = SimpleNamespace(model=model, tok=tok, harm_val=HARMFUL[:3], safe_val=HARMLESS[:3])
    ids = C.refusal_token_ids(tok)
    R = torch.randn(2, C.hidden_size(model))
    got = rco.bypass_scores(S, R, ids, SimpleNamespace(batch_size=2))
    clean = C.refusal_scores(C.last_logits(model, tok, HARMFUL[:3], 2), ids).mean().item()
    for r, score in zip(R, got):
        with C.directional_ablation(model, r):
            want = C.refusal_scores(C.last_logits(model, tok, HARMFUL[:3], 2), ids).mean().item()
        assert score == pytest.approx(want, rel=1e-6)
        assert abs(want - clean) > 1e-3  # the ablation matters on this model


def select_with(monkeypatch, sample_bypass):
    """select_basis over 5 iterates (the last 4 candidates) whose basis vectors all fail the induce filter, with faked
    scores: each candidate's basis vectors score bypass -10 * step (the later, the lower), its cone samples score
    sample_bypass[i]. Returns the choice, the scores, the iterates and the directions each sample scoring got."""
    model, tok = make_model("llama")
    S = SimpleNamespace(model=model, tok=tok, harm_val=HARMFUL[:2], safe_val=HARMLESS[:2], alpha=2.0, layer=1,
                        device=torch.device("cpu"))
    args = SimpleNamespace(batch_size=4, select_last=4, kl_threshold=0.1, induce_threshold=0.0, select_samples=3, seed=0)
    iterates = [rco.gram_schmidt(torch.randn(2, C.hidden_size(model))) for _ in range(5)]
    steps, seen, values = iter([1, 1, 2, 2, 3, 3, 4, 4]), [], iter(sample_bypass)
    monkeypatch.setattr(rco.dim, "score_direction", lambda *a: {"bypass": -10.0 * next(steps), "induce": -1.0, "kl": 0.0})
    monkeypatch.setattr(rco, "bypass_scores", lambda S, dirs, ids, args: seen.append(dirs) or [next(values)] * len(dirs))
    return (*rco.select_basis(S, iterates, args), iterates, seen)


def test_selection_falls_back_to_the_lowest_sample_bypass(monkeypatch):
    chosen, scored, iterates, seen = select_with(monkeypatch, [math.nan, 0.5, -0.3, 0.1])
    assert [s["step"] for s in scored] == [1, 2, 3, 4] and not any(s["passes"] for s in scored)
    assert chosen["step"] == 3 and chosen["sample_bypass"] == pytest.approx(-0.3)  # not step 4 (lowest basis bypass)
    coeffs = [dirs @ B.T for dirs, B in zip(seen, iterates[1:])]  # each candidate's own cone, the same samples
    assert len(coeffs) == 4 and coeffs[0].shape == (3, 2) and (coeffs[0] >= 0).all()
    for c in coeffs[1:]:
        torch.testing.assert_close(c, coeffs[0], atol=1e-5, rtol=0)


def test_selection_refuses_when_every_iterate_scored_nan(monkeypatch):
    with pytest.raises(C.RefusalError, match="every iterate scored NaN"):
        select_with(monkeypatch, [math.nan] * 4)


# ----------------------------------------------------------------------------- the script

@pytest.fixture
def setup(tiny_dir, tmp_path):
    h, s, dim_file = train_files(tmp_path)
    base = ["--model", tiny_dir, "--harmful", h, "--harmless", s, "--n-train", "4", "--n-val", "2",
            "--dim", dim_file, "--effective-batch", "2", "--micro-batch", "4", "--dtype", "float32", "--samples", "2",
            "--answer-tokens", "3", "--retain-tokens", "2", "--refusal-tokens", "3", "--select-last", "2",
            "--eval-samples", "4", "--select-samples", "2", "--cache", str(tmp_path / "cache")]
    return base, tmp_path


def test_cones_grow_from_the_smaller_cone_and_stay_orthonormal(setup):
    base, tmp = setup
    dim_file = str(tmp / "dim" / "dim.safetensors")
    rco.main(base + ["--min-dim", "1", "--max-dim", "2", "--lr", "0", "--init", dim_file, "--out", str(tmp / "still")])
    k1, _ = C.load_result(str(tmp / "still" / "k1" / "rco.safetensors"))
    k2, meta = C.load_result(str(tmp / "still" / "k2" / "rco.safetensors"))
    v = C.load_result(dim_file)[0]["direction"]
    torch.testing.assert_close(k1["basis"][0], v / v.norm())  # lr 0: the 1-cone is --init ...
    torch.testing.assert_close(k2["basis"][0], k1["basis"][0])  # ... and the 2-cone is still its start
    rco.main(base + ["--min-dim", "2", "--max-dim", "2", "--lr", "0.05", "--out", str(tmp / "moving")])
    B, meta = C.load_result(str(tmp / "moving" / "k2" / "rco.safetensors"))
    torch.testing.assert_close(B["basis"] @ B["basis"].T, torch.eye(2), atol=1e-5, rtol=0)
    assert meta["k"] == 2 and len(meta["history"]) == 2 and meta["max_abs_offdiag_gram"] < 1e-5
    ev = meta["evaluation"]
    assert len(ev["samples"]["bypass"]) == 4 and len(ev["basis"]["induce"]) == 2
    q = ev["samples"]["bypass_quartiles"]
    assert q["min"] <= q["median"] <= q["max"] == max(ev["samples"]["bypass"])
    assert not os.path.exists(tmp / "moving" / "rco_checkpoint.pt")
    with pytest.raises(C.RefusalError, match="already holds cones"):
        rco.main(base + ["--out", str(tmp / "moving")])
    with pytest.raises(C.RefusalError, match=r"already holds cones of dimension \[2\]"):  # another range, one figure
        rco.main(base + ["--min-dim", "3", "--max-dim", "3", "--out", str(tmp / "moving")])
    first = (tmp / "moving" / "k2" / "rco.safetensors").read_bytes()
    with interrupted_at_call(rdo, "plateau_step", 1):  # a failed --overwrite run keeps the earlier cones
        rco.main(base + ["--min-dim", "1", "--max-dim", "1", "--out", str(tmp / "moving"), "--overwrite"])
    assert (tmp / "moving" / "k2" / "rco.safetensors").read_bytes() == first
    rco.main(base + ["--min-dim", "1", "--max-dim", "1", "--out", str(tmp / "moving"), "--overwrite"])
    assert sorted(f.name for f in (tmp / "moving").iterdir() if f.name.startswith("k")) == ["k1"]  # one run's cones


def test_init_with_several_directions_keeps_their_signs(setup):
    base, tmp = setup
    d = C.load_result(str(tmp / "dim" / "dim.safetensors"))[0]["direction"].numel()
    v = torch.randn(2, d)
    v[:, 0] = v[:, 0].abs() + 1  # a Householder QR (C.unit_basis) would return -v_1 for such rows
    two = C.save_result(str(tmp / "two"), "x", {"directions": v}, {})
    rco.main(base + ["--min-dim", "2", "--max-dim", "2", "--lr", "0", "--init", two, "--out", str(tmp / "a")])
    B = C.load_result(str(tmp / "a" / "k2" / "rco.safetensors"))[0]["basis"]
    torch.testing.assert_close(B[0], v[0] / v[0].norm())  # the cone spanned by +v_1 and +v_2, not a reflection
    assert (B[1] @ v[1]).item() > 0 and abs((B[1] @ v[0]).item()) < 1e-5
    same = C.save_result(str(tmp / "same"), "x", {"directions": torch.stack([v[0], 2 * v[0]])}, {})
    with pytest.raises(C.RefusalError, match="linearly dependent"):
        rco.main(base + ["--min-dim", "2", "--max-dim", "2", "--init", same, "--out", str(tmp / "b")])


def test_init_with_more_directions_than_min_dim_is_refused(setup):
    base, tmp = setup
    d = C.load_result(str(tmp / "dim" / "dim.safetensors"))[0]["direction"].numel()
    two = C.save_result(str(tmp / "two"), "x", {"directions": torch.randn(2, d)}, {})
    with pytest.raises(C.RefusalError, match="--init holds 2 directions, more than --min-dim 1"):
        rco.main(base + ["--min-dim", "1", "--max-dim", "2", "--init", two, "--out", str(tmp / "x")])


@pytest.mark.parametrize("flag, value, key", [("--select-samples", "3", "select_samples"),
                                              ("--select-last", "1", "select_last"), ("--max-dim", "2", "max_dim")])
def test_resume_refuses_other_cone_settings(setup, flag, value, key):
    base, tmp = setup
    args = base + ["--min-dim", "1", "--max-dim", "1", "--lr", "0.05", "--out", str(tmp / "part")]
    with interrupted_at_call(rdo, "plateau_step", 2):  # k = 1, second step: the first one is checkpointed
        rco.main(args)
    with pytest.raises(C.RefusalError, match=rf"other settings \({key}: "):
        rco.main(args + ["--resume", flag, value])


def test_resume_across_cone_dimensions(setup):
    base, tmp = setup
    args = base + ["--min-dim", "1", "--max-dim", "2", "--lr", "0.05"]
    rco.main(args + ["--out", str(tmp / "full")])
    with interrupted_at_call(rdo, "plateau_step", 4):  # k = 2, second step
        rco.main(args + ["--out", str(tmp / "part")])
    with pytest.raises(C.RefusalError, match="unfinished run: pass --resume"):  # k = 1 is done, k = 2 is not
        rco.main(args + ["--out", str(tmp / "part")])
    with pytest.raises(C.RefusalError, match="other settings"):  # the cone's own settings are part of the run
        rco.main(args + ["--out", str(tmp / "part"), "--resume", "--samples", "3"])
    rco.main(args + ["--out", str(tmp / "part"), "--resume"])
    for k in (1, 2):
        a, _ = C.load_result(str(tmp / "full" / f"k{k}" / "rco.safetensors"))
        b, _ = C.load_result(str(tmp / "part" / f"k{k}" / "rco.safetensors"))
        torch.testing.assert_close(a["basis"], b["basis"], rtol=0, atol=1e-6)


def test_bad_dimensions(setup):
    base, tmp = setup
    with pytest.raises(C.RefusalError, match="min-dim"):
        rco.main(base + ["--min-dim", "3", "--max-dim", "2", "--out", str(tmp / "x")])
