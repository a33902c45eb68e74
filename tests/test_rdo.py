"""rdo.py and the COMPUTELOSS pieces of common.py: the three losses by hand, the sphere geometry, the schedule,
targets and their cache, RDO-perp, --init, --sign-warmup, --judge-refusals, resume, the DIM subprocess."""
import contextlib, io, json, math, os, shutil, subprocess
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common as C
import rdo
from conftest import HARMFUL, HARMLESS, interrupted_at_call, make_model, make_tokenizer, train_files


def full_logprobs(model, tok, prompt, target):
    ids = tok(C.format_chat(tok, [prompt])[0], add_special_tokens=False)["input_ids"] + list(target)
    return model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1), len(ids)


def reference_ce(logp, n, t):
    """Mean CE of target t, the last len(t) of n tokens: the logit at position j predicts token j + 1."""
    return -sum(logp[n - len(t) - 1 + j, x] for j, x in enumerate(t)) / len(t)


def reference_kl(logp, logq, n, t):
    """KL(P || Q) = sum p log(p / q), averaged over the last template token and every retain token."""
    pos = range(n - len(t) - 1, n)
    return sum((logp[j].exp() * (logp[j] - logq[j])).sum() for j in pos) / len(pos)


def reference_loss(model, tok, r, harm, safe, tg, alpha, layer, lam):
    """Algorithm 1's COMPUTELOSS written plainly: one example at a time, each loss its own full forward pass."""
    total = 0.0
    for i in range(len(harm)):
        with C.directional_ablation(model, r):                                        # line 3
            abl = reference_ce(*full_logprobs(model, tok, harm[i], tg["answer"][i]), tg["answer"][i])
        with C.activation_addition(model, alpha * r / r.norm(), layer):               # line 4
            add = reference_ce(*full_logprobs(model, tok, safe[i], tg["refusal"][i]), tg["refusal"][i])
        logp, n = full_logprobs(model, tok, safe[i], tg["retain"][i])                 # line 5
        with C.directional_ablation(model, r):
            logq, _ = full_logprobs(model, tok, safe[i], tg["retain"][i])
        ret = reference_kl(logp, logq, n, tg["retain"][i])
        total = total + lam["abl"] * abl + lam["add"] * add + lam["ret"] * ret        # line 6
    return total / len(harm)


TG = {"answer": [[40, 41, 42], [43, 44], [45, 46, 47, 48]], "refusal": [[45], [46, 47, 48, 49], [50, 51]],
      "retain": [[50, 51], [52, 53, 54], [55]]}


def examples(tg=TG, n=3):
    return list(zip(HARMFUL[:n], HARMLESS[:n], tg["answer"], tg["refusal"], tg["retain"]))


def loss_state(model, tok, micro_batch=2, alpha=3.0, layer=1):
    """What rdo.compute_loss reads from training_setup's namespace."""
    return SimpleNamespace(model=model, tok=tok, micro_batch=micro_batch, device=torch.device("cpu"), alpha=alpha,
                           layer=layer)


# ----------------------------------------------------------------------------- the losses by hand

def test_ce_per_example_by_hand():
    model, tok = make_model("qwen2")
    targets = [[40, 41, 42], [50, 51, 52, 53, 54]]
    b = C.pack(tok, HARMFUL[:2], targets, "cpu")
    logits = C.target_logits(model, b)
    assert logits.shape[1] == 6  # the longest target + 1 positions only
    got = C.ce_per_example(logits, b)
    for i, (p, t) in enumerate(zip(HARMFUL[:2], targets)):
        assert got[i].item() == pytest.approx(reference_ce(*full_logprobs(model, tok, p, t), t).item(), rel=1e-4)


def test_kl_is_kl_of_p_from_q_on_asymmetric_logits():
    """KL(P || Q) = sum p log(p / q) over the last axis, by hand; KL(Q || P) differs by 5% or more on each row."""
    p_logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [2.0, 0.0, -1.0, 0.5]], dtype=torch.float64)
    q_logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 2.0, 0.0], [0.0, 1.5, 0.0, -2.0]], dtype=torch.float64)
    for pl, ql, got in zip(p_logits, q_logits, C.kl(p_logits, q_logits)):
        p = [math.exp(x) / sum(math.exp(y) for y in pl.tolist()) for x in pl.tolist()]
        q = [math.exp(x) / sum(math.exp(y) for y in ql.tolist()) for x in ql.tolist()]
        hand, other = (sum(a * math.log(a / b) for a, b in zip(p, q)), sum(b * math.log(b / a) for a, b in zip(p, q)))
        assert got.item() == pytest.approx(hand, rel=1e-12)
        assert abs(hand - other) > 0.05 * hand  # asymmetric: swapped arguments cannot pass
    assert C.kl(p_logits.float(), q_logits.float()).dtype == torch.float32


def strong_direction(model, tok):
    """The mean block input of layer 2 on harmless prompts: ablating it changes the logits a lot (a large KL,
    unlike a random direction's ~1e-4, so that KL(P || Q) and KL(Q || P) differ clearly)."""
    with C.block_inputs(model) as seen:
        C.forward(model, C.tokenize(tok, HARMLESS[:4]))
    return seen[2].mean(0)


