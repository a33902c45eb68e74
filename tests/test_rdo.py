"""rdo.py: the three losses by hand, the sphere geometry, the schedule, targets cache, RDO-perp, resume."""
import contextlib, json, math, os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common as C
import rdo
from conftest import HARMFUL, HARMLESS, interrupted_at_call, make_model, train_files


def full_logprobs(model, tok, prompt, target):
    ids = tok(C.format_chat(tok, [prompt])[0], add_special_tokens=False)["input_ids"] + target
    return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1), len(ids)


def test_ce_per_example_by_hand():
    model, tok = make_model("qwen2")
    targets = [[40, 41, 42], [50, 51, 52, 53, 54]]
    batch = rdo.pack(tok, HARMFUL[:2], targets, "cpu")
    got = rdo.ce_per_example(rdo.window_logits(model, batch, 6), batch)
    for i, (p, t) in enumerate(zip(HARMFUL[:2], targets)):
        logp, n = full_logprobs(model, tok, p, t)
        # the logit at position j predicts token j + 1: the targets are predicted from n - len(t) - 1 .. n - 2
        hand = -sum(logp[n - len(t) - 1 + j, tok_id].item() for j, tok_id in enumerate(t)) / len(t)
        assert got[i].item() == pytest.approx(hand, rel=1e-4)


def test_retain_kl_by_hand_covers_the_last_template_token():
    model, tok = make_model("llama")
    r = torch.randn(C.hidden_size(model))
    targets = [[60, 61, 62, 63], [70, 71]]
    batch = rdo.pack(tok, HARMLESS[:2], targets, "cpu")
    clean = rdo.window_logits(model, batch, 5)
    with C.directional_ablation(model, r):
        abl = rdo.window_logits(model, batch, 5)
    got = rdo.kl_per_example(clean, abl, batch)
    for i, (p, t) in enumerate(zip(HARMLESS[:2], targets)):
        logp, n = full_logprobs(model, tok, p, t)
        with C.directional_ablation(model, r):
            logq, _ = full_logprobs(model, tok, p, t)
        pos = range(n - len(t) - 1, n)  # last template token + every retain token
        hand = sum((logp[j].exp() * (logp[j] - logq[j])).sum().item() for j in pos) / len(pos)
        assert got[i].item() == pytest.approx(hand, rel=1e-3)  # a small KL: fp32 differences of close numbers


def reference_loss(model, tok, r, harm, safe, tg, alpha, layer, lam):
    """Algorithm 1 written plainly: one example at a time, each loss its own full forward pass."""
    total = 0.0
    for i in range(len(harm)):
        with C.directional_ablation(model, r):
            logp, n = full_logprobs(model, tok, harm[i], tg["answer"][i])
        t = tg["answer"][i]
        abl = -sum(logp[n - len(t) - 1 + j, x] for j, x in enumerate(t)) / len(t)
        with C.activation_addition(model, alpha * r / r.norm(), layer):
            logp, n = full_logprobs(model, tok, safe[i], tg["refusal"][i])
        t = tg["refusal"][i]
        add = -sum(logp[n - len(t) - 1 + j, x] for j, x in enumerate(t)) / len(t)
        t = tg["retain"][i]
        logp, n = full_logprobs(model, tok, safe[i], t)
        with C.directional_ablation(model, r):
            logq, _ = full_logprobs(model, tok, safe[i], t)
        ret = sum((logp[j].exp() * (logp[j] - logq[j])).sum() for j in range(n - len(t) - 1, n)) / (len(t) + 1)
        total = total + lam["abl"] * abl + lam["add"] * add + lam["ret"] * ret
    return total / len(harm)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("micro_batch", [1, 2])
