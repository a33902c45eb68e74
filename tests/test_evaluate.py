"""evaluate.py: each mode's numbers on tiny models (crafted completions, hand computations one prompt at a time,
export equivalence), resume, steering during generation, and error paths."""
import json, os, sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common as C
import evaluate as E
from conftest import HARMFUL, HARMLESS, interrupted_at_call, make_config, make_model, make_tokenizer

@pytest.fixture
def files(tmp_path, tiny_dir):
    """Prompt files and direction files for the tiny Llama (hidden size 32)."""
    (tmp_path / "h.json").write_text(json.dumps(HARMFUL))
    (tmp_path / "s.json").write_text(json.dumps(HARMLESS))
    g = torch.Generator().manual_seed(1)
    f = {"h": str(tmp_path / "h.json"), "s": str(tmp_path / "s.json"), "out": str(tmp_path / "out"), "model": tiny_dir,
         "repind_vecs": torch.randn(3, 32, generator=g)}
    f["dim"] = C.save_result(str(tmp_path / "dim"), "dim", {"direction": 3 * torch.randn(32, generator=g)},
                             {"layer": 1, "alpha": 3.0})
    f["rdo"] = C.save_result(str(tmp_path / "rdo"), "rdo", {"direction": torch.randn(32, generator=g)},
                             {"layer": 2, "alpha": 2.0})
    basis = torch.linalg.qr(torch.randn(32, 3, generator=g))[0].T
    f["rco"] = C.save_result(str(tmp_path / "rco"), "rco", {"basis": basis}, {})
    f["repind"] = C.save_result(str(tmp_path / "repind"), "repind", {"directions": f["repind_vecs"]}, {})
    f["first"] = C.save_result(str(tmp_path / "first"), "first", {"direction": f["repind_vecs"][0]}, {"layer": 1})
    return f


def run(f, mode, *extra, dirs=("dim", "rdo")):
    E.main([mode, "--model", f["model"], "--dtype", "float32", "--harmful", f["h"], "--harmless", f["s"],
            "--n-val", "4", "--max-new-tokens", "3", "--out", f["out"], "--direction", *[f[d] for d in dirs], *extra])
    return json.load(open(os.path.join(f["out"], f"eval_{mode}.json")))


def direction(f, key):
    return C.load_result(f[key])[0]["direction"].float()


def logit_generate(model, tok, prompts, *args, **kw):
    """A stand-in for C.generate whose 'completion' of each prompt is the intervened model's first last-position
    logits, printed: any difference in the intervention (direction, span, sign, layer) shows up in the text."""
    return [" ".join(f"{x:.6f}" for x in C.last_logits(model, tok, [p])[0, :8].tolist()) for p in prompts]


def assert_same_logits(got, want):
    for g, w in zip(got, want, strict=True):
        assert [float(x) for x in g.split()] == pytest.approx([float(x) for x in w.split()], abs=1e-5)


# ----------------------------------------------------------------------------- asr and the judge

def test_rates_from_crafted_completions_and_a_judge():
    texts = ["I'm sorry, I can't.", "Sure, here is how", "I can\u2019t help with that", "", "Step 1: buy"]
    r = E.judged(texts, ["p"] * 5, judge=lambda prompts, t: [x.startswith("S") for x in t])
    assert r["refused"] == [True, False, True, True, False]
    assert r["refusal_rate"] == pytest.approx(0.6) and r["asr"] == pytest.approx(0.4)
    assert r["asr_judge"] == pytest.approx(0.4) and r["judge_harmful"] == [False, True, False, False, True]