def test_retain_loss_is_kl_of_the_clean_from_the_ablated_model_by_hand():
    """Line 5 in float64 against the transcription, tight: the ablated-from-clean direction (the swap) would be
    off by far more than the tolerance. Every retain token and the last template token count."""
    model, tok = make_model("qwen2")
    model.double()
    model.lm_head.weight.data *= 10  # logits of a trained model's size, not a random one's near-uniform ones
    r = strong_direction(model, tok)
    targets = [[60, 61, 62, 63], [70, 71], [72]]
    got = C.retain_loss(model, r, C.pack(tok, HARMLESS[:3], targets, "cpu"))
    for i, (p, t) in enumerate(zip(HARMLESS[:3], targets)):
        logp, n = full_logprobs(model, tok, p, t)
        with C.directional_ablation(model, r):
            logq, _ = full_logprobs(model, tok, p, t)
        hand, swapped = reference_kl(logp, logq, n, t).item(), reference_kl(logq, logp, n, t).item()
        assert hand > 0.1 and abs(hand - swapped) > 1e-3 * hand
        assert got[i].item() == pytest.approx(hand, rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_loss_and_gradient_match_the_plain_algorithm(family):
    """rdo.compute_loss against the transcription above, at every micro-batch size, fp32 tolerance; lambda_add 0
    too (--lambda-add 0 and --sign-warmup's steps). The transcription's three terms are differentiated apart
    (the gradient is linear in the lambdas), so that it runs once."""
    model, tok = make_model(family)
    torch.manual_seed(0)
    r = torch.randn(C.hidden_size(model))
    ref, grads = {}, {}
    for k in ("abl", "add", "ret"):
        rk = r.clone().requires_grad_(True)
        ref[k] = reference_loss(model, tok, rk, HARMFUL[:3], HARMLESS[:3], TG, 3.0, 1,
                                {j: float(j == k) for j in ("abl", "add", "ret")})
        ref[k].backward()
        ref[k], grads[k] = ref[k].item(), rk.grad
    for lambda_add in (0.2, 0.0):
        lam = {"abl": 1.0, "add": lambda_add, "ret": 1.0}
        for micro_batch in (1, 2, 3):
            r1 = r.clone().requires_grad_(True)
            sums = rdo.compute_loss(loss_state(model, tok, micro_batch), r1, examples(), (1.0, lambda_add, 1.0))
            for k in lam:
                # each term reported, even where weighted 0; the retain KL (~2e-4 here) to fp32's absolute rounding
                assert sums[k] == pytest.approx(ref[k], rel=1e-4, abs=3e-7), (k, micro_batch)
            torch.testing.assert_close(r1.grad, sum(lam[k] * grads[k] for k in lam), rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- the sphere and the schedule

def test_tangent_projection_row_by_row_and_renormalisation():
    r = F.normalize(torch.randn(16), dim=0)
    g = torch.randn(16)
    t = C.tangent(g, r)
    assert abs((t @ r).item()) < 1e-6
    torch.testing.assert_close(g - t, (g @ r) * r)  # only the radial part is removed
    basis = F.normalize(torch.randn(3, 16), dim=1)  # rco.py's case: each row on its own sphere
    G = torch.randn(3, 16)
    T = C.tangent(G, basis)
    for i in range(3):
        torch.testing.assert_close(T[i], C.tangent(G[i], basis[i]))
        assert abs((T[i] @ basis[i]).item()) < 1e-6
    ortho = C.unit_basis(torch.randn(2, 16))
    assert (ortho @ rdo.project_out(r, ortho)).abs().max() < 1e-6


def test_sphere_step_clips_the_tangent_gradient():
    r0 = F.normalize(torch.randn(16), dim=0)
    g = torch.randn(16) * 100
    t = C.tangent(g, r0)
    for max_norm, scale in ((None, 1.0), (2.0, 2.0 / t.norm().item()), (1e9, 1.0)):
        r = r0.clone().requires_grad_(True)
        r.grad = g.clone()
        opt = torch.optim.SGD([r], lr=1.0)  # one plain step: r moves by exactly the (clipped) tangent gradient
        with torch.no_grad():
            norm = C.sphere_step(opt, r, max_norm)
        assert norm == pytest.approx(t.norm().item(), rel=1e-6)  # the norm before clipping, for the history
        torch.testing.assert_close(r0 - r.detach(), t * scale)


def test_plateau_drops_the_lr_then_stops():
    r = torch.zeros(4, requires_grad=True)
    opt = torch.optim.AdamW([r], lr=0.01)
    st = {"best": math.inf, "bad": 0, "drops": 0}
    losses = [5, 4, 3] + [3.5] * 5 + [2.9] + [3] * 5 + [3] * 5
    lrs, stops = [], []
    for x in losses:
        stops.append(C.plateau(st, x, opt, patience=5, max_drops=2))
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:7] == [0.01] * 7 and lrs[7] == pytest.approx(1e-3)  # the 5th step without a new best
    assert lrs[8] == pytest.approx(1e-3)  # 2.9 is a new best
    assert lrs[13] == pytest.approx(1e-4) and stops.index(True) == 18 and not any(stops[:18])


def test_batch_order_never_straddles_two_shuffles():
    g = torch.Generator().manual_seed(0)
    order = C.batch_order(10, 4, 3, g)
    assert len(order) == 24  # 2 whole batches per epoch; the 2 pairs left over sit that epoch out
    for batch in order.view(-1, 4):
        assert len(set(batch.tolist())) == 4
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)  # whole batches: plain shuffles
    assert torch.equal(C.batch_order(16, 4, 2, g1), torch.cat([torch.randperm(16, generator=g2) for _ in range(2)]))