@pytest.mark.parametrize("lambda_add", [0.2, 0.0])  # 0: --lambda-add 0 and --sign-warmup's steps, no addition backward
def test_loss_and_gradient_match_the_plain_algorithm(family, micro_batch, lambda_add):
    model, tok = make_model(family)
    tg = {"answer": [[40, 41, 42], [43, 44], [45, 46, 47, 48]], "refusal": [[45], [46, 47, 48, 49], [50, 51]],
          "retain": [[50, 51], [52, 53, 54], [55]]}
    lam = {"abl": 1.0, "add": lambda_add, "ret": 1.0}
    batch = list(zip(HARMFUL[:3], HARMLESS[:3], tg["answer"], tg["refusal"], tg["retain"]))
    torch.manual_seed(0)
    r1 = torch.randn(C.hidden_size(model)).requires_grad_(True)
    sums = rdo.loss_and_grad(model, tok, r1, batch, 3.0, 1, lam, micro_batch)
    r2 = r1.detach().clone().requires_grad_(True)
    ref = reference_loss(model, tok, r2, HARMFUL[:3], HARMLESS[:3], tg, 3.0, 1, lam)
    ref.backward()
    assert sums["loss"] == pytest.approx(ref.item(), rel=1e-4)
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-3, atol=1e-6)
    assert sums["loss"] == pytest.approx(sum(lam[k] * sums[k] for k in lam), rel=1e-9)
    assert sums["add"] > 0  # reported even where it is weighted 0


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
@pytest.mark.parametrize("how", ["shared prefix", "rows whole", "a direction per row"])
def test_clean_states_give_the_clean_pass_loss_and_gradient(family, how, monkeypatch):
    """The retain loss from precomputed clean states (the LM head's input, through the LM head again) equals the one
    from a clean pass in the step: with the CPU's shared prefix, with every row whole (the GPU rule), and with one
    direction per row (rco.py); an empty retain target among them; states made at another micro-batch than the
    step's. On Gemma-2 with a logit cap that bites (the tiny model's logits are small). Qwen2 in float64, exact:
    the tiny model's KL is ~1e-4, near fp32's rounding of a difference of logits (Gemma-2 in float64 gives NaN on
    padded rows in transformers 5.24: float32 there, to a tolerance). Gemma-2 never shares the prefix (its
    sliding window)."""
    model, tok = make_model(family)
    dtype, tol = (torch.float64, 1e-9) if family == "qwen2" else (torch.float32, 1e-4)
    model.to(dtype)
    if family == "gemma2":
        model.config.final_logit_softcapping = 0.1
    if how == "rows whole":
        monkeypatch.setattr(rdo, "SHARE_PREFIX", set())
    tg = {"answer": [[40, 41, 42], [43, 44], [45, 46, 47, 48]], "refusal": [[45], [46, 47, 48, 49], [50, 51]],
          "retain": [[50, 51], [], [55, 56, 57]]}
    batch = list(zip(HARMFUL[:3], HARMLESS[:3], tg["answer"], tg["refusal"], tg["retain"]))
    states = rdo.clean_states(model, tok, HARMLESS[:3], tg["retain"], 3)
    assert [s.shape for s in states] == [(len(t) + 1, C.hidden_size(model)) for t in tg["retain"]]
    with_states = [b + (s,) for b, s in zip(batch, states)]
    lam = {"abl": 1.0, "add": 0.2, "ret": 1.0}
    torch.manual_seed(0)
    r = torch.randn(*((3,) if how == "a direction per row" else ()), C.hidden_size(model), dtype=dtype)
    r1, r2, r3 = (r.clone().requires_grad_(True) for _ in range(3))
    clean_passes, real = [], rdo.window_logits
    monkeypatch.setattr(rdo, "window_logits", lambda *a, kv="kv": clean_passes.append(kv == "clean_kv") or real(*a, kv=kv))
    inline = rdo.loss_and_grad(model, tok, r1, batch, 3.0, 1, lam, 2)
    assert sum(clean_passes) == 2  # one per micro-batch
    clean_passes.clear()
    cached = rdo.loss_and_grad(model, tok, r2, with_states, 3.0, 1, lam, 2)
    assert len(clean_passes) == 6 and sum(clean_passes) == 0  # the loss passes only
    assert cached["ret"] > 0 and cached["ret"] == pytest.approx(inline["ret"], rel=tol)
    torch.testing.assert_close(r1.grad, r2.grad, rtol=tol, atol=tol * 1e-3)
    if family == "gemma2":  # the cap bites: without it in unembed, the comparison above fails
        monkeypatch.setattr(rdo, "unembed", lambda m, h: m.get_output_embeddings()(h))
        uncapped = rdo.loss_and_grad(model, tok, r3, with_states, 3.0, 1, lam, 2)
        assert uncapped["ret"] != pytest.approx(inline["ret"], rel=100 * tol)


def test_clean_states_fall_back_to_a_clean_pass_where_logits_are_not_the_heads(setup, monkeypatch, capsys):
    base, tmp, _ = setup
    real = rdo.unembed
    monkeypatch.setattr(rdo, "unembed", lambda m, h: 2 * real(m, h))  # a model that scales its logits
    model, tok = make_model("llama")
    args = SimpleNamespace(model="tiny", cache=str(tmp / "c"))
    assert rdo.get_clean_states(model, tok, HARMLESS[:3], [[50, 51], [52], [53]], args, 2) is None
    assert "runs in every step" in capsys.readouterr().out and not os.path.exists(tmp / "c")  # nothing cached
    clean_passes, real_logits = [], rdo.window_logits
    monkeypatch.setattr(rdo, "window_logits", lambda *a, kv="kv": clean_passes.append(kv == "clean_kv") or real_logits(*a, kv=kv))
    rdo.main(base + ["--max-steps", "2", "--out", str(tmp / "fallback")])  # trains with the clean pass in the step
    assert sum(clean_passes) == 2 * 2 and len(json.load(open(tmp / "fallback" / "rdo.json"))["history"]) == 2
    assert not [f for f in os.listdir(tmp / "cache") if f.startswith("clean_")]


def test_clean_states_are_cached_under_what_they_depend_on(tmp_path, monkeypatch):
    model, tok = make_model("llama")
    args = SimpleNamespace(model="tiny", cache=str(tmp_path))
    retain = [[50, 51], [52, 53, 54], [55]]
    calls, real = [], rdo.clean_states
    monkeypatch.setattr(rdo, "clean_states", lambda *a: calls.append(1) or real(*a))
    first = rdo.get_clean_states(model, tok, HARMLESS[:3], retain, args, 2)
    assert len(calls) == 1 and len([f for f in os.listdir(tmp_path) if f.startswith("clean_")]) == 1
    again = rdo.get_clean_states(model, tok, HARMLESS[:3], retain, args, 2)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))  # from the cache
    other = rdo.get_clean_states(model, tok, HARMLESS[:3], [[50, 51], [52, 53, 60], [55]], args, 2)  # same sizes
    assert len(calls) == 2 and not torch.equal(other[1], first[1])
    rdo.get_clean_states(model, tok, HARMLESS[1:4], retain, args, 2)  # other prompts
    assert len(calls) == 3