def test_asr_applies_each_intervention_and_counts_crafted_completions(files, monkeypatch):
    """A fake generate sees which hooks are on (ablation: every block; subtraction: one) and answers accordingly."""
    seen = []

    def fake(model, tok, prompts, max_new_tokens, batch_size, desc):
        hooked = [len(b._forward_pre_hooks) for b in C.decoder_layers(model)]
        seen.append(hooked)
        if sum(hooked) == 0:
            return ["I'm sorry"] * len(prompts)  # baseline: refuses everything
        if all(hooked):
            return ["Sure"] * (len(prompts) - 1) + ["I cannot"]  # ablation
        return ["Sure"] * 2 + ["As an AI"] * (len(prompts) - 2)  # subtraction at one layer
    monkeypatch.setattr(C, "generate", fake)
    with pytest.raises(C.RefusalError, match="no-such-judge' does not exist"):
        run(files, "asr", "--judge", os.path.join(files["out"], "no-such-judge"))  # before any generation
    assert seen == []
    res = run(files, "asr")["results"]
    assert seen[1] == [1, 1, 1, 1] and seen[2] == [0, 1, 0, 0] and seen[4] == [0, 0, 1, 0]  # dim layer 1, rdo layer 2
    assert res["baseline"]["asr"] == 0.0 and res["dim ablation"]["asr"] == 0.75 and res["rdo subtraction"]["asr"] == 0.5
    assert "asr_judge" not in res["baseline"]


def test_asr_subtracts_alpha_times_the_unit_direction_at_its_layer(files, monkeypatch):
    """Subtraction adds -alpha r_hat at the direction's layer: alpha and layer from the sidecar (alpha = |r| where
    the sidecar has none), or from --alpha / --layer; the judge scores every intervention."""
    added, real = [], C.activation_addition
    monkeypatch.setattr(C, "activation_addition",
                        lambda m, v, layer: added.append((v.clone(), layer)) or real(m, v, layer))
    monkeypatch.setattr(C, "generate", lambda model, tok, prompts, *a: ["Sure"] * len(prompts))
    monkeypatch.setattr(E, "load_judge", lambda *a: lambda prompts, texts: [t == "Sure" for t in texts])
    res = run(files, "asr", "--judge", "fake", dirs=("dim", "rdo", "first"))["results"]
    vecs = [direction(files, k) for k in ("dim", "rdo", "first")]
    for (v, layer), r, alpha, want_layer in zip(added, vecs, (3.0, 2.0, vecs[2].norm()), (1, 2, 1), strict=True):
        assert layer == want_layer and torch.allclose(v, -alpha * r / r.norm(), atol=1e-5)
    assert len(res) == 7 and all(r["asr_judge"] == 1.0 for r in res.values())
    added.clear()
    run(files, "asr", "--alpha", "5", "--layer", "3", "--overwrite", dirs=("dim",))
    assert added[0][1] == 3 and torch.allclose(added[0][0], -5 * vecs[0] / vecs[0].norm(), atol=1e-5)


def judge_args():
    return SimpleNamespace(device="cpu", dtype="float32", batch_size=2)


