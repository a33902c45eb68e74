"""rco.py: uniform cone samples, Gram-Schmidt, the cone loss and its gradient, the per-row tangent step, the
selection (Appendix A.3 with the authors' ranking), growing cones, resume, errors."""
import math, os, shutil, subprocess, sys
from types import SimpleNamespace

import pytest
import torch

import common as C
import rco
from conftest import HARMFUL, HARMLESS, interrupted_at_call, make_model, train_files

LAMBDAS = (1.0, 0.2, 1.0)
TG = [[40, 41], [42, 43, 44]]
EXAMPLES = list(zip(HARMFUL[:2], HARMLESS[:2], TG, TG[::-1], TG))  # (p_harm, p_safe, t_answer, t_refusal, t_retain)


def tiny(micro_batch=4):
    """What rco.py's functions read from C.training_setup, for a tiny model."""
    model, tok = make_model("llama")
    return SimpleNamespace(model=model, tok=tok, alpha=2.0, layer=1, micro_batch=micro_batch,
                           device=torch.device("cpu"), harm_val=HARMFUL[:3], safe_val=HARMLESS[:3],
                           refusal_ids=C.refusal_tokens(model, tok, HARMFUL, words=["I"])[0])


def ks_statistic(xs, cdf):
    """Kolmogorov-Smirnov distance between a sample and a continuous CDF."""
    xs = torch.sort(xs.double()).values
    n = len(xs)
    c = cdf(xs)
    return max((torch.arange(1, n + 1) / n - c).max().item(), (c - torch.arange(n) / n).max().item())


# ----------------------------------------------------------------------------- the cone

def test_samples_are_unit_and_in_the_cone():
    B = rco.gram_schmidt(torch.randn(3, 20))
    r = C.sample_cone(3, 500, torch.Generator().manual_seed(0)) @ B
    assert torch.allclose(r.norm(dim=1), torch.ones(500), atol=1e-5)
    assert (r @ B.T >= -1e-6).all()  # every coefficient in the basis is >= 0


def test_samples_are_uniform_on_the_positive_orthant_and_the_convex_sampler_is_not():
    n, g = 4000, torch.Generator().manual_seed(1)
    crit = 1.63 / math.sqrt(n)  # the 1% critical value of the KS test
    uniform_angle = lambda t: t / (math.pi / 2)
    s = C.sample_cone(2, n, g)  # k = 2: the angle in the quarter circle is uniform on [0, pi/2]
    assert ks_statistic(torch.atan2(s[:, 1], s[:, 0]), uniform_angle) < crit
    s = C.sample_cone(3, n, g)  # k = 3: uniform on the sphere makes each coordinate uniform on [0, 1] (Archimedes)
    assert ks_statistic(s[:, 0], lambda x: x) < crit
    lam = torch.rand(n, 1, generator=g)  # the biased sampler the paper warns about: a convex combination, normalised
    c = torch.nn.functional.normalize(torch.cat([lam, 1 - lam], 1), dim=1)
    assert ks_statistic(torch.atan2(c[:, 1], c[:, 0]), uniform_angle) > 2 * crit  # rejected, by a wide margin