def test_tangent_projection_and_renormalisation():
    r = F.normalize(torch.randn(16), dim=0)
    g = torch.randn(16)
    t = rdo.tangent(g, r)
    assert abs((t @ r).item()) < 1e-6
    torch.testing.assert_close(g - t, (g @ r) * r)  # only the radial part is removed
    basis = C.unit_basis(torch.randn(2, 16))
    p = rdo.project_out(r, basis)
    assert (basis @ p).abs().max() < 1e-6


def test_sphere_step_clips_the_tangent_gradient():
    r0 = F.normalize(torch.randn(16), dim=0)
    g = torch.randn(16) * 100
    t = rdo.tangent(g, r0)
    for max_norm, scale in ((None, 1.0), (2.0, 2.0 / t.norm().item()), (1e9, 1.0)):
        r = r0.clone().requires_grad_(True)
        r.grad = g.clone()
        opt = torch.optim.SGD([r], lr=1.0)  # one plain step: r moves by exactly the (clipped) tangent gradient
        with torch.no_grad():
            norm = rdo.sphere_step(opt, r, max_norm)
        assert norm == pytest.approx(t.norm().item(), rel=1e-6)  # the norm before clipping, for the history
        torch.testing.assert_close(r0 - r.detach(), t * scale)


def test_optimizer_flags_reach_adamw():
    p = torch.zeros(3, requires_grad=True)
    plain = rdo.make_optimizer(p, rdo.parse_args(["--model", "m"]))
    ams = rdo.make_optimizer(p, rdo.parse_args(["--model", "m", "--amsgrad", "--betas", "0.8", "0.9", "--lr", "0.5"]))
    assert plain.param_groups[0]["amsgrad"] is False and plain.param_groups[0]["weight_decay"] == 0
    g = ams.param_groups[0]
    assert g["amsgrad"] is True and g["betas"] == (0.8, 0.9) and g["lr"] == 0.5


def test_plateau_schedule():
    st = {"best": math.inf, "bad": 0, "drops": 0}
    losses = [5, 4, 3] + [3.5] * 5 + [2.9] + [3] * 5 + [3] * 5
    actions = [rdo.plateau_step(st, x, patience=5, max_drops=2) for x in losses]
    assert actions[:7] == ["keep"] * 7 and actions[7] == "drop"  # 5th step without a new best
    assert actions[8] == "keep"  # 2.9 is a new best
    assert actions[13] == "drop" and actions[18] == "stop" and actions.count("drop") == 2


def test_cut_first_sentence():
    from conftest import make_tokenizer
    tok = make_tokenizer()
    ids = tok("I can't help with that. But here is more.", add_special_tokens=False)["input_ids"]
    assert tok.decode(rdo.cut_first_sentence(tok, ids)) == "I can't help with that."
    no_end = tok("no end here", add_special_tokens=False)["input_ids"]
    assert rdo.cut_first_sentence(tok, no_end) == no_end


# ----------------------------------------------------------------------------- the script

@pytest.fixture
def setup(tiny_dir, tmp_path):
    h, s, dim_file = train_files(tmp_path, repeat=3)
    base = ["--model", tiny_dir, "--harmful", h, "--harmless", s, "--n-train", "16", "--n-val", "4",
            "--dim", dim_file, "--effective-batch", "4", "--micro-batch", "2", "--dtype", "float32",
            "--answer-tokens", "4", "--retain-tokens", "3", "--refusal-tokens", "4", "--select-last", "3",
            "--cache", str(tmp_path / "cache"), "--lr", "0.05"]
    return base, tmp_path, dim_file