def test_choose_sign_keeps_the_mirror_image_with_the_lower_addition_loss():
    model, tok = make_model("llama")
    tg = {"refusal": [[45], [46, 47], [48, 49, 50]], "other": [[40], [41], [42]]}
    batch = list(zip(HARMFUL[:3], HARMLESS[:3], tg["other"], tg["refusal"], tg["other"]))
    b = C.pack(tok, HARMLESS[:3], tg["refusal"], "cpu")
    loss = lambda v: C.addition_loss(model, v, b, 3.0, 1).mean().item()  # by hand: all three rows in one pass
    S = loss_state(model, tok)
    r0 = F.normalize(torch.randn(C.hidden_size(model), generator=torch.Generator().manual_seed(0)), dim=0)
    seen = []
    for start in (r0, -r0):  # one of the two starts flips, the other stays
        r = start.clone().requires_grad_(True)
        opt = torch.optim.AdamW([r], lr=0.01)
        r.grad = torch.randn_like(r)
        opt.step()
        before, moment = r.detach().clone(), opt.state[r]["exp_avg"].clone()
        with torch.no_grad():
            flipped = rdo.choose_sign(S, r, opt, batch)
        assert flipped == (loss(-before) < loss(before))
        assert torch.equal(r.detach(), -before if flipped else before)
        assert torch.equal(opt.state[r]["exp_avg"], -moment if flipped else moment)
        assert loss(r.detach()) <= loss(-r.detach())
        with torch.no_grad():
            assert not rdo.choose_sign(S, r, opt, batch)  # a second look keeps it
        seen.append(flipped)
    assert seen[0] != seen[1]


# ----------------------------------------------------------------------------- selection

def stub_scores(monkeypatch, table):
    """C.score_direction answering from table[first coordinate of the (alpha-scaled) direction]."""
    monkeypatch.setattr(C, "score_direction", lambda model, tok, v, *a: dict(table[int(round(v[0].item()))]))


def selection_args(*extra):
    return rdo.p.parse_args(["--model", "x", *extra])


def test_selection_looks_at_the_last_iterates_only(monkeypatch):
    model, tok = make_model("llama")
    bypass = [-9.0, -1.0, -2.0, -3.0, -1.5]  # step 0 is the best overall, but not among the last two
    stub_scores(monkeypatch, {i: {"bypass": b, "induce": 1.0, "kl": 0.0} for i, b in enumerate(bypass)})
    iterates = [torch.full((32,), float(i)) for i in range(5)]
    scored = C.score_iterates(model, tok, iterates, 1.0, 1, HARMFUL[:2], HARMLESS[:2], [40],
                              selection_args("--select-last", "2"))
    assert [s["step"] for s in scored] == [3, 4] and C.lowest_bypass(scored)["step"] == 3


def test_selection_falls_back_to_the_kl_filter_then_to_anything(monkeypatch):
    model, tok = make_model("llama")
    table = {0: {"bypass": -5.0, "induce": -1.0, "kl": 0.5}, 1: {"bypass": -3.0, "induce": -1.0, "kl": 0.05},
             2: {"bypass": -1.0, "induce": 1.0, "kl": 0.05}}
    stub_scores(monkeypatch, table)
    pick = lambda: C.lowest_bypass(C.score_iterates(model, tok, [torch.full((32,), float(i)) for i in table], 1.0, 1,
                                                    HARMFUL[:2], HARMLESS[:2], [40], selection_args()))["step"]
    assert pick() == 2  # the only one passing every filter, although its bypass is the worst
    table[2]["induce"] = -1.0
    assert pick() == 1  # none passes every filter: lowest bypass among those within the KL bound
    table[1]["kl"] = table[2]["kl"] = 0.5
    assert pick() == 0
    nan = {"bypass": math.nan, "induce": math.nan, "kl": math.nan}
    stub_scores(monkeypatch, {0: nan, 1: nan, 2: nan})
    assert C.lowest_bypass(C.score_iterates(model, tok, [torch.zeros(32)] * 3, 1.0, 1, HARMFUL[:2], HARMLESS[:2],
                                            [40], selection_args())) is None


# ----------------------------------------------------------------------------- targets

def test_judged_refusals_replaces_answers_by_refusals_in_turn():
    tok = make_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    texts = ["I'm sorry, I can't.", "Sure: 1.", "1. Eggs", "As an AI, I cannot.", "Here.", "</s>", "<s>I am sorry."]
    targets, replaced = C.judged_refusals(tok, [ids(t) for t in texts])
    # an empty target (special tokens only) is an answer: replaced, never copied
    want = [texts[0], texts[0], texts[3], texts[3], texts[6], texts[0], texts[6]]
    assert [tok.decode(t) for t in targets] == want and replaced == 4
    assert C.judged_refusals(tok, targets) == (targets, 0)  # only refusals: nothing to replace
    with pytest.raises(C.RefusalError, match="no refusal target to train on: run without the flag"):
        C.judged_refusals(tok, [ids("Sure."), ids("1. Eggs")])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One targets cache for the module's end-to-end runs: they share prompts, DIM and budgets."""
    return str(tmp_path_factory.mktemp("targets"))


def make_base(tiny_dir, tmp, cache):
    h, s, dim_file = train_files(tmp, repeat=3)
    base = ["--model", tiny_dir, "--harmful", h, "--harmless", s, "--n-train", "16", "--n-val", "4",
            "--dim", dim_file, "--effective-batch", "4", "--micro-batch", "2", "--dtype", "float32",
            "--answer-tokens", "4", "--retain-tokens", "3", "--refusal-target-tokens", "4", "--refusal-tokens", "I",
            "--select-last", "3", "--cache", cache, "--lr", "0.05"]
    return base, dim_file


@pytest.fixture
def setup(tiny_dir, tmp_path, cache_dir):
    base, dim_file = make_base(tiny_dir, tmp_path, cache_dir)
    return base, tmp_path, dim_file