def test_gram_schmidt_keeps_order_and_an_orthonormal_prefix():
    A = torch.randn(4, 30, dtype=torch.float64)
    Q = rco.gram_schmidt(A)
    torch.testing.assert_close(Q @ Q.T, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(Q[0], A[0] / A[0].norm())  # b_1 keeps its direction (no sign flips)
    assert (torch.diagonal(Q @ A.T) > 0).all()
    grown = rco.gram_schmidt(torch.cat([Q[:3], torch.randn(1, 30, dtype=torch.float64)]))
    torch.testing.assert_close(grown[:3], Q[:3])  # a (k-1)-cone's basis survives growing it


def test_the_tangent_step_projects_each_basis_vector_on_its_own():
    """Line 7 for a (k, d) basis: each b_i's gradient loses its component along b_i, and only that."""
    B = rco.gram_schmidt(torch.randn(3, 16, dtype=torch.float64))
    G = torch.randn(3, 16, dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    T = C.tangent(G, B)
    torch.testing.assert_close((T * B).sum(-1), zero)
    torch.testing.assert_close(G - T, (G * B).sum(-1, keepdim=True) * B)
    whole = G - (G * B).sum() * B  # one projection for the whole matrix: the check tells it apart
    assert (whole * B).sum(-1).abs().max() > 1e-2
    P = B.clone().requires_grad_(True)  # the step itself, clipped or not: it moves each row along its tangent
    for max_norm in (None, 0.1):
        P.grad = G.clone()
        C.sphere_step(torch.optim.SGD([P], lr=0.0), P, max_norm)
        torch.testing.assert_close((P.grad * B).sum(-1), zero)


# ----------------------------------------------------------------------------- COMPUTELOSS, lines 4-6

def weighted(part):
    return sum(lam * part[key] for lam, key in zip(LAMBDAS, ("abl", "add", "ret")))


def reference_loss(S, r, example):
    """COMPUTELOSS as Algorithm 1 writes it: one example, one direction (d,)."""
    _, b = next(C.micro_batches(S.tok, [example], 1, S.device))
    parts = (C.ablation_loss(S.model, r, b["abl"]), C.addition_loss(S.model, r, b["add"], S.alpha, S.layer),
             C.retain_loss(S.model, r, b["ret"]))
    return sum(lam * x for lam, x in zip(LAMBDAS, parts))[0]


def test_cone_loss_is_the_mean_over_samples_plus_the_mean_over_basis_vectors():
    """Lines 4-6 and their gradient, against a straight transcription that differentiates through r = s B."""
    S = tiny(micro_batch=3)  # 4 rows per part: micro-batches of 3 and 1, each row with its own direction
    B0 = rco.gram_schmidt(torch.randn(2, C.hidden_size(S.model)))
    B = B0.clone().requires_grad_(True)
    sample, basis = rco.cone_loss(S, B, EXAMPLES, 2, LAMBDAS, torch.Generator().manual_seed(5))
    s = C.sample_cone(2, 2 * 2, torch.Generator().manual_seed(5))  # the same draws: 2 per example
    Bref = B0.clone().requires_grad_(True)
    L_sample = sum(reference_loss(S, s[2 * i + j] @ Bref, EXAMPLES[i]) for i in range(2) for j in range(2)) / 4
    L_basis = sum(reference_loss(S, Bref[v], EXAMPLES[i]) for i in range(2) for v in range(2)) / 4
    (L_sample + L_basis).backward()
    assert weighted(sample) == pytest.approx(L_sample.item(), rel=1e-5)
    assert weighted(basis) == pytest.approx(L_basis.item(), rel=1e-5)
    torch.testing.assert_close(B.grad, Bref.grad, rtol=1e-4, atol=1e-6)


def test_cone_gradient_matches_finite_differences():
    S = tiny(micro_batch=8)
    S.model.double()
    B0 = rco.gram_schmidt(torch.randn(2, C.hidden_size(S.model), dtype=torch.float64))

    def loss(B):
        B = B.clone().requires_grad_(True)
        sample, basis = rco.cone_loss(S, B, EXAMPLES[:1], 2, LAMBDAS, torch.Generator().manual_seed(5))  # same draws
        return weighted(sample) + weighted(basis), B.grad

    L, G = loss(B0)
    E, h = torch.randn_like(B0), 1e-3  # transformers' RMSNorm computes in fp32: h balances truncation and rounding
    fd = (loss(B0 + h * E)[0] - loss(B0 - h * E)[0]) / (2 * h)
    assert (G * E).sum().item() == pytest.approx(fd, rel=2e-4)


# ----------------------------------------------------------------------------- selection

def vec(bypass, *discarded):
    return {"bypass": bypass, "induce": 1.0, "kl": 0.01, "discarded": list(discarded)}


def test_passing_bases_are_ranked_by_their_samples_not_their_vectors():
    scored = [{"step": 1, "vectors": [vec(-9.0), vec(-8.0)]},                   # passes; its vectors score best
              {"step": 2, "vectors": [vec(-1.0), vec(-2.0)]},                   # passes; its samples score best
              {"step": 3, "vectors": [vec(-20.0), vec(-30.0, "induce<0.0")]}]   # one vector fails: out
    asked = []
    chosen = rco.choose_basis(scored, lambda t: asked.append(t) or {1: -0.5, 2: -1.5, 3: -5.0}[t])
    assert chosen["step"] == 2 and chosen["sample_bypass"] == -1.5
    assert asked == [1, 2]  # only the passing bases' samples are scored
    one = [{"step": 1, **vec(-1.0)}, {"step": 2, **vec(-5.0, "kl>0.1")}]  # a 1-cone's scores come flat
    assert rco.choose_basis(one, {1: 0.3, 2: -2.0}.get)["step"] == 1


def test_without_a_passing_basis_the_lowest_sample_bypass_wins():
    scored = [{"step": t, "vectors": [vec(-10.0 * t, "induce<0.0"), vec(-1.0)]} for t in (1, 2, 3, 4)]
    chosen = rco.choose_basis(scored, {1: math.nan, 2: 0.5, 3: -0.3, 4: 0.1}.get)
    assert chosen["step"] == 3  # not step 4, whose vectors score best
    assert [s["sample_bypass"] for s in scored][1:] == [0.5, -0.3, 0.1]
    assert rco.choose_basis(scored, lambda t: math.nan) is None


def test_selection_scores_every_candidate_on_the_same_samples(monkeypatch):
    d = 16
    iterates = [rco.gram_schmidt(torch.randn(2, d)) for _ in range(5)]
    scored = [{"step": t, "vectors": [vec(-10.0 * t, "induce<0.0"), vec(-1.0)]} for t in (1, 2, 3, 4)]
    seen, values = [], [math.nan, 0.5, -0.3, 0.1]
    monkeypatch.setattr(rco.C, "score_iterates", lambda *a, **k: [dict(s) for s in scored])
    monkeypatch.setattr(rco, "sample_bypass", lambda S, B, c, bs: seen.append((B, c)) or values[len(seen) - 1])
    S = SimpleNamespace(model=None, tok=None, alpha=1.0, layer=1, harm_val=[], safe_val=[], refusal_ids=[],
                        device="cpu")
    args = SimpleNamespace(select_samples=3, seed=0, batch_size=2)
    chosen, _ = rco.select_basis(S, iterates, args)
    assert chosen["step"] == 3
    assert [B for B, _ in seen] == iterates[1:]
    assert seen[0][1].shape == (3, 2) and (seen[0][1] >= 0).all()
    assert all(torch.equal(c, seen[0][1]) for _, c in seen)
    values[:] = [math.nan] * 8
    with pytest.raises(C.RefusalError, match="every candidate basis scored NaN"):
        rco.select_basis(S, iterates, args)


def test_sample_bypass_is_the_mean_refusal_score_with_each_sample_ablated():
    S = tiny()
    B = rco.gram_schmidt(torch.randn(2, C.hidden_size(S.model)))
    coeffs = C.sample_cone(2, 3, torch.Generator().manual_seed(0))
    got = rco.sample_bypass(S, B, coeffs, 2)
    scores = []
    for r in coeffs @ B:
        with C.directional_ablation(S.model, r):
            scores.append(C.refusal_scores(C.last_logits(S.model, S.tok, S.harm_val, 2), S.refusal_ids).mean().item())
    assert got == pytest.approx(sum(scores) / 3, rel=1e-6)
    clean = C.refusal_scores(C.last_logits(S.model, S.tok, S.harm_val, 2), S.refusal_ids).mean().item()
    assert abs(got - clean) > 1e-3  # the ablation matters on this model


# ----------------------------------------------------------------------------- the script

@pytest.fixture(scope="module")
def env(tiny_dir, tmp_path_factory):
    """Data, a DIM result and a targets cache shared by the runs below, and one full run: cones k = 1 and 2."""
    tmp = tmp_path_factory.mktemp("rco")
    h, s, dim_file = train_files(tmp)
    base = ["--model", tiny_dir, "--harmful", h, "--harmless", s, "--n-train", "4", "--n-val", "2", "--device", "cpu",
            "--dim", dim_file, "--effective-batch", "2", "--micro-batch", "4", "--dtype", "float32", "--samples", "2",
            "--answer-tokens", "3", "--retain-tokens", "2", "--refusal-target-tokens", "3", "--refusal-tokens", "I",
            "--select-last", "2", "--eval-samples", "4", "--select-samples", "2", "--cache", str(tmp / "cache")]
    full = base + ["--min-dim", "1", "--max-dim", "2", "--lr", "0.05"]
    plateau, watched = C.plateau, []
    C.plateau = lambda state, loss, *a: watched.append(loss) or plateau(state, loss, *a)
    try:
        rco.main(full + ["--out", str(tmp / "full")])
    finally:
        C.plateau = plateau
    return SimpleNamespace(base=base, full=full, dim_file=dim_file, out=tmp / "full", watched=watched)


def test_a_run_writes_orthonormal_cones_with_their_selection_and_scores(env):
    assert sorted(f.name for f in env.out.iterdir()) == ["k1", "k2"]  # and no checkpoint left
    history = []
    for k in (1, 2):
        B, meta = C.load_result(str(env.out / f"k{k}" / "rco.safetensors"))
        history += meta["history"]
        torch.testing.assert_close(B["basis"] @ B["basis"].T, torch.eye(k), atol=1e-5, rtol=0)
        assert meta["k"] == k and len(meta["history"]) == 2 and meta["max_abs_offdiag_gram"] < 1e-5
        assert meta["refusal_tokens"]["words"] == ["I"] and meta["args"]["samples"] == 2 and "git_commit" in meta
        sel = {s["step"]: s for s in meta["selection"]}
        assert list(sel) == [0, 1] and math.isfinite(sel[meta["chosen_step"]]["sample_bypass"])
        ev = meta["evaluation"]
        assert ev["basis"] == sel[meta["chosen_step"]].get("vectors", [sel[meta["chosen_step"]]])
        assert len(ev["basis"]) == k and len(ev["samples"]["bypass"]) == len(ev["samples"]["kl"]) == 4
        x, q = ev["samples"]["bypass"], ev["samples"]["bypass_quartiles"]
        assert q["min"] == min(x) <= q["q1"] <= q["median"] <= q["q3"] <= q["max"] == max(x)
    # the plateau schedule watches the unweighted sum of the sample and basis parts' three losses
    unweighted = [sum(h["sample"].values()) + sum(h["basis"].values()) for h in history]
    assert env.watched == pytest.approx(unweighted) and unweighted != pytest.approx([h["loss"] for h in history])


def test_cones_grow_from_the_smaller_cone(env, tmp_path):
    rco.main(env.base + ["--min-dim", "1", "--max-dim", "2", "--lr", "0", "--max-steps", "1", "--init", env.dim_file,
                         "--out", str(tmp_path)])
    k1, _ = C.load_result(str(tmp_path / "k1" / "rco.safetensors"))
    k2, _ = C.load_result(str(tmp_path / "k2" / "rco.safetensors"))
    v = C.load_result(env.dim_file)[0]["direction"]
    torch.testing.assert_close(k1["basis"][0], v / v.norm())  # lr 0: the 1-cone is --init ...
    torch.testing.assert_close(k2["basis"][0], k1["basis"][0])  # ... and the 2-cone is still its start


def test_earlier_cones_are_kept_unless_overwrite_succeeds(env, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(env.out, out)
    base = env.base + ["--max-steps", "1", "--out", str(out)]
    with pytest.raises(C.RefusalError, match=r"already holds cones of dimension \[1, 2\]"):
        rco.main(base + ["--min-dim", "2", "--max-dim", "2"])
    with pytest.raises(C.RefusalError, match=r"already holds cones"):  # another range too
        rco.main(base + ["--min-dim", "3", "--max-dim", "3"])
    first = (out / "k2" / "rco.safetensors").read_bytes()
    with interrupted_at_call(C, "plateau", 1):  # a failed --overwrite run keeps the earlier cones
        rco.main(base + ["--min-dim", "1", "--max-dim", "1", "--overwrite"])
    assert (out / "k2" / "rco.safetensors").read_bytes() == first
    rco.main(base + ["--min-dim", "1", "--max-dim", "1", "--overwrite"])
    assert sorted(f.name for f in out.iterdir()) == ["k1"]  # one run's cones


def test_init_with_several_directions_keeps_their_signs(env, tmp_path):
    d = C.load_result(env.dim_file)[0]["direction"].numel()
    v = torch.randn(2, d)
    v[:, 0] = v[:, 0].abs() + 1  # a Householder QR (C.unit_basis) would return -v_1 for such rows
    two = C.save_result(str(tmp_path / "two"), "x", {"directions": v}, {})
    base = env.base + ["--lr", "0", "--max-steps", "1"]
    rco.main(base + ["--min-dim", "2", "--max-dim", "2", "--init", two, "--out", str(tmp_path / "a")])
    B = C.load_result(str(tmp_path / "a" / "k2" / "rco.safetensors"))[0]["basis"]
    torch.testing.assert_close(B[0], v[0] / v[0].norm())  # the cone spanned by +v_1 and +v_2, not a reflection
    assert (B[1] @ v[1]).item() > 0 and abs((B[1] @ v[0]).item()) < 1e-5
    same = C.save_result(str(tmp_path / "same"), "x", {"directions": torch.stack([v[0], 2 * v[0]])}, {})
    with pytest.raises(C.RefusalError, match="linearly dependent"):
        rco.main(base + ["--min-dim", "2", "--max-dim", "2", "--init", same, "--out", str(tmp_path / "b")])
    with pytest.raises(C.RefusalError, match="--init holds 2 directions, more than --min-dim 1"):
        rco.main(base + ["--min-dim", "1", "--max-dim", "2", "--init", two, "--out", str(tmp_path / "c")])


def test_resume_across_cone_dimensions_equals_the_uninterrupted_run(env, tmp_path):
    with interrupted_at_call(C, "plateau", 4):  # k = 2, second step: k = 1 and one step of k = 2 are saved
        rco.main(env.full + ["--out", str(tmp_path)])
    with pytest.raises(C.RefusalError, match="unfinished run: pass --resume"):
        rco.main(env.full + ["--out", str(tmp_path)])
    for flag, value, key in [("--samples", "3", "samples"), ("--select-samples", "3", "select_samples"),
                             ("--select-last", "1", "select_last"), ("--max-dim", "3", "max_dim")]:
        with pytest.raises(C.RefusalError, match=rf"other settings \({key}: "):  # the cone's settings shape the run
            rco.main(env.full + ["--out", str(tmp_path), "--resume", flag, value])
    rco.main(env.full + ["--out", str(tmp_path), "--resume"])
    for k in (1, 2):
        a, ma = C.load_result(str(env.out / f"k{k}" / "rco.safetensors"))
        b, mb = C.load_result(str(tmp_path / f"k{k}" / "rco.safetensors"))
        torch.testing.assert_close(a["basis"], b["basis"], rtol=0, atol=1e-6)
        assert [h["loss"] for h in ma["history"]] == pytest.approx([h["loss"] for h in mb["history"]], rel=1e-6)
    assert not os.path.exists(tmp_path / "rco_checkpoint.pt")


@pytest.mark.parametrize("flags, message", [(["--min-dim", "3", "--max-dim", "2"], "min-dim"),
                                            (["--min-dim", "0"], "min-dim"),
                                            (["--samples", "0"], "--samples must be at least 1"),
                                            (["--eval-samples", "0"], "--eval-samples must be at least 1")])
def test_bad_flags(env, tmp_path, flags, message):
    with pytest.raises(C.RefusalError, match=message):
        rco.main(env.base + flags + ["--out", str(tmp_path)])


def test_a_bad_model_exits_2_with_one_line(tmp_path):
    h, s, dim_file = train_files(tmp_path)
    argv = ["--model", str(tmp_path / "missing"), "--harmful", h, "--harmless", s, "--n-train", "4", "--n-val", "2",
            "--dim", dim_file, "--out", str(tmp_path / "out")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "rco.py", *argv], cwd=root, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