def test_targets_are_cached_under_the_dim_direction(setup, monkeypatch):
    base, tmp, dim_file = setup
    args = rdo.parse_args(base)
    model, tok = make_model("llama")
    calls = []
    real = C.generate_ids
    monkeypatch.setattr(C, "generate_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    v = torch.randn(C.hidden_size(model))
    t1 = rdo.get_targets(model, tok, HARMFUL[:3], HARMLESS[:3], v, 1, args)
    assert len(calls) == 3 and len(t1["answer"]) == 3
    assert rdo.get_targets(model, tok, HARMFUL[:3], HARMLESS[:3], v, 1, args) == t1 and len(calls) == 3  # cache hit
    rdo.get_targets(model, tok, HARMFUL[:3], HARMLESS[:3], v + 1e-3, 1, args)  # another DIM: another key
    assert len(calls) == 6 and len(os.listdir(args.cache)) == 2


def test_rdo_perp_stays_orthogonal(setup):
    base, tmp, dim_file = setup
    rdo.main(base + ["--out", str(tmp / "perp"), "--orthogonal-to", dim_file, "--max-steps", "3"])
    meta = json.load(open(tmp / "perp" / "rdo.json"))
    d, _ = C.load_result(str(tmp / "perp" / "rdo.safetensors"))
    v, _ = C.load_result(dim_file)
    cos = (d["direction"] @ v["direction"]).abs() / v["direction"].norm()
    assert cos < 1e-5 and meta["max_abs_cos_with_orthogonal_to"] < 1e-5
    assert d["direction"].norm().item() == pytest.approx(1.0, abs=1e-5)
    assert len(meta["history"]) == 3 and meta["chosen_step"] in (0, 1, 2)
    assert not os.path.exists(tmp / "perp" / "rdo_checkpoint.pt")
    assert [f for f in os.listdir(tmp / "cache") if f.startswith("clean_")]  # the clean retain states


def test_resume_reaches_the_same_direction(setup):
    base, tmp, _ = setup
    rdo.main(base + ["--out", str(tmp / "full")])
    full, meta_full = C.load_result(str(tmp / "full" / "rdo.safetensors"))
    assert len(meta_full["history"]) == 4  # 16 pairs / effective batch 4, one epoch

    with interrupted_at_call(rdo, "plateau_step", 3):  # after the backward pass of step 2, before its checkpoint
        rdo.main(base + ["--out", str(tmp / "part")])
    ck = torch.load(tmp / "part" / "rdo_checkpoint.pt", weights_only=False)
    assert ck["state"]["step"] == 2  # lost only the interrupted step
    with pytest.raises(C.RefusalError, match="unfinished run"):
        rdo.main(base + ["--out", str(tmp / "part")])
    rdo.main(base + ["--out", str(tmp / "part"), "--resume"])
    part, meta_part = C.load_result(str(tmp / "part" / "rdo.safetensors"))
    torch.testing.assert_close(part["direction"], full["direction"], rtol=0, atol=1e-6)
    torch.testing.assert_close(part["iterates"], full["iterates"], rtol=0, atol=1e-6)  # the resumed run's too
    assert full["iterates"].shape == (4, full["direction"].numel())  # every step's r, for choosing again
    assert torch.equal(full["iterates"][meta_full["chosen_step"]], full["direction"])
    assert full["iterates"].norm(dim=1).sub(1).abs().max() < 1e-5
    assert [h["loss"] for h in meta_part["history"]] == pytest.approx([h["loss"] for h in meta_full["history"]], rel=1e-6)

    # --max-steps is not part of the resume key: a run cut short resumes further, to the uninterrupted run's end
    with interrupted_at_call(rdo, "plateau_step", 2):
        rdo.main(base + ["--out", str(tmp / "short"), "--max-steps", "2"])
    rdo.main(base + ["--out", str(tmp / "short"), "--resume"])
    longer, _ = C.load_result(str(tmp / "short" / "rdo.safetensors"))
    torch.testing.assert_close(longer["iterates"], full["iterates"], rtol=0, atol=1e-6)


def test_authors_optimizer_settings_are_used_recorded_and_part_of_the_run(setup, monkeypatch):
    base, tmp, _ = setup
    clips, real = [], rdo.sphere_step
    monkeypatch.setattr(rdo, "sphere_step", lambda opt, p, max_norm: clips.append(max_norm) or real(opt, p, max_norm))
    rdo.main(base + ["--out", str(tmp / "a"), "--amsgrad", "--max-grad-norm", "0.5", "--max-steps", "2"])
    assert clips == [0.5, 0.5]
    meta = json.load(open(tmp / "a" / "rdo.json"))
    assert meta["args"]["amsgrad"] is True and meta["args"]["max_grad_norm"] == 0.5
    assert all(h["grad_norm"] > 0 for h in meta["history"])  # the unclipped norm: shows whether clipping acted
    monkeypatch.setattr(rdo, "sphere_step", real)

    with interrupted_at_call(rdo, "plateau_step", 2):
        rdo.main(base + ["--out", str(tmp / "c"), "--amsgrad"])
    assert "max_exp_avg_sq" in torch.load(tmp / "c" / "rdo_checkpoint.pt", weights_only=False)["opt"]["state"][0]
    for other, named in (([], "amsgrad: True there, False now"), (["--amsgrad", "--patience", "9"], "patience"),
                         (["--amsgrad", "--betas", "0.9", "0.99"], "betas"), (["--amsgrad", "--alpha", "2"], "alpha"),
                         (["--amsgrad", "--answer-tokens", "5"], "answer_tokens"),
                         (["--amsgrad", "--orthogonal-to", str(tmp / "a" / "rdo.safetensors")], "orthogonal_to"),
                         (["--amsgrad", "--dtype", "bfloat16"], "dtype: 'torch.float32' there")):
        with pytest.raises(C.RefusalError, match=f"other settings \\(.*{named}"):  # resuming must not change the run
            rdo.main(base + ["--out", str(tmp / "c"), "--resume"] + other)
    rdo.main(base + ["--out", str(tmp / "c"), "--resume", "--amsgrad"])
    assert os.path.isfile(tmp / "c" / "rdo.safetensors")


def test_nan_loss_stops_with_a_clear_message(setup, monkeypatch):
    base, tmp, _ = setup
    monkeypatch.setattr(rdo, "ablation_loss", lambda model, r, b: (r.sum() * float("nan")).expand(len(b["input_ids"])))
    with pytest.raises(C.RefusalError, match="loss is nan at step 0: stopped; nothing was saved yet"):
        rdo.main(base + ["--out", str(tmp / "nan")])


def test_nan_gradient_stops_before_it_reaches_r(setup, monkeypatch):
    base, tmp, _ = setup
    real, calls = rdo.loss_and_grad, []

    def nan_gradient_at_step_1(model, tok, r, *a):  # a finite loss with a NaN gradient (bf16 can do this)
        sums = real(model, tok, r, *a)
        calls.append(1)
        if len(calls) == 2:
            r.grad[0] = float("nan")
        return sums
    monkeypatch.setattr(rdo, "loss_and_grad", nan_gradient_at_step_1)
    with pytest.raises(C.RefusalError, match="gradient is not finite .* at step 1: stopped; the last good state is in "
                                             ".*rdo_checkpoint.pt"):
        rdo.main(base + ["--out", str(tmp / "nangrad")])
    ck = torch.load(tmp / "nangrad" / "rdo_checkpoint.pt", weights_only=False)
    assert ck["state"]["step"] == 1 and torch.isfinite(ck["r"]).all()


def test_wrong_size_dim_and_bad_layer(setup, tmp_path):
    base, tmp, _ = setup
    bad = C.save_result(str(tmp_path), "dim", {"direction": torch.randn(7)}, {"layer": 1})
    with pytest.raises(C.RefusalError, match="hidden size"):
        rdo.main(base + ["--dim", bad, "--out", str(tmp / "x")])
    with pytest.raises(C.RefusalError, match="out of range"):
        rdo.main(base + ["--layer", "12", "--out", str(tmp / "y")])


def test_selection_falls_back_to_the_kl_filter_then_to_anything(monkeypatch):
    model, tok = make_model("llama")
    args = rdo.parse_args(["--model", "x"])
    table = {0: {"bypass": -5.0, "induce": -1.0, "kl": 0.5}, 1: {"bypass": -3.0, "induce": -1.0, "kl": 0.05},
             2: {"bypass": -1.0, "induce": 1.0, "kl": 0.05}}
    monkeypatch.setattr(rdo.dim, "score_direction", lambda model, tok, v, *a: dict(table[int(v[0].item())]))
    pick = lambda: rdo.select_iterate(model, tok, [torch.full((32,), float(i)) for i in table], 1.0, 1,
                                      HARMFUL[:2], HARMLESS[:2], args)[0]["step"]
    assert pick() == 2  # the only one passing every filter, although its bypass is the worst
    table[2]["induce"] = -1.0
    assert pick() == 1  # none passes every filter: lowest bypass among those within the KL bound
    table[1]["kl"] = table[2]["kl"] = 0.5
    assert pick() == 0


def test_without_dim_rdo_computes_it_at_the_given_layer(setup, monkeypatch):
    """The users' own command: `rdo.py --model M --layer L`, no --dim (the tiny model passes no DIM filter)."""
    base, tmp, _ = setup
    i = base.index("--dim")
    import dim
    monkeypatch.setattr(dim, "N_TRAIN", 8)  # dim.py's 128 prompts, scaled to the 16 training pairs here
    rdo.main(base[:i] + base[i + 2:] + ["--layer", "1", "--max-steps", "1", "--out", str(tmp / "nodim")])
    dim_t, dim_meta = C.load_result(str(tmp / "nodim" / "dim.safetensors"))
    meta = json.load(open(tmp / "nodim" / "rdo.json"))
    assert dim_meta["layer"] == 1 and meta["layer"] == 1
    assert meta["alpha"] == pytest.approx(dim_t["direction"].norm().item(), rel=1e-5)
    dim_argv = base[:i] + ["--dtype", "float32", "--layer", "1", "--out", str(tmp / "dimpy")]  # the same data flags
    dim_argv[dim_argv.index("--n-train") + 1] = "8"  # ... and dim.py's own training set: the same direction
    dim.main(dim_argv)
    dimpy = C.load_result(str(tmp / "dimpy" / "dim.safetensors"))
    torch.testing.assert_close(dim_t["direction"], dimpy[0]["direction"])
    for key in ("position", "data", "selected_scores", "n_post"):  # the sidecar tells what dim.py's would
        assert dim_meta[key] == pytest.approx(dimpy[1][key], rel=1e-5), key
    os.remove(tmp / "nodim" / "rdo.safetensors")  # a DIM result alone in the folder is not replaced silently
    with pytest.raises(C.RefusalError, match="already holds a DIM result: pass --dim .*dim.safetensors"):
        rdo.main(base[:i] + base[i + 2:] + ["--layer", "1", "--max-steps", "1", "--out", str(tmp / "nodim")])
    assert torch.equal(C.load_result(str(tmp / "nodim" / "dim.safetensors"))[0]["direction"], dim_t["direction"])


def test_batch_order_never_straddles_two_shuffles():
    g = torch.Generator().manual_seed(0)
    order = rdo.batch_order(10, 4, 3, g)
    assert len(order) == 24  # 2 whole batches per epoch; the 2 pairs left over sit that epoch out
    for batch in order.view(-1, 4):
        assert len(set(batch.tolist())) == 4
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)  # whole batches: plain shuffles
    assert torch.equal(rdo.batch_order(16, 4, 2, g1), torch.cat([torch.randperm(16, generator=g2) for _ in range(2)]))


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_the_shared_prefix_changes_nothing(family, monkeypatch):
    """The template prefix run once (its keys and values reused by every row, its gradient sent back at the end;
    the CPU's path) gives the loss and gradient of full passes (the GPU's path, SHARE_PREFIX empty here). Gemma's
    tiny sliding window is widened so that it may share."""
    import conftest
    real_config = conftest.make_config
    monkeypatch.setattr(conftest, "make_config", lambda *a, **k: setattr(c := real_config(*a, **k), "sliding_window", 512) or c)
    model, tok = make_model(family)
    model.double()  # float64: fp32 rounding moves the small retain KL by ~1e-4 (relative) between the two paths
    tg = {"answer": [[40, 41, 42], [43, 44], [45, 46]], "refusal": [[45], [46, 47, 48, 49], [50]],
          "retain": [[50, 51], [52, 53, 54], [55]]}
    batch = list(zip(HARMFUL[:3], HARMLESS[:3], tg["answer"], tg["refusal"], tg["retain"]))
    lam = {"abl": 1.0, "add": 0.2, "ret": 1.0}
    prefix = rdo.shared_prefix(tok, HARMFUL[:3], tg["answer"], model)
    assert prefix.shape[1] == 3  # <s>, user header, newline
    assert torch.equal(prefix, rdo.shared_prefix(tok, HARMLESS[:3], tg["retain"], model))  # ablation and retain share it
    r = torch.randn(C.hidden_size(model), dtype=torch.float64)
    r1, r2 = r.clone().requires_grad_(True), r.clone().requires_grad_(True)
    calls, real_kv = [], rdo.prefix_kv
    monkeypatch.setattr(rdo, "prefix_kv", lambda *a: calls.append(1) or real_kv(*a))
    shared = rdo.loss_and_grad(model, tok, r1, batch, 3.0, 1, lam, 2)
    assert len(calls) == 3  # ablation (retain reuses it), addition, and the clean retain pass's prefix
    monkeypatch.setattr(rdo, "SHARE_PREFIX", set())  # the rule on a GPU: every row runs whole
    assert rdo.shared_prefix(tok, HARMFUL[:3], tg["answer"], model) is None
    full = rdo.loss_and_grad(model, tok, r2, batch, 3.0, 1, lam, 2)
    assert len(calls) == 3
    for k in ("abl", "add", "ret"):
        assert shared[k] == pytest.approx(full[k], rel=1e-6, abs=1e-9)
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-5, atol=1e-9)