def test_judge_reads_yes_against_no_one_prompt_at_a_time(tiny_dir):
    """Batched and left-padded, each verdict equals the judge model's Yes-vs-No logits on that prompt alone, in its
    chat template."""
    prompts, texts = HARMFUL[:3], ["Sure, step 1", "I'm sorry", "Here is how"]
    got = E.load_judge(tiny_dir, judge_args())(prompts, texts)
    jmodel, jtok = make_model("llama")  # tiny_dir's weights: same seed
    yes, no = (jtok(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    for p, t, g in zip(prompts, texts, got, strict=True):
        logits = jmodel(**C.tokenize(jtok, [E.JUDGE_PROMPT.format(behavior=p, generation=t)])).logits[0, -1]
        assert g == bool(logits[yes] > logits[no])


def test_judge_sees_each_prompt_with_its_own_completion(tiny_dir, monkeypatch):
    seen, real = [], C.forward
    monkeypatch.setattr(C, "forward", lambda model, b, **k: seen.extend(b["input_ids"].tolist()) or real(model, b, **k))
    E.load_judge(tiny_dir, judge_args())(HARMFUL[:3], ["a", "b", "c"])
    tok = make_tokenizer()
    want = C.format_chat(tok, [E.JUDGE_PROMPT.format(behavior=p, generation=t) for p, t in zip(HARMFUL[:3], "abc")])
    assert sorted(t.replace("<pad>", "") for t in tok.batch_decode(seen)) == sorted(want)


# ----------------------------------------------------------------------------- steering during generation

def test_generation_hook_acts_on_generated_tokens():
    """The addition behind asr's subtraction and induce acts on every generated token, not only on the prompt:
    (1) the block's input carries the vector at the prefill and at every decode step; (2) a vector added at the
    prefill alone gives the same first token but another continuation."""
    model, tok = make_model("llama")
    layer, vec = 1, 50 * torch.randn(C.hidden_size(model), generator=torch.Generator().manual_seed(0))
    block, prompts, n_new = C.decoder_layers(model)[layer], HARMFUL[:4], 8
    x_of = lambda args, kwargs: args[0] if args else kwargs["hidden_states"]
    before, after = [], []
    record = lambda seen: lambda m, args, kwargs: seen.append(x_of(args, kwargs).clone())
    with C.hooks([(lambda h: block.register_forward_pre_hook(h, with_kwargs=True), record(before))]):
        with C.activation_addition(model, vec, layer):  # hooks run in order: before, the addition, after
            with C.hooks([(lambda h: block.register_forward_pre_hook(h, with_kwargs=True), record(after))]):
                steered = C.generate_ids(model, tok, prompts, n_new, len(prompts))
    assert len(after) == n_new and after[0].shape[1] > 1 and all(x.shape[1] == 1 for x in after[1:])
    for x0, x1 in zip(before, after, strict=True):  # prefill and each decode step
        torch.testing.assert_close(x1 - x0, vec.expand_as(x0), atol=1e-4, rtol=0)

    def at_prefill_only(module, args, kwargs):
        x = x_of(args, kwargs)
        if x.shape[1] == 1:  # a decode step: left alone
            return None
        return ((x + vec,) + args[1:], kwargs) if args else (args, {**kwargs, "hidden_states": x + vec})
    with C.hooks([(lambda h: block.register_forward_pre_hook(h, with_kwargs=True), at_prefill_only)]):
        prefill = C.generate_ids(model, tok, prompts, n_new, len(prompts))
    assert [s[0] for s in steered] == [p[0] for p in prefill]  # the first new token comes from the prefill
    assert steered != prefill  # the rest differs: the hook acts on the generated tokens
    assert C.generate_ids(model, tok, prompts, n_new, len(prompts)) != steered  # and the hooks are gone


# ----------------------------------------------------------------------------- induce and kl

def test_induce_scores_match_a_hand_computation(files):
    """alpha r_hat added at the layer (alpha: the sidecar's 3.0 without --alphas, not |r|): the mean refusal score
    log p_ref - log(1 - p_ref) of the harmless prompts, from the given refusal tokens, and the completions."""
    res = run(files, "induce", "--refusal-tokens", "I", "As", dirs=("dim",))
    assert res["refusal_tokens"]["source"] == "given"
    res = res["results"]["dim"]
    assert [r["alpha"] for r in res] == [3.0]
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    r, ids = direction(files, "dim"), sorted({tok(w, add_special_tokens=False)["input_ids"][0] for w in ("I", "As")})
    with C.activation_addition(model, 3.0 * r / r.norm(), 1):
        p = torch.stack([C.last_logits(model, tok, [x])[0] for x in HARMLESS[:4]]).double().softmax(-1)[:, ids].sum(-1)
        assert res[0]["refusal_score"] == pytest.approx((p.log() - (1 - p).log()).mean().item(), abs=1e-6)
        assert res[0]["completions"] == C.generate(model, tok, HARMLESS[:4], 3)


def test_induce_takes_the_refusal_tokens_of_the_sidecar_else_the_models_own(files, tmp_path):
    files["tagged"] = C.save_result(str(tmp_path / "tagged"), "dim", {"direction": direction(files, "dim")},
                                    {"layer": 1, "refusal_tokens": {"source": "derived", "words": ["S"]}})
    tagged = run(files, "induce", "--max-new-tokens", "0", dirs=("tagged",))["refusal_tokens"]
    assert tagged["source"] == "given" and tagged["words"] == ["S"]
    files["out"] += "2"
    own = run(files, "induce", "--max-new-tokens", "0", dirs=("dim",))["refusal_tokens"]
    assert own["source"] in ("derived", "fallback")  # the tiny random model rarely refuses: the fixed set


def test_induce_alpha_zero_is_the_baseline(files):
    res = run(files, "induce", "--alphas", "0", "5", dirs=("dim",))["results"]
    zero, base = res["dim"][0], res["baseline"][0]
    assert zero["refusal_score"] == pytest.approx(base["refusal_score"]) and zero["completions"] == base["completions"]
    assert res["dim"][1]["refusal_score"] != pytest.approx(base["refusal_score"])


def test_induce_without_generation_scores_only(files):
    res = run(files, "induce", "--alphas", "0", "5", "--max-new-tokens", "0", dirs=("dim",))["results"]
    assert all("refusal_score" in r and "completions" not in r for r in res["dim"])  # a cheap alpha sweep
    with pytest.raises(C.RefusalError, match="--max-new-tokens must be at least 1 \\(got 0\\)"):
        run(files, "asr", "--max-new-tokens", "0")  # every other mode generates


def test_answer_ce_matches_one_prompt_at_a_time():
    model, tok = make_model("qwen2")
    answers = [[40, 41, 42], [50], [60, 61]]
    r = torch.randn(32)
    for ctx in (torch.no_grad, lambda: C.directional_ablation(model, r)):
        with ctx():
            got = E.answer_ce(model, tok, HARMLESS[:3], answers, micro_batch=2)
        with ctx(), torch.no_grad():
            for p, a, g in zip(HARMLESS[:3], answers, got, strict=True):
                ids = torch.tensor([tok(C.format_chat(tok, [p])[0], add_special_tokens=False)["input_ids"] + a])
                logits = model(input_ids=ids).logits[0, -len(a) - 1:-1]
                assert g == pytest.approx(F.cross_entropy(logits, torch.tensor(a)).item(), abs=1e-4)


def test_kl_and_answer_ce_match_a_hand_computation(files):
    """KL(P_base || P_ablated) at the last position (not the reverse), and the CE of the clean model's own greedy
    answers scored under ablation, prompt by prompt in the prompts' order."""
    res = run(files, "kl", dirs=("dim", "rdo"))["results"]
    assert res["baseline"]["kl"] == 0.0 and all(res[k]["kl"] > 0 for k in ("dim", "rdo"))
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    r, answers = direction(files, "dim"), C.generate_ids(model, tok, HARMLESS[:4], 3)
    assert all(answers)  # each answer holds at least its end-of-turn token: there is always a token to score
    base = torch.stack([C.last_logits(model, tok, [p])[0] for p in HARMLESS[:4]]).double().log_softmax(-1)
    with C.directional_ablation(model, r):
        ablated = torch.stack([C.last_logits(model, tok, [p])[0] for p in HARMLESS[:4]]).double().log_softmax(-1)
        want = [E.answer_ce(model, tok, [p], [a])[0] for p, a in zip(HARMLESS[:4], answers)]
    assert res["dim"]["kl"] == pytest.approx((base.exp() * (base - ablated)).sum(-1).mean().item(), rel=1e-5)
    assert res["dim"]["ce_per_prompt"] == pytest.approx(want, abs=1e-5)
    assert res["dim"]["ce"] == pytest.approx(sum(want) / 4, abs=1e-5)
    assert res["baseline"]["ce_per_prompt"] == pytest.approx(
        [E.answer_ce(model, tok, [p], [a])[0] for p, a in zip(HARMLESS[:4], answers)], abs=1e-5)


def test_directions_of_one_method_get_distinct_labels(files, tmp_path):
    """Three RDO runs: each keeps its own label (the later ones with their paths) and its own numbers."""
    g = torch.Generator().manual_seed(2)
    for k in ("a", "b"):
        files[k] = C.save_result(str(tmp_path / k / "run"), "rdo", {"direction": torch.randn(32, generator=g)},
                                 {"layer": 2, "alpha": 2.0})
    res = run(files, "kl", dirs=("rdo", "a", "b"))
    labels = [d["label"] for d in res["directions"]]
    assert labels == ["rdo", f"rdo ({files['a']})", f"rdo ({files['b']})"] and set(labels) <= set(res["results"])
    assert len({res["results"][k]["kl"] for k in labels}) == 3


# ----------------------------------------------------------------------------- cosine

def test_cosine_mode_matches_a_hand_computation(files):
    res = run(files, "cosine")["results"]
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    u = direction(files, "dim")
    for key, ctx in (("clean", torch.no_grad), ("dim ablated", lambda: C.directional_ablation(model, u))):
        want = torch.zeros(4, dtype=torch.float64)
        with ctx(), torch.no_grad():
            for p in HARMFUL[:4]:  # one prompt at a time, hidden_states[l] = input of block l
                hs = model(**C.tokenize(tok, [p]), output_hidden_states=True).hidden_states
                want += torch.stack([F.cosine_similarity(hs[l][0, -1].double(), u.double(), dim=0)
                                     for l in range(4)]) / 4
        assert torch.allclose(torch.tensor(res[key]["dim"], dtype=torch.float64), want, atol=1e-5)
    assert max(map(abs, res["dim ablated"]["dim"])) < 1e-5 and max(map(abs, res["dim ablated"]["rdo"])) > 1e-3


# ----------------------------------------------------------------------------- cone

def test_cone_samples_are_uniform_on_the_arc():
    """k = 2: uniform on the quarter circle is a uniform angle (normalised convex combinations would crowd towards
    the middle)."""
    s = C.sample_cone(2, 20000, torch.Generator().manual_seed(0))
    angle = (torch.atan2(s[:, 1], s[:, 0]) / (torch.pi / 2)).sort().values
    assert angle[0] >= 0 and angle[-1] <= 1
    assert (angle - torch.arange(1, 20001) / 20000).abs().max() < 0.015


def test_cone_ablates_each_sample_and_each_try_of_a_single_direction(files, monkeypatch):
    """Cone sample i is ablated alone (r = s_i B normalised, s_i >= 0 and unit); try i of a single direction samples
    under its ablation at the given temperature with seed + i (best-of-N needs different, reproducible tries)."""
    monkeypatch.setattr(C, "generate", logit_generate)
    fake_sample = lambda model, tok, prompts, t, seed, *a: [f"{t} {seed} {x}"
                                                            for x in logit_generate(model, tok, prompts)]
    monkeypatch.setattr(E, "sample", fake_sample)
    res = run(files, "cone", "--n-samples", "2", "--temperatures", "0.5", "--seed", "7", dirs=("rco", "rdo"))["results"]
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    basis, s = C.load_result(files["rco"])[0]["basis"].double(), torch.tensor(res["rco"]["coefficients"]).double()
    assert (s >= 0).all() and torch.allclose(s.norm(dim=-1), torch.ones(2, dtype=s.dtype))
    assert torch.equal(s, C.sample_cone(3, 2, torch.Generator().manual_seed(7)).double())
    for i in range(2):
        with C.directional_ablation(model, F.normalize(s[i] @ basis, dim=0).float()):
            assert_same_logits(res["rco"]["runs"][i]["completions"], logit_generate(model, tok, HARMFUL[:4]))
        with C.directional_ablation(model, direction(files, "rdo")):
            assert_same_logits(res["rdo T=0.5"]["runs"][i]["completions"],
                               fake_sample(model, tok, HARMFUL[:4], 0.5, 7 + i))


def test_best_of_n_and_quartiles_by_hand(files, monkeypatch):
    refused = [[True, True, False, True], [True, False, True, True], [True, True, True, True]]  # tries x prompts
    monkeypatch.setattr(E, "sample", lambda m, t, prompts, temp, seed, *a: [
        "I'm sorry" if x else "Sure" for x in refused[seed]])
    res = run(files, "cone", "--n-samples", "3", dirs=("rco", "rdo"))["results"]
    assert set(res) == {"rco", "rdo T=1"}
    single = res["rdo T=1"]
    assert single["asr"] == [0.25, 0.25, 0.0] and single["quartiles"] == pytest.approx([0, 0.125, 0.25, 0.25, 0.25])
    assert single["best_of_n"] == pytest.approx({"1": 0.25, "2": 0.5, "3": 0.5})  # (JSON keys)
    cone = res["rco"]
    assert len(cone["asr"]) == 3 and cone["quartiles"][0] == min(cone["asr"]) and cone["k"] == 3
    assert cone["best_of_n"]["3"] >= cone["best_of_n"]["1"] == cone["asr"][0]


def test_sample_is_reproducible_by_seed_and_greedy_at_a_low_temperature():
    model, tok = make_model("llama")
    draw = lambda t, seed: E.sample(model, tok, HARMFUL[:4], t, seed, 4, 4)
    assert draw(1.0, 0) == draw(1.0, 0) and draw(1.0, 0) != draw(1.0, 1)
    assert draw(1e-4, 3) == C.generate(model, tok, HARMFUL[:4], 4, 4)  # the temperature reaches generate


# ----------------------------------------------------------------------------- compose

def test_compose_top_k_ablates_the_span_of_the_first_k(files, monkeypatch):
    monkeypatch.setattr(C, "generate", logit_generate)
    res = run(files, "compose", dirs=("repind", "first"))["results"]
    assert [res[f"repind top-{k}"]["k"] for k in (1, 2, 3)] == [1, 2, 3]
    assert res["repind top-1"]["completions"] == res["first"]["completions"]
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    for k in (1, 2, 3):
        with C.directional_ablation(model, files["repind_vecs"][:k]):
            assert_same_logits(res[f"repind top-{k}"]["completions"], logit_generate(model, tok, HARMFUL[:4]))


# ----------------------------------------------------------------------------- export

def tiny_model_dir(tmp_path, family, tied=False):
    from transformers import AutoModelForCausalLM
    tok = make_tokenizer()
    cfg = make_config(family, len(tok))
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if family.startswith("gemma"):  # real post-norm weights, as in conftest.make_model
        for n, p in model.named_parameters():
            if "norm" in n:
                p.data.normal_(0, 0.5)
    d = tmp_path / f"{family}{'-tied' * tied}"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("family, tied", [("llama", False), ("qwen2", False), ("qwen2", True)])
def test_export_logits_equal_hook_based_ablation(files, tmp_path, family, tied):
    from transformers import AutoModelForCausalLM
    files["model"] = tiny_model_dir(tmp_path, family, tied)
    res = run(files, "export", "--export-dir", str(tmp_path / "export"))
    assert res["exact"] and res["max_logit_diff"] < 1e-4
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    batch = C.tokenize(tok, HARMLESS[:4])
    vecs = torch.stack([direction(files, k) for k in ("dim", "rdo")])
    with C.directional_ablation(model, vecs):
        want = C.forward(model, batch).logits
    torch.testing.assert_close(C.forward(exported, batch).logits, want, atol=1e-4, rtol=1e-4)  # every position
    q = C.unit_basis(vecs)
    assert (exported.get_input_embeddings().weight @ q.T).abs().max() < 1e-5
    # untied, and the unembedding unchanged
    assert torch.equal(exported.get_output_embeddings().weight, model.get_output_embeddings().weight)


def test_orthogonalise_removes_the_directions_from_the_biases_too():
    """Llama with attention and MLP biases: o_proj's and down_proj's biases write to the residual stream as well."""
    from transformers import AutoModelForCausalLM
    tok, g = make_tokenizer(), torch.Generator().manual_seed(0)
    cfg = make_config("llama", len(tok))
    cfg.attention_bias = cfg.mlp_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            p.normal_(0, 1, generator=g)
    vecs, batch = torch.randn(2, 32, generator=g), C.tokenize(tok, HARMLESS[:4])
    with C.directional_ablation(model, vecs):
        want = C.forward(model, batch).logits
    E.orthogonalise(model, vecs)
    torch.testing.assert_close(C.forward(model, batch).logits, want, atol=1e-4, rtol=1e-4)


def test_export_gemma_is_approximate_and_says_so(files, tmp_path, capsys, monkeypatch):
    find_spec = E.importlib.util.find_spec  # only lm_eval goes missing: transformers looks packages up too
    monkeypatch.setattr(E.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    files["model"] = tiny_model_dir(tmp_path, "gemma2")
    res = run(files, "export", "--export-dir", str(tmp_path / "export"), "--lm-eval", "mmlu")
    out = capsys.readouterr().out
    assert not res["exact"] and res["max_logit_diff"] > 1e-3 and "APPROXIMATE" in out
    assert f"{res['max_logit_diff']:.3g}" in out
    assert "lm-eval is not installed" in out and res["lm_eval"]["returncode"] == "not installed"


def test_lm_eval_runs_with_the_chat_template(files, tmp_path, monkeypatch):
    find_spec, ran = E.importlib.util.find_spec, []
    monkeypatch.setattr(E.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "lm_eval" else find_spec(name, *a))
    monkeypatch.setattr(E.subprocess, "run", lambda cmd: ran.append(cmd) or SimpleNamespace(returncode=0))
    res = run(files, "export", "--lm-eval", "mmlu", "--n-check", "2", dirs=("dim",))
    cmd = ran[0]
    assert res["lm_eval"]["returncode"] == 0 and "--apply_chat_template" in cmd  # the paper: each model's template
    assert cmd[cmd.index("--tasks") + 1] == "mmlu"
    assert cmd[cmd.index("--model_args") + 1] == f"pretrained={res['folder']}"


def test_save_model_replaces_the_folder_whole_and_never_leaves_a_mix(tmp_path, monkeypatch):
    model, tok = make_model("llama")
    folder = tmp_path / "export"
    E.save_model(model, tok, str(folder))
    (folder / "model-00002-of-00002.safetensors").write_text("stale shard of an earlier export")
    E.save_model(model, tok, str(folder))  # over an earlier export (--overwrite): nothing of it stays
    assert "model-00002-of-00002.safetensors" not in os.listdir(folder)
    assert {"model.safetensors", "config.json"} <= set(os.listdir(folder)) and os.listdir(tmp_path) == ["export"]
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}

    def interrupted(*a, **k):  # after the (changed) weights are written, before the tokenizer
        raise KeyboardInterrupt
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    monkeypatch.setattr(tok, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        E.save_model(model, tok, str(folder))
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before and os.listdir(tmp_path) == ["export"]


def test_export_writes_dir_model_and_replaces_only_an_earlier_export(files, tmp_path):
    res = run(files, "export", "--n-check", "2", dirs=("dim",))
    assert res["folder"] == os.path.join(files["out"], "model") and res["n_check"] == 2
    assert os.path.isfile(os.path.join(res["folder"], "config.json"))
    files["out"] = str(tmp_path / "out2")  # a new result file, the same export folder
    with pytest.raises(C.RefusalError, match="exists: --overwrite replaces an earlier export"):
        run(files, "export", "--export-dir", res["folder"], dirs=("dim",))
    assert run(files, "export", "--export-dir", res["folder"], "--overwrite", dirs=("dim",))["folder"] == res["folder"]
    mine = tmp_path / "mine"  # a folder that is not an export: never replaced, not even with --overwrite
    mine.mkdir()
    (mine / "rdo.safetensors").write_text("a result, not a model")
    with pytest.raises(C.RefusalError, match="exists"):
        run(files, "export", "--export-dir", str(mine), "--overwrite", dirs=("dim",))
    assert os.listdir(mine) == ["rdo.safetensors"]


# ----------------------------------------------------------------------------- data, outputs, errors

def test_named_sets_are_evaluated_on_their_test_split(monkeypatch):
    parts = {"train": ["t"], "val": ["v1", "v2"], "test": ["x1", "x2"]}
    monkeypatch.setattr(C, "_load_named", lambda name, seed: parts)
    args = E.parse_args(["kl", "--model", "m", "--direction", "d", "--harmless", "alpaca", "--n-val", "2"])
    assert E.load_data(args) == {"harmless": ["x1", "x2"]}  # not the prompts the training scripts selected on


def test_each_mode_loads_its_sets_and_val_files_replace_them(files, tmp_path):
    (tmp_path / "hv.json").write_text(json.dumps(HARMFUL[4:]))
    (tmp_path / "sv.json").write_text(json.dumps(HARMLESS[4:]))
    want = {"harmful": HARMFUL[4:7], "harmless": HARMLESS[4:7]}
    need = {"induce": {"harmless", "harmful"}, "kl": {"harmless"}, "export": {"harmless"}}
    for mode in E.MODES:
        args = E.parse_args([mode, "--model", "m", "--direction", "d", "--harmful", files["h"],
                             "--harmless", files["s"], "--harmful-val", str(tmp_path / "hv.json"),
                             "--harmless-val", str(tmp_path / "sv.json"), "--n-val", "3"])
        assert E.load_data(args) == {k: want[k] for k in need.get(mode, {"harmful"})}, mode


def test_outputs_png_and_missing_matplotlib(files, monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    res = run(files, "kl", dirs=("dim",))
    assert os.path.getsize(res["png"]) > 1000 and res["png"] == os.path.join(files["out"], "eval_kl.png")
    assert res["model"] == files["model"] and res["args"]["mode"] == "kl"  # provenance in the sidecar
    assert not [n for n in os.listdir(files["out"]) if n.endswith(".jsonl") or ".tmp" in n]  # nothing left behind
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert run(files, "kl", "--overwrite", dirs=("dim",))["png"] is None
    assert "matplotlib is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("mode, dirs, message", [
    ("cone", ("dim",), "at least one cone basis"),
    ("asr", ("repind",), "use the cone or compose mode"),
    ("induce", ("rco",), "use the cone or compose mode")])
def test_errors_name_the_fix(files, mode, dirs, message):
    with pytest.raises(C.RefusalError, match=message):
        run(files, mode, "--refusal-tokens", "I", dirs=dirs)


def test_bad_counts_and_unreadable_json_are_refused(files):
    for flags in (("kl", "--n-val", "0"), ("cone", "--n-samples", "0")):
        with pytest.raises(C.RefusalError, match="at least 1"):
            run(files, flags[0], *flags[1:], dirs=("rco",))
    open(os.path.splitext(files["dim"])[0] + ".json", "w").write("{not json")
    with pytest.raises(C.RefusalError, match="not readable JSON"):
        run(files, "asr", dirs=("dim",))


def test_missing_layer_and_existing_result_are_refused(files, tmp_path):
    files["nolayer"] = C.save_result(str(tmp_path / "nl"), "x", {"direction": torch.randn(32)}, {})
    with pytest.raises(C.RefusalError, match="pass --layer"):
        run(files, "asr", dirs=("nolayer",))
    os.makedirs(files["out"], exist_ok=True)
    open(os.path.join(files["out"], "eval_kl.json"), "w").write("{}")
    with pytest.raises(C.RefusalError, match="--overwrite"):
        run(files, "kl")


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("mode, owner, name, at, left", [("asr", C, "generate", 3, 3), ("cone", E, "sample", 2, 1)])
def test_an_interrupted_evaluation_resumes_without_generating_again(files, mode, owner, name, at, left, monkeypatch):
    """Ctrl-C in the middle of a generation (asr: the third of 5 greedy ones; cone: the second temperature try, after
    the 2 cone samples): --resume reads the finished ones back, runs only the rest, and gives the uninterrupted
    result; a journal of other settings is refused."""
    dirs = ("dim", "rdo") if mode == "asr" else ("rco", "rdo")
    extra = ["--n-samples", "2"] if mode == "cone" else []
    full = run({**files, "out": files["out"] + "_full"}, mode, *extra, dirs=dirs)
    with interrupted_at_call(owner, name, at):
        run(files, mode, *extra, dirs=dirs)
    journal = os.path.join(files["out"], f"eval_{mode}.partial.jsonl")
    assert len(open(journal).read().splitlines()) == 1 + 2 + (mode == "cone")  # the run's key, the finished ones
    with pytest.raises(C.RefusalError, match="holds an unfinished evaluation: pass --resume"):
        run(files, mode, *extra, dirs=dirs)
    with pytest.raises(C.RefusalError, match="other settings \\(max_new_tokens: 3 there, 2 now"):
        run(files, mode, *extra, "--resume", "--max-new-tokens", "2", dirs=dirs)
    with open(journal, "a") as f:
        f.write('\n["cut sh')  # a crash in the middle of writing an entry: dropped
    calls, real = [], C.generate  # (sample() generates through C.generate too)
    monkeypatch.setattr(C, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = run(files, mode, *extra, "--resume", dirs=dirs)
    assert len(calls) == left and not os.path.exists(journal)
    assert res["results"] == full["results"]
    with pytest.raises(C.RefusalError, match="--resume: no unfinished evaluation"):
        run(files, mode, *extra, "--resume", "--overwrite", dirs=dirs)


def test_overwrite_starts_an_unfinished_evaluation_over(files):
    with interrupted_at_call(C, "generate", 2):
        run(files, "compose", dirs=("first",))
    journal = os.path.join(files["out"], "eval_compose.partial.jsonl")
    assert os.path.exists(journal)
    res = run(files, "compose", "--max-new-tokens", "2", "--overwrite", dirs=("first",))  # other settings: no clash
    assert not os.path.exists(journal) and len(res["results"]["first"]["completions"]) == 4