def test_targets_are_cached_under_the_dim_direction(setup, tmp_path, monkeypatch):
    base, tmp, _ = setup
    args = rdo.p.parse_args(base + ["--cache", str(tmp_path / "own")])
    model, tok = make_model("llama")
    calls, real = [], C.generate_ids
    monkeypatch.setattr(C, "generate_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    v = torch.randn(C.hidden_size(model))
    t1 = C.get_targets(model, tok, HARMFUL[:3], HARMLESS[:3], v, 1, args)
    assert len(calls) == 3 and len(t1["answer"]) == 3
    assert C.get_targets(model, tok, HARMFUL[:3], HARMLESS[:3], v, 1, args) == t1 and len(calls) == 3  # cache hit
    C.get_targets(model, tok, HARMFUL[:3], HARMLESS[:3], v + 1e-3, 1, args)  # another DIM: another key
    assert len(calls) == 6 and len(os.listdir(args.cache)) == 2
    monkeypatch.setitem(C.GREEDY, "repetition_penalty", 1.1)  # other decoding options: other targets
    C.get_targets(model, tok, HARMFUL[:3], HARMLESS[:3], v, 1, args)
    assert len(calls) == 9 and len(os.listdir(args.cache)) == 3


def test_targets_are_generated_under_the_right_interventions(setup, tmp_path, monkeypatch):
    """t_answer with DIM ablated, t_refusal with alpha_DIM * r_hat_DIM added at the DIM layer, cut before its first
    '.' (the period dropped; the whole text where nothing precedes it) and re-tokenized, t_retain with no
    intervention; every budget and the layer are part of the cache key."""
    base, tmp, _ = setup
    model, tok = make_model("llama")
    v = torch.randn(C.hidden_size(model))
    active, seen = [], []

    def intervention(name):  # a stand-in hook context that records what it was asked to do while it is active
        @contextlib.contextmanager
        def ctx(model, vec, *rest):
            active.append((name, vec, *rest))
            yield
            active.pop()
        return ctx
    monkeypatch.setattr(C, "directional_ablation", intervention("ablate"))
    monkeypatch.setattr(C, "activation_addition", intervention("add"))
    texts = ["I can't. More text", ". A dot first", "no period at all", "</s>"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    monkeypatch.setattr(C, "generate_ids", lambda model, tok, prompts, n, *a, **k: seen.append(
        (list(active), prompts, n)) or [list(ids[i]) for i in range(len(prompts))])
    args = rdo.p.parse_args(base + ["--cache", str(tmp_path / "own")])
    t = C.get_targets(model, tok, HARMFUL[:4], HARMLESS[:4], v, 3, args)
    (abl, p1, n1), (add, p2, n2), (ret, p3, n3) = seen
    assert abl[0][0] == "ablate" and torch.equal(abl[0][1], v) and p1 == HARMFUL[:4] and n1 == args.answer_tokens
    assert add[0][0] == "add" and torch.equal(add[0][1], v) and add[0][2] == 3 and p2 == HARMLESS[:4]
    assert ret == [] and p3 == HARMLESS[:4] and n3 == args.retain_tokens and n2 == args.refusal_target_tokens
    assert [tok.decode(x) for x in t["refusal"]] == ["I can't", ". A dot first", "no period at all", "</s>"]
    assert t["refusal"][3] == [tok.eos_token_id]  # an empty text: one end token, never an empty target
    assert t["answer"] == ids and t["retain"] == ids  # token ids as generated
    for other in (["--answer-tokens", "5"], ["--retain-tokens", "5"], ["--refusal-target-tokens", "5"]):
        C.get_targets(model, tok, HARMFUL[:4], HARMLESS[:4], v, 3, rdo.p.parse_args(base + other + [
            "--cache", args.cache]))
    C.get_targets(model, tok, HARMFUL[:4], HARMLESS[:4], v, 2, args)  # another layer
    assert len(seen) == 15 and len(os.listdir(args.cache)) == 5


# ----------------------------------------------------------------------------- the script

def result(folder):
    return C.load_result(str(folder / "rdo.safetensors"))[0], json.load(open(folder / "rdo.json"))


def test_rdo_perp_stays_orthogonal_and_the_schedule_watches_the_unweighted_sum(setup, monkeypatch):
    base, tmp, dim_file = setup
    watched, real = [], C.plateau
    monkeypatch.setattr(C, "plateau", lambda st, loss, *a: watched.append(loss) or real(st, loss, *a))
    rdo.main(base + ["--out", str(tmp / "perp"), "--orthogonal-to", dim_file, "--max-steps", "3"])
    d, meta = result(tmp / "perp")
    v, _ = C.load_result(dim_file)
    cos = (d["direction"] @ v["direction"]).abs() / v["direction"].norm()
    assert cos < 1e-5 and meta["max_abs_cos_with_orthogonal_to"] < 1e-5
    assert d["direction"].norm().item() == pytest.approx(1.0, abs=1e-5)
    assert len(meta["history"]) == 3 and meta["chosen_step"] in (0, 1, 2)
    assert not os.path.exists(tmp / "perp" / "rdo_checkpoint.pt")
    assert meta["refusal_tokens"]["source"] == "given" and meta["refusal_tokens"]["words"] == ["I"]
    # the authors' schedule: L_abl + L_add + L_ret, not the weighted L that is logged as "loss"
    assert watched == pytest.approx([h["abl"] + h["add"] + h["ret"] for h in meta["history"]], rel=1e-12)
    assert all(h["loss"] == pytest.approx(h["abl"] + 0.2 * h["add"] + h["ret"]) for h in meta["history"])
    assert all(w != pytest.approx(h["loss"]) for w, h in zip(watched, meta["history"]))


def test_resume_reaches_the_same_direction(setup):
    base, tmp, _ = setup
    rdo.main(base + ["--out", str(tmp / "full")])
    full, meta_full = result(tmp / "full")
    assert len(meta_full["history"]) == 4  # 16 pairs / effective batch 4, one epoch

    with interrupted_at_call(C, "plateau", 3):  # after the step of step 2, before its checkpoint
        rdo.main(base + ["--out", str(tmp / "part")])
    ck = torch.load(tmp / "part" / "rdo_checkpoint.pt", weights_only=False)
    assert ck["state"]["step"] == 2  # lost only the interrupted step: the checkpoint is the last good one
    assert not [f for f in os.listdir(tmp / "part") if ".tmp" in f]  # atomic: no partial file left behind
    with pytest.raises(C.RefusalError, match="unfinished run"):
        rdo.main(base + ["--out", str(tmp / "part")])
    rdo.main(base + ["--out", str(tmp / "part"), "--resume"])
    part, meta_part = result(tmp / "part")
    torch.testing.assert_close(part["direction"], full["direction"], rtol=0, atol=1e-6)
    torch.testing.assert_close(part["iterates"], full["iterates"], rtol=0, atol=1e-6)  # the resumed run's too
    assert full["iterates"].shape == (4, full["direction"].numel())  # every step's r, for choosing again
    assert torch.equal(full["iterates"][meta_full["chosen_step"]], full["direction"])
    assert full["iterates"].norm(dim=1).sub(1).abs().max() < 1e-5
    losses = lambda meta: [h["loss"] for h in meta["history"]]
    assert losses(meta_part) == pytest.approx(losses(meta_full), rel=1e-6)
    assert not os.path.exists(tmp / "part" / "rdo_checkpoint.pt")

    # --max-steps is not part of the resume key: a run cut short resumes further, to the uninterrupted run's end
    with interrupted_at_call(C, "plateau", 2):
        rdo.main(base + ["--out", str(tmp / "short"), "--max-steps", "2"])
    rdo.main(base + ["--out", str(tmp / "short"), "--resume"])
    torch.testing.assert_close(result(tmp / "short")[0]["iterates"], full["iterates"], rtol=0, atol=1e-6)


def test_a_crash_while_writing_the_checkpoint_leaves_the_last_one(setup, monkeypatch):
    """The checkpoint is written beside it, then renamed: a crash half-way through step 1's leaves step 0's."""
    base, tmp, _ = setup
    real, saves = torch.save, []

    def crash_on_the_second(obj, path, *a, **k):
        saves.append(path)
        if len(saves) == 2:
            open(path, "wb").write(b"half a checkpoint")
            raise KeyboardInterrupt
        return real(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        rdo.main(base + ["--out", str(tmp / "crash"), "--max-steps", "2"])
    monkeypatch.setattr(torch, "save", real)
    assert os.listdir(tmp / "crash") == ["rdo_checkpoint.pt"]  # no half-written file left
    assert torch.load(tmp / "crash" / "rdo_checkpoint.pt", weights_only=False)["state"]["step"] == 1
    rdo.main(base + ["--out", str(tmp / "crash"), "--max-steps", "2", "--resume"])
    assert len(result(tmp / "crash")[1]["history"]) == 2


@pytest.fixture(scope="module")
def interrupted(tiny_dir, tmp_path_factory, cache_dir):
    """One run with the authors' amsgrad, interrupted after its first step: the checkpoint that the resume tests
    below try to continue with other settings."""
    tmp = tmp_path_factory.mktemp("interrupted")
    base, dim_file = make_base(tiny_dir, tmp, cache_dir)
    with interrupted_at_call(C, "plateau", 2):
        rdo.main(base + ["--out", str(tmp / "c"), "--amsgrad"])
    return base, tmp, dim_file


OTHER_SETTINGS = [
    (["--lr", "0.001"], "lr"), (["--seed", "1"], "seed"), (["--lambda-ret", "2"], "lambda_ret"),
    (["--lambda-add", "1"], "lambda_add"), (["--n-train", "12"], "n_train"), (["--epochs", "2"], "epochs"),
    (["--sign-warmup", "2"], "sign_warmup"), (["--judge-refusals"], "judge_refusals"),
    (["--patience", "9"], "patience"), (["--betas", "0.9", "0.99"], "betas"), (["--alpha", "2"], "alpha"),
    (["--answer-tokens", "5"], "answer_tokens"), (["--refusal-tokens", "As"], "refusal_tokens"),
    (["--orthogonal-to", "DIM"], "orthogonal_to"), (["--dtype", "bfloat16"], "dtype: 'torch.float32' there"),
    (None, "amsgrad: True there, False now")]


@pytest.mark.parametrize("other, named", OTHER_SETTINGS, ids=[n.split(":")[0] for _, n in OTHER_SETTINGS])
def test_resume_refuses_a_checkpoint_of_other_settings(interrupted, other, named, monkeypatch):
    base, tmp, dim_file = interrupted
    monkeypatch.setattr(C, "is_refusal", lambda text: True)  # every t_refusal a refusal, for --judge-refusals
    extra = [] if other is None else ["--amsgrad"] + [dim_file if x == "DIM" else x for x in other]
    with pytest.raises(C.RefusalError, match=f"other settings \\(.*{named}"):  # resuming must not change the run
        rdo.main(base + ["--out", str(tmp / "c"), "--resume"] + extra)
    assert os.path.isfile(tmp / "c" / "rdo_checkpoint.pt")  # refused: the checkpoint is left as it was


def test_the_authors_optimizer_settings_are_used_recorded_and_resumed(interrupted, setup, monkeypatch):
    base, tmp, _ = interrupted
    ck = torch.load(tmp / "c" / "rdo_checkpoint.pt", weights_only=False)
    group = ck["opt"]["param_groups"][0]
    assert group["amsgrad"] is True and group["weight_decay"] == 0 and group["lr"] == 0.05
    assert tuple(group["betas"]) == (0.9, 0.98) and "max_exp_avg_sq" in ck["opt"]["state"][0]
    copy = setup[1] / "c"
    shutil.copytree(tmp / "c", copy)  # the out folder is not part of the run: resume a copy
    rdo.main(base + ["--out", str(copy), "--resume", "--amsgrad"])
    assert os.path.isfile(copy / "rdo.safetensors") and not os.path.exists(copy / "rdo_checkpoint.pt")

    base, tmp, _ = setup
    clips, real = [], C.sphere_step
    monkeypatch.setattr(C, "sphere_step", lambda opt, p, max_norm: clips.append(max_norm) or real(opt, p, max_norm))
    rdo.main(base + ["--out", str(tmp / "a"), "--betas", "0.8", "0.9", "--max-grad-norm", "0.5", "--max-steps", "2"])
    assert clips == [0.5, 0.5]
    meta = result(tmp / "a")[1]
    assert meta["args"]["betas"] == [0.8, 0.9] and meta["args"]["max_grad_norm"] == 0.5
    assert all(h["grad_norm"] > 0 for h in meta["history"])  # the unclipped norm: shows whether clipping acted


def test_same_seed_same_direction_other_seed_another(setup):
    base, tmp, _ = setup
    short = base + ["--max-steps", "2"]
    rdo.main(short + ["--out", str(tmp / "a")])
    rdo.main(short + ["--out", str(tmp / "b")])
    rdo.main(short + ["--out", str(tmp / "c"), "--seed", "1"])
    a, b, c = (result(tmp / x)[0]["direction"] for x in "abc")
    assert torch.equal(a, b)
    assert (a @ c).abs() < 0.9
    assert result(tmp / "a")[1]["seed"] == 0 and result(tmp / "c")[1]["seed"] == 1


def test_init_starts_from_the_given_direction_with_the_same_batches(setup, monkeypatch):
    base, tmp, dim_file = setup
    still = base + ["--max-steps", "2", "--lr", "0"]  # lr 0: the iterates stay where they started
    batches, real = [], rdo.compute_loss
    monkeypatch.setattr(rdo, "compute_loss", lambda S, r, ex, lam: batches.append([e[:2] for e in ex]) or real(
        S, r, ex, lam))
    rdo.main(still + ["--out", str(tmp / "dim"), "--init", "dim"])
    v = C.load_result(dim_file)[0]["direction"]
    other = C.save_result(str(tmp / "other"), "x", {"direction": torch.randn(v.shape[0]) * 3}, {})
    rdo.main(still + ["--out", str(tmp / "file"), "--init", other])
    rdo.main(still + ["--out", str(tmp / "random")])
    its = {k: result(tmp / k)[0]["iterates"] for k in ("dim", "file", "random")}
    w = C.load_result(other)[0]["direction"]
    assert torch.allclose(its["dim"], (v / v.norm()).expand(2, -1), atol=1e-6)
    assert torch.allclose(its["file"], (w / w.norm()).expand(2, -1), atol=1e-6)
    assert (its["random"][0] @ v / v.norm()).abs() < 0.9
    history = {k: result(tmp / k)[1]["history"] for k in ("dim", "random")}
    assert history["dim"][0]["loss"] != history["random"][0]["loss"]  # another start ...
    assert result(tmp / "dim")[1]["init"] == "dim"  # ... recorded in the sidecar
    assert batches[:2] == batches[2:4] == batches[4:6] and len(batches) == 6  # the seed's batches, whatever the start


def test_selection_scores_the_validation_prompts_the_filter_keeps(setup, monkeypatch):
    """As dim.py: harmful validation prompts the model refuses, harmless ones it answers; all with --no-filter, and
    all where the filter keeps none."""
    base, tmp, _ = setup
    seen, real = [], C.score_iterates
    monkeypatch.setattr(C, "score_iterates", lambda m, t, its, a, l, hv, sv, *r, **k: seen.append((hv, sv)) or real(
        m, t, its, a, l, hv, sv, *r, **k))
    keep = {True: lambda ps: ps[:1], False: lambda ps: ps[1:]}  # harmful: the first prompt; harmless: the others
    monkeypatch.setattr(C, "filter_prompts", lambda model, tok, ps, ids, harmful, bs: keep[harmful](ps))
    for name, extra in (("kept", []), ("all", ["--no-filter"])):
        rdo.main(base + ["--max-steps", "2", "--out", str(tmp / name)] + extra)
    keep[True] = lambda ps: []
    rdo.main(base + ["--max-steps", "2", "--out", str(tmp / "none")])
    (hv, sv), (hv_all, sv_all), (hv_none, _) = seen
    assert hv == hv_all[:1] and sv == sv_all[1:] and hv_none == hv_all and len(hv_all) > 1
    assert result(tmp / "kept")[1]["data"]["harmful_val"] == 1 and result(tmp / "all")[1]["args"]["no_filter"]


def test_sign_warmup_trains_without_the_addition_loss_then_chooses_the_sign(setup):
    base, tmp, _ = setup
    rdo.main(base + ["--max-steps", "3", "--sign-warmup", "2", "--out", str(tmp / "w")])
    rdo.main(base + ["--max-steps", "3", "--lambda-add", "0", "--out", str(tmp / "a0")])
    (w, meta), (a0, _) = result(tmp / "w"), result(tmp / "a0")
    w, a0 = w["iterates"], a0["iterates"]
    flipped = meta["history"][1]["flipped"]
    assert meta["sign_warmup"] == 2 and "flipped" not in meta["history"][0]
    torch.testing.assert_close(w[0], a0[0])  # the warm-up's steps are lambda_add 0's ...
    torch.testing.assert_close(w[1], -a0[1] if flipped else a0[1])  # ... up to the chosen sign
    assert (w[2] @ a0[2]).abs() < 1 - 1e-4  # ... and then the addition loss is back
    with pytest.raises(C.RefusalError, match="--sign-warmup 3: give 0"):
        rdo.main(base + ["--max-steps", "3", "--sign-warmup", "3", "--out", str(tmp / "x")])
    for h in meta["history"]:  # the logged loss is still the paper's L, addition term included
        assert h["loss"] == pytest.approx(h["abl"] + 0.2 * h["add"] + h["ret"])


def test_sign_warmup_schedule_watches_what_trains_and_a_stop_inside_it_still_chooses_the_sign(setup, monkeypatch):
    base, tmp, _ = setup
    real, seen = C.plateau, []
    spy = lambda state, loss, *a: seen.append((state["best"], loss)) or real(state, loss, *a)
    monkeypatch.setattr(C, "plateau", spy)
    rdo.main(base + ["--max-steps", "3", "--sign-warmup", "2", "--out", str(tmp / "w")])
    h = result(tmp / "w")[1]["history"]
    assert [x for _, x in seen] == pytest.approx([h[0]["abl"] + h[0]["ret"], h[1]["abl"] + h[1]["ret"],
                                                  h[2]["abl"] + h[2]["add"] + h[2]["ret"]])
    assert seen[2][0] == float("inf")  # the schedule starts over when the addition loss joins
    monkeypatch.setattr(C, "plateau", lambda *a: True)  # a plateau stop inside the warm-up ...
    rdo.main(base + ["--max-steps", "3", "--sign-warmup", "2", "--out", str(tmp / "s")])
    h = result(tmp / "s")[1]["history"]
    assert len(h) == 1 and "flipped" in h[0]  # ... still leaves r the sign with the lower addition loss


def test_judge_refusals_trains_on_refusal_targets_only(setup, monkeypatch):
    """The tiny model's targets are all alike: here t_refusal number i is "R<i>" and a stand-in judge calls every
    third one an answer."""
    base, tmp, _ = setup
    real_targets, seen, real_loss = C.get_targets, [], rdo.compute_loss

    def targets(model, tok, *a):
        t = real_targets(model, tok, *a)
        t["refusal"] = [tok(f"R{i}", add_special_tokens=False)["input_ids"] for i in range(len(t["refusal"]))]
        return t
    answer = lambda text: int(text[1:]) % 3 == 0
    monkeypatch.setattr(C, "get_targets", targets)
    monkeypatch.setattr(C, "is_refusal", lambda text: not answer(text))
    monkeypatch.setattr(rdo, "compute_loss", lambda S, r, ex, lam: seen.extend(
        S.tok.decode(e[3]) for e in ex) or real_loss(S, r, ex, lam))
    with interrupted_at_call(C, "plateau", 2):  # and a resumed run replaces them too
        rdo.main(base + ["--max-steps", "3", "--judge-refusals", "--out", str(tmp / "j")])
    rdo.main(base + ["--max-steps", "3", "--judge-refusals", "--out", str(tmp / "j"), "--resume"])
    assert len(seen) == 16 and not any(map(answer, seen))  # steps 0, 1, 1 again after the interruption, 2
    meta = result(tmp / "j")[1]
    assert meta["args"]["judge_refusals"] and meta["refusal_targets_replaced"] == 6  # R0, R3, ..., R15
    seen.clear()
    rdo.main(base + ["--max-steps", "3", "--out", str(tmp / "p")])  # the paper's targets: answers among them
    assert any(map(answer, seen)) and result(tmp / "p")[1]["refusal_targets_replaced"] is None


# ----------------------------------------------------------------------------- errors

def test_init_errors(setup):
    base, tmp, dim_file = setup
    with pytest.raises(C.RefusalError, match="span of --orthogonal-to"):
        rdo.main(base + ["--out", str(tmp / "a"), "--init", "dim", "--orthogonal-to", dim_file, "--max-steps", "1"])
    d = C.load_result(dim_file)[0]["direction"].shape[0]
    two = C.save_result(str(tmp / "two"), "x", {"directions": torch.randn(2, d)}, {})
    with pytest.raises(C.RefusalError, match="holds 2 directions"):
        rdo.main(base + ["--out", str(tmp / "b"), "--init", two, "--max-steps", "1"])


def test_resume_and_data_errors(setup):
    base, tmp, _ = setup
    with pytest.raises(C.RefusalError, match="--resume: no checkpoint at"):
        rdo.main(base + ["--out", str(tmp / "none"), "--resume"])
    with pytest.raises(C.RefusalError, match="fewer than one effective batch"):
        rdo.main(base + ["--out", str(tmp / "few"), "--effective-batch", "32"])
    i = base.index("--dim")
    nolayer = C.save_result(str(tmp / "nolayer"), "dim", {"direction": torch.randn(32)}, {})
    with pytest.raises(C.RefusalError, match="has no layer in its sidecar"):
        rdo.main(base[:i] + base[i + 2:] + ["--dim", nolayer, "--out", str(tmp / "nl")])
    for flag in ("--effective-batch", "--micro-batch", "--patience", "--select-last", "--refusal-target-tokens"):
        with pytest.raises(C.RefusalError, match=f"{flag} must be at least 1"):
            rdo.main(base + [flag, "0", "--out", str(tmp / "zero")])
    rdo.main(base + ["--out", str(tmp / "done"), "--max-steps", "1"])
    with pytest.raises(C.RefusalError, match="already holds a rdo result: pass --overwrite"):
        rdo.main(base + ["--out", str(tmp / "done"), "--max-steps", "1"])


def test_wrong_size_dim_and_bad_layer(setup):
    base, tmp, _ = setup
    bad = C.save_result(str(tmp / "bad"), "dim", {"direction": torch.randn(7)}, {"layer": 1})
    with pytest.raises(C.RefusalError, match="hidden size"):
        rdo.main(base + ["--dim", bad, "--out", str(tmp / "x")])
    with pytest.raises(C.RefusalError, match="out of range"):
        rdo.main(base + ["--layer", "12", "--out", str(tmp / "y")])


def test_nan_loss_stops_with_a_clear_message(setup, monkeypatch):
    base, tmp, _ = setup
    monkeypatch.setattr(C, "ablation_loss", lambda model, r, b: (r.sum() * float("nan")).expand(len(b["input_ids"])))
    with pytest.raises(C.RefusalError, match="loss is nan at step 0: stopped; nothing was saved yet"):
        rdo.main(base + ["--out", str(tmp / "nan")])


def test_nan_gradient_stops_before_it_reaches_r(setup, monkeypatch):
    base, tmp, _ = setup
    real, calls = rdo.compute_loss, []

    def nan_gradient_at_step_1(S, r, *a):  # a finite loss with a NaN gradient (bf16 can do this)
        sums = real(S, r, *a)
        calls.append(1)
        if len(calls) == 2:
            r.grad[0] = float("nan")
        return sums
    monkeypatch.setattr(rdo, "compute_loss", nan_gradient_at_step_1)
    with pytest.raises(C.RefusalError, match="gradient is not finite .* at step 1: stopped; the last good state is in "
                                             ".*rdo_checkpoint.pt"):
        rdo.main(base + ["--out", str(tmp / "nangrad")])
    ck = torch.load(tmp / "nangrad" / "rdo_checkpoint.pt", weights_only=False)
    assert ck["state"]["step"] == 1 and torch.isfinite(ck["r"]).all()


def test_every_iterate_nan_in_the_selection_is_a_clear_error(setup, monkeypatch):
    base, tmp, _ = setup
    monkeypatch.setattr(C, "score_direction", lambda *a: {"bypass": math.nan, "induce": math.nan, "kl": math.nan})
    with pytest.raises(C.RefusalError, match="every iterate scored NaN"):
        rdo.main(base + ["--out", str(tmp / "nan"), "--max-steps", "1"])


# ----------------------------------------------------------------------------- DIM run by dim.py

def without_dim(base):
    i = base.index("--dim")
    return base[:i] + base[i + 2:]


def test_with_dim_given_dim_py_does_not_run(setup, monkeypatch):
    base, tmp, _ = setup
    calls, real = [], subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k: calls.append(cmd) or real(cmd, *a, **k))
    rdo.main(base + ["--out", str(tmp / "d"), "--max-steps", "1"])
    assert not [c for c in calls if any(str(x).endswith("dim.py") for x in c)]


def test_without_dim_rdo_runs_dim_py_with_its_flags_and_uses_its_direction(setup, monkeypatch):
    """A stand-in dim.py that writes a direction: rdo passes it the data, seed, layer and refusal words, and
    trains from what it wrote (its layer; its refusal tokens where none are given)."""
    base, tmp, dim_file = setup
    seen, real = [], subprocess.Popen

    def fake_dim(cmd, *a, **k):
        if not str(cmd[1]).endswith("dim.py"):
            return real(cmd, *a, **k)
        seen.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        C.save_result(out, "dim", {"direction": 2 * C.load_result(dim_file)[0]["direction"]},
                      {"layer": 1, "refusal_tokens": {"words": ["As"]}})
        return SimpleNamespace(stderr=io.BytesIO(b"progress\n"), wait=lambda: 0)
    monkeypatch.setattr(subprocess, "Popen", fake_dim)
    base = without_dim(base)
    i = base.index("--refusal-tokens")
    rdo.main(base[:i] + base[i + 2:] + ["--layer", "1", "--max-steps", "1", "--out", str(tmp / "nodim")])
    (cmd,) = seen
    flags = " ".join(cmd)
    for want in ("--layer=1", "--n-train=16", "--n-val=4", "--seed=0", "--dtype=float32",
                 f"--out {tmp / 'nodim' / 'dim'}"):
        assert want in flags, want
    assert "--refusal-tokens" not in flags  # none given: dim.py finds the model's own
    meta = result(tmp / "nodim")[1]
    assert meta["layer"] == 1 and meta["dim"] == str(tmp / "nodim" / "dim" / "dim.safetensors")
    assert meta["alpha"] == pytest.approx(2 * C.load_result(dim_file)[0]["direction"].norm().item(), rel=1e-5)
    assert meta["refusal_tokens"] == {"source": "given", "words": ["As"], "tokens": ["A"]}  # dim.py's tokens


def test_a_failing_dim_py_is_a_one_line_error(setup, monkeypatch):
    """The real dim.py, in its own process: on the tiny random model its refusal-score filter keeps no harmful
    prompt, and rdo says so in one line."""
    base, tmp, _ = setup
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as this module's own runs (one_thread)
    with pytest.raises(C.RefusalError) as e:
        rdo.main(without_dim(base) + ["--layer", "1", "--max-steps", "1", "--out", str(tmp / "nodim")])
    msg = str(e.value)
    assert msg.startswith("dim.py failed (error: the refusal-score filter kept none") and "pass --dim" in msg
    assert "\n" not in msg