def test_same_seed_same_direction_other_seed_another(setup):
    base, tmp, _ = setup
    short = base + ["--max-steps", "2"]
    rdo.main(short + ["--out", str(tmp / "a")])
    rdo.main(short + ["--out", str(tmp / "b")])
    rdo.main(short + ["--out", str(tmp / "c"), "--seed", "1"])
    a, b, c = (C.load_result(str(tmp / x / "rdo.safetensors"))[0]["direction"] for x in "abc")
    assert torch.equal(a, b)
    assert (a @ c).abs() < 0.9
    assert json.load(open(tmp / "a" / "rdo.json"))["seed"] == 0 and json.load(open(tmp / "c" / "rdo.json"))["seed"] == 1


def test_init_starts_from_the_given_direction_with_the_same_batches(setup, monkeypatch):
    base, tmp, dim_file = setup
    still = base + ["--max-steps", "2", "--lr", "0"]  # lr 0: the iterates stay where they started
    batches, real = [], rdo.training_batch
    monkeypatch.setattr(rdo, "training_batch", lambda S, idx: batches.append(list(idx)) or real(S, idx))
    rdo.main(still + ["--out", str(tmp / "dim"), "--init", "dim"])
    v = C.load_result(dim_file)[0]["direction"]
    other = C.save_result(str(tmp / "other"), "x", {"direction": torch.randn(v.shape[0]) * 3}, {})
    rdo.main(still + ["--out", str(tmp / "file"), "--init", other])
    rdo.main(still + ["--out", str(tmp / "random")])
    its = {k: C.load_result(str(tmp / k / "rdo.safetensors"))[0]["iterates"] for k in ("dim", "file", "random")}
    w = C.load_result(other)[0]["direction"]
    assert torch.allclose(its["dim"], (v / v.norm()).expand(2, -1), atol=1e-6)
    assert torch.allclose(its["file"], (w / w.norm()).expand(2, -1), atol=1e-6)
    assert (its["random"][0] @ v / v.norm()).abs() < 0.9
    history = {k: json.load(open(tmp / k / "rdo.json"))["history"] for k in ("dim", "random")}
    assert history["dim"][0]["loss"] != history["random"][0]["loss"]  # another start ...
    assert json.load(open(tmp / "dim" / "rdo.json"))["init"] == "dim"  # ... recorded in the sidecar
    assert batches[:2] == batches[2:4] == batches[4:6] and len(batches) == 6  # the seed's batches, whatever the start


def test_choose_sign_keeps_the_mirror_image_with_the_lower_addition_loss():
    model, tok = make_model("llama")
    tg = {"refusal": [[45], [46, 47], [48, 49, 50]], "other": [[40], [41], [42]]}
    batch = list(zip(HARMFUL[:3], HARMLESS[:3], tg["other"], tg["refusal"], tg["other"]))
    b = rdo.pack(tok, HARMLESS[:3], tg["refusal"], "cpu")
    loss = lambda v: rdo.addition_loss(model, v, b, 3.0, 1).mean().item()  # by hand: all three rows in one pass
    r0 = F.normalize(torch.randn(C.hidden_size(model), generator=torch.Generator().manual_seed(0)), dim=0)
    seen = []
    for start in (r0, -r0):  # one of the two starts flips, the other stays
        r = start.clone().requires_grad_(True)
        opt = torch.optim.AdamW([r], lr=0.01)
        r.grad = torch.randn_like(r)
        opt.step()
        before, moment = r.detach().clone(), opt.state[r]["exp_avg"].clone()
        with torch.no_grad():
            flipped = rdo.choose_sign(model, tok, r, opt, batch, 3.0, 1, 2)
        assert flipped == (loss(-before) < loss(before))
        assert torch.equal(r.detach(), -before if flipped else before)
        assert torch.equal(opt.state[r]["exp_avg"], -moment if flipped else moment)
        assert loss(r.detach()) <= loss(-r.detach())
        with torch.no_grad():
            assert not rdo.choose_sign(model, tok, r, opt, batch, 3.0, 1, 2)  # a second look keeps it
        seen.append(flipped)
    assert seen[0] != seen[1]


def test_sign_warmup_trains_without_the_addition_loss_then_chooses_the_sign(setup):
    base, tmp, _ = setup
    rdo.main(base + ["--max-steps", "3", "--sign-warmup", "2", "--out", str(tmp / "w")])
    rdo.main(base + ["--max-steps", "3", "--lambda-add", "0", "--out", str(tmp / "a0")])
    w, a0 = (C.load_result(str(tmp / k / "rdo.safetensors"))[0]["iterates"] for k in ("w", "a0"))
    meta = json.load(open(tmp / "w" / "rdo.json"))
    flipped = meta["history"][1]["flipped"]
    assert meta["sign_warmup"] == 2 and "flipped" not in meta["history"][0]
    torch.testing.assert_close(w[0], a0[0])  # the warm-up's steps are lambda_add 0's ...
    torch.testing.assert_close(w[1], -a0[1] if flipped else a0[1])  # ... up to the chosen sign
    assert (w[2] @ a0[2]).abs() < 1 - 1e-4  # ... and then the addition loss is back
    with pytest.raises(C.RefusalError, match="--sign-warmup 3: give 0"):
        rdo.main(base + ["--max-steps", "3", "--sign-warmup", "3", "--out", str(tmp / "x")])
    for h in meta["history"]:  # the logged loss is still the paper's L, addition term included
        assert h["loss"] == pytest.approx(h["abl"] + 0.2 * h["add"] + h["ret"])


def test_judged_refusals_replaces_answers_by_refusals_in_turn():
    tok = make_model("llama")[1]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    texts = ["I'm sorry, I can't.", "Sure: 1.", "1. Eggs", "As an AI, I cannot.", "Here.", "</s>", "<s>I am sorry."]
    targets, replaced = rdo.judged_refusals(tok, [ids(t) for t in texts])
    # an empty target (special tokens only) is an answer: replaced, never copied
    want = [texts[0], texts[0], texts[3], texts[3], texts[6], texts[0], texts[6]]
    assert [tok.decode(t) for t in targets] == want and replaced == 4
    assert rdo.judged_refusals(tok, targets) == (targets, 0)  # only refusals: nothing to replace
    with pytest.raises(C.RefusalError, match="no refusal target to train on: run without the flag"):
        rdo.judged_refusals(tok, [ids("Sure."), ids("1. Eggs")])


def test_judge_refusals_trains_on_refusal_targets_only(setup, monkeypatch):
    """The tiny model's targets are all alike: here t_refusal number i is "R<i>." and a stand-in judge calls every
    third one an answer."""
    base, tmp, _ = setup
    real_targets, seen, real_loss = rdo.get_targets, [], rdo.loss_and_grad

    def targets(model, tok, *a):
        t = real_targets(model, tok, *a)
        t["refusal"] = [tok(f"R{i}.", add_special_tokens=False)["input_ids"] for i in range(len(t["refusal"]))]
        return t
    answer = lambda text: int(text[1:-1]) % 3 == 0
    monkeypatch.setattr(rdo, "get_targets", targets)
    monkeypatch.setattr(C, "is_refusal", lambda text: not answer(text))
    monkeypatch.setattr(rdo, "loss_and_grad", lambda model, tok, r, batch, *a: seen.extend(
        tok.decode(b[3]) for b in batch) or real_loss(model, tok, r, batch, *a))
    with interrupted_at_call(rdo, "plateau_step", 2):  # and a resumed run replaces them too
        rdo.main(base + ["--max-steps", "3", "--judge-refusals", "--out", str(tmp / "j")])
    rdo.main(base + ["--max-steps", "3", "--judge-refusals", "--out", str(tmp / "j"), "--resume"])
    assert len(seen) == 16 and not any(map(answer, seen))  # steps 0, 1, 1 again after the interruption, 2
    meta = json.load(open(tmp / "j" / "rdo.json"))
    assert meta["args"]["judge_refusals"] and meta["refusal_targets_replaced"] == 6  # R0, R3, ..., R15
    seen.clear()
    rdo.main(base + ["--max-steps", "3", "--out", str(tmp / "p")])  # the paper's targets: answers among them
    assert any(map(answer, seen)) and json.load(open(tmp / "p" / "rdo.json"))["refusal_targets_replaced"] is None


def test_init_errors(setup):
    base, tmp, dim_file = setup
    with pytest.raises(C.RefusalError, match="span of --orthogonal-to"):
        rdo.main(base + ["--out", str(tmp / "a"), "--init", "dim", "--orthogonal-to", dim_file, "--max-steps", "1"])
    d = C.load_result(dim_file)[0]["direction"].shape[0]
    two = C.save_result(str(tmp / "two"), "x", {"directions": torch.randn(2, d)}, {})
    with pytest.raises(C.RefusalError, match="holds 2 directions"):
        rdo.main(base + ["--out", str(tmp / "b"), "--init", two, "--max-steps", "1"])


def test_targets_are_generated_under_the_right_interventions(setup, monkeypatch):
    """t_answer with DIM ablated, t_refusal with alpha_DIM * r_hat_DIM added at the DIM layer (cut after its first
    sentence), t_retain with no intervention; every budget and the layer are part of the cache key."""
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
    sentence = tok("I can't. More text", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(C, "generate_ids", lambda model, tok, prompts, n, *a, **k: seen.append(
        (list(active), prompts, n)) or [list(sentence) for _ in prompts])
    args = rdo.parse_args(base)
    t = rdo.get_targets(model, tok, HARMFUL[:2], HARMLESS[:2], v, 3, args)
    (abl, p1, n1), (add, p2, n2), (ret, p3, n3) = seen
    assert abl[0][0] == "ablate" and torch.equal(abl[0][1], v) and p1 == HARMFUL[:2] and n1 == args.answer_tokens
    assert add[0][0] == "add" and torch.equal(add[0][1], v) and add[0][2] == 3 and p2 == HARMLESS[:2]
    assert ret == [] and p3 == HARMLESS[:2] and n3 == args.retain_tokens and n2 == args.refusal_tokens
    assert [tok.decode(x) for x in t["refusal"]] == ["I can't."] * 2 and t["answer"][0] == sentence
    for other in (["--answer-tokens", "5"], ["--retain-tokens", "5"], ["--refusal-tokens", "5"]):
        rdo.get_targets(model, tok, HARMFUL[:2], HARMLESS[:2], v, 3, rdo.parse_args(base + other))
    rdo.get_targets(model, tok, HARMFUL[:2], HARMLESS[:2], v, 2, args)  # another layer
    assert len(seen) == 15 and len(os.listdir(args.cache)) == 5


@pytest.mark.parametrize("other, named", [(["--lr", "0.001"], "lr"), (["--seed", "1"], "seed"),
                                          (["--lambda-ret", "2"], "lambda_ret"), (["--lambda-add", "1"], "lambda_add"),
                                          (["--n-train", "12"], "n_train"), (["--epochs", "2"], "epochs"),
                                          (["--sign-warmup", "2"], "sign_warmup"),
                                          (["--judge-refusals"], "judge_refusals")])
def test_resume_refuses_a_checkpoint_of_other_settings(setup, other, named, monkeypatch):
    base, tmp, _ = setup
    monkeypatch.setattr(C, "is_refusal", lambda text: True)  # the tiny model's t_refusal: all refusals, for --judge-refusals
    with interrupted_at_call(rdo, "plateau_step", 2):
        rdo.main(base + ["--out", str(tmp / "c")])
    with pytest.raises(C.RefusalError, match=f"other settings \\(.*{named}: "):
        rdo.main(base + ["--out", str(tmp / "c"), "--resume"] + other)


def test_resume_and_data_errors(setup, tmp_path):
    base, tmp, _ = setup
    with pytest.raises(C.RefusalError, match="--resume: no checkpoint at"):
        rdo.main(base + ["--out", str(tmp / "none"), "--resume"])
    with pytest.raises(C.RefusalError, match="fewer than one effective batch"):
        rdo.main(base + ["--out", str(tmp / "few"), "--effective-batch", "32"])
    i = base.index("--dim")
    nolayer = C.save_result(str(tmp_path / "nolayer"), "dim", {"direction": torch.randn(32)}, {})
    with pytest.raises(C.RefusalError, match="has no layer in its sidecar"):
        rdo.main(base[:i] + base[i + 2:] + ["--dim", nolayer, "--out", str(tmp / "nl")])


def test_no_dim_candidate_is_a_clear_error(setup, monkeypatch):
    base, tmp, _ = setup
    i = base.index("--dim")
    monkeypatch.setattr(rdo.dim, "compute_dim", lambda *a: (None, {}))
    with pytest.raises(C.RefusalError, match="no DIM candidate passed the filters"):
        rdo.main(base[:i] + base[i + 2:] + ["--out", str(tmp / "x")])


def test_selection_looks_at_the_last_iterates_only(monkeypatch):
    model, tok = make_model("llama")
    args = rdo.parse_args(["--model", "x", "--select-last", "2"])
    bypass = [-9.0, -1.0, -2.0, -3.0, -1.5]  # step 0 is the best overall, but not among the last two
    monkeypatch.setattr(rdo.dim, "score_direction", lambda model, tok, v, *a: {
        "bypass": bypass[int(v[0].item())], "induce": 1.0, "kl": 0.0})
    chosen, scored = rdo.select_iterate(model, tok, [torch.full((32,), float(i)) for i in range(5)], 1.0, 1,
                                        HARMFUL[:2], HARMLESS[:2], args)
    assert [s["step"] for s in scored] == [3, 4] and chosen["step"] == 3
    monkeypatch.setattr(rdo.dim, "score_direction", lambda *a: {"bypass": math.nan, "induce": math.nan, "kl": math.nan})
    with pytest.raises(C.RefusalError, match="every iterate scored NaN"):
        rdo.select_iterate(model, tok, [torch.zeros(32)] * 3, 1.0, 1, HARMFUL[:2], HARMLESS[:2], args)


def test_record_step_drops_the_lr_then_stops():
    r = torch.zeros(4, requires_grad=True)
    args = rdo.parse_args(["--model", "x", "--patience", "2", "--lr-drops", "1"])
    opt, state = rdo.make_optimizer(r, args), rdo.new_state()
    for loss in (1.0, 2.0, 2.0):  # a best, then two steps without a new one: lr / 10
        rdo.record_step(opt, state, {"loss": loss}, r, args)
    assert [h["lr"] for h in state["history"]] == pytest.approx([0.01, 0.01, 0.001])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001) and not state["done"]
    for loss in (2.0, 2.0):  # the next plateau, after the last allowed drop: stop
        rdo.record_step(opt, state, {"loss": loss}, r, args)
    assert state["done"] and state["step"] == 5 and len(state["iterates"]) == 5
