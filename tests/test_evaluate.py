"""evaluate.py: each mode's numbers on tiny models (crafted completions, hand computations, export equivalence),
missing optional packages, and error paths."""
import json, os, sys
from types import SimpleNamespace

import pytest
import torch

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
    f["dim"] = C.save_result(str(tmp_path / "dim"), "dim", {"direction": 3 * torch.randn(32, generator=g)}, {"layer": 1, "alpha": 3.0})
    f["rdo"] = C.save_result(str(tmp_path / "rdo"), "rdo", {"direction": torch.randn(32, generator=g)}, {"layer": 2, "alpha": 2.0})
    f["rco"] = C.save_result(str(tmp_path / "rco"), "rco", {"basis": torch.linalg.qr(torch.randn(32, 3, generator=g))[0].T}, {})
    f["repind"] = C.save_result(str(tmp_path / "repind"), "repind", {"directions": f["repind_vecs"]}, {})
    f["first"] = C.save_result(str(tmp_path / "first"), "first", {"direction": f["repind_vecs"][0]}, {"layer": 1})
    return f


def run(f, mode, *extra, dirs=("dim", "rdo")):
    E.main([mode, "--model", f["model"], "--dtype", "float32", "--harmful", f["h"], "--harmless", f["s"], "--n-val", "4",
            "--max-new-tokens", "3", "--out", f["out"], "--direction", *[f[d] for d in dirs], *extra])
    return json.load(open(os.path.join(f["out"], f"eval_{mode}.json")))


def test_rates_from_crafted_completions_and_a_judge():
    texts = ["I'm sorry, I can't.", "Sure, here is how", "I can\u2019t help with that", "", "Step 1: buy"]
    r = E.judged(texts, ["p"] * 5, judge=lambda prompts, t: [x.startswith("S") for x in t])
    assert r["refused"] == [True, False, True, True, False]
    assert r["refusal_rate"] == pytest.approx(0.6) and r["asr"] == pytest.approx(0.4)
    assert r["asr_judge"] == pytest.approx(0.4) and r["judge_harmful"] == [False, True, False, False, True]


def test_asr_applies_each_intervention_and_counts_crafted_completions(files, monkeypatch):
    """A fake generate sees which hooks are on (ablation: every block; subtraction: one block) and answers accordingly."""
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
    with pytest.raises(C.RefusalError, match="--judge .*no-such-judge could not be loaded .*run without --judge"):
        run(files, "asr", "--judge", os.path.join(files["out"], "no-such-judge"))  # before any generation
    assert seen == []
    res = run(files, "asr")["results"]
    assert seen[1] == [1, 1, 1, 1] and seen[2] == [0, 1, 0, 0] and seen[4] == [0, 0, 1, 0]  # dim layer 1, rdo layer 2
    assert res["baseline"]["asr"] == 0.0 and res["dim ablation"]["asr"] == 0.75 and res["rdo subtraction"]["asr"] == 0.5
    assert "asr_judge" not in res["baseline"]


def test_best_of_n_by_hand():
    refused = [[True, True, False], [True, False, True], [True, True, True]]  # tries x prompts
    assert E.best_of_n(refused, [1, 2, 3]) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 2 / 3})


def test_cone_samples_are_unit_and_have_nonnegative_coefficients():
    basis = torch.linalg.qr(torch.randn(16, 4))[0].T
    s, r = E.cone_samples(basis, 500, seed=0)
    assert torch.allclose(r.norm(dim=-1), torch.ones(500), atol=1e-5)
    assert torch.allclose((r.double() @ basis.double().T), s, atol=1e-5) and (s >= 0).all()
    assert (s.mean(0) - s.mean()).abs().max() < 0.05  # uniform: no basis vector favoured


def test_cone_mode_reports_distribution_and_best_of_n(files):
    res = run(files, "cone", "--n-samples", "3", dirs=("rco", "rdo"))["results"]
    assert set(res) == {"rco", "rdo T=1"}
    assert len(res["rco"]["asr"]) == 3 and res["rco"]["quartiles"][0] == min(res["rco"]["asr"])
    assert list(res["rdo T=1"]["best_of_n"]) == ["1", "2", "3"]  # JSON keys
    assert res["rco"]["best_of_n"]["3"] >= res["rco"]["best_of_n"]["1"]


def test_cosine_mode_matches_a_hand_computation(files):
    res = run(files, "cosine", "--suffix", "x y z")["results"]
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    u = C.load_direction(files["dim"], model)[0]
    for key, prompts in (("clean", HARMFUL[:4]), ("with suffix", [p + " x y z" for p in HARMFUL[:4]])):
        want = torch.zeros(4, dtype=torch.float64)
        for p in prompts:  # one prompt at a time, hidden_states[l] = input of block l
            hs = model(**C.tokenize(tok, [p]), output_hidden_states=True).hidden_states
            want += torch.stack([torch.cosine_similarity(hs[l][0, -1].double(), u.double(), dim=0) for l in range(4)]) / 4
        assert torch.allclose(torch.tensor(res[key]["dim"], dtype=torch.float64), want, atol=1e-5)
    assert max(map(abs, res["dim ablated"]["dim"])) < 1e-5 and max(map(abs, res["dim ablated"]["rdo"])) > 1e-3


def test_cosine_suffix_from_a_gcg_result(files, tmp_path):
    gcg = tmp_path / "gcg.json"
    gcg.write_text(json.dumps({"results": [{"instruction": "a", "suffix": " x y z"}, {"suffix": "other"}]}))
    by_file = run(files, "cosine", "--suffix", str(gcg))
    assert by_file["suffix"] == " x y z"
    by_text = run(files, "cosine", "--suffix", "x y z", "--overwrite")
    assert by_file["results"]["with suffix"] == by_text["results"]["with suffix"]
    gcg.write_text(json.dumps({"results": [{"suffix": "x y z", "suffix_retokenizes": True}]}))  # an older gcg.json
    older = run(files, "cosine", "--suffix", str(gcg), "--overwrite")
    assert older["suffix"] == " x y z" and older["results"]["with suffix"] == by_text["results"]["with suffix"]
    for wrong in ({"suffix": "old layout"}, ["x"], {"results": {"clean": []}}):
        gcg.write_text(json.dumps(wrong))
        with pytest.raises(C.RefusalError, match="no 'results' with a 'suffix'"):
            run(files, "cosine", "--suffix", str(gcg), "--overwrite")


def test_answer_ce_matches_one_prompt_at_a_time():
    model, tok = make_model("qwen2")
    answers = [[40, 41, 42], [50], [60, 61]]
    r = torch.randn(32)
    for ctx in (torch.no_grad, lambda: C.directional_ablation(model, r)):
        got = E.answer_ce(model, tok, HARMLESS[:3], answers, ctx(), micro_batch=2)
        with ctx(), torch.no_grad():
            for p, a, g in zip(HARMLESS[:3], answers, got):
                ids = torch.tensor([tok(C.format_chat(tok, [p])[0], add_special_tokens=False)["input_ids"] + a])
                logits = model(input_ids=ids).logits[0, -len(a) - 1:-1]
                assert g == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(a)).item(), abs=1e-4)


def test_kl_mode(files):
    res = run(files, "kl")["results"]
    assert res["baseline"]["ce_increase"] == 0.0 and res["baseline"]["kl"] == 0.0
    assert all(res[k]["kl"] > 0 for k in ("dim", "rdo"))
    assert res["dim"]["ce_increase"] == pytest.approx(res["dim"]["ce"] - res["baseline"]["ce"])


def test_directions_of_one_method_get_distinct_labels(files, tmp_path):
    """Three RDO runs, two of them in folders of one name: each keeps its own label and its own numbers."""
    g = torch.Generator().manual_seed(2)
    for k, folder in (("a", "a/run"), ("b", "b/run")):
        files[k] = C.save_result(str(tmp_path / folder), "rdo", {"direction": torch.randn(32, generator=g)}, {"layer": 2, "alpha": 2.0})
    res = run(files, "kl", dirs=("rdo", "a", "b"))
    labels = [d["label"] for d in res["directions"]]
    assert labels[:2] == ["rdo", "rdo (run)"] and labels[2] == f"rdo ({files['b']})" and set(labels) <= set(res["results"])
    assert len({res["results"][k]["kl"] for k in labels}) == 3


def test_induce_alpha_zero_is_the_baseline(files):
    res = run(files, "induce", "--alphas", "0", "5", "--benign", files["s"], dirs=("dim",))["results"]
    zero, base = res["dim"][0], res["baseline"][0]
    assert zero["refusal_score"] == pytest.approx(base["refusal_score"]) and zero["completions"] == base["completions"]
    assert res["dim"][1]["refusal_score"] != pytest.approx(base["refusal_score"])
    assert {"harmful_refusal_score", "benign_refusal_score"} <= set(zero)


def test_induce_without_generation_scores_only(files):
    res = run(files, "induce", "--alphas", "0", "5", "--max-new-tokens", "0", dirs=("dim",))["results"]
    assert all("refusal_score" in r and "completions" not in r for r in res["dim"])  # a cheap alpha sweep
    with pytest.raises(C.RefusalError, match="--max-new-tokens must be at least 1 \\(got 0\\)"):
        run(files, "asr", "--max-new-tokens", "0")  # every other mode generates


def test_compose_top1_equals_ablating_the_first_direction(files):
    res = run(files, "compose", dirs=("repind", "first"))["results"]
    assert [res[f"repind top-{k}"]["k"] for k in (1, 2, 3)] == [1, 2, 3]
    assert res["repind top-1"]["completions"] == res["first"]["completions"]


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
    vecs = torch.stack([C.load_direction(files[k], model)[0] for k in ("dim", "rdo")])
    with C.directional_ablation(model, vecs):
        want = C.forward(model, batch).logits
    torch.testing.assert_close(C.forward(exported, batch).logits, want, atol=1e-4, rtol=1e-4)  # every position
    q = C.unit_basis(vecs)
    assert (exported.get_input_embeddings().weight @ q.T).abs().max() < 1e-5
    assert torch.equal(exported.get_output_embeddings().weight, model.get_output_embeddings().weight)  # untied, unchanged


def test_export_goes_through_a_temporary_folder(tmp_path, monkeypatch):
    model, tok = make_model("llama")
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "rdo.safetensors").write_text("a result, not a model: kept")
    E.save_model(model, tok, str(folder))  # into a folder that holds no model: nothing of it is removed
    assert (folder / "rdo.safetensors").read_text().endswith("kept")
    for name, text in (("model-00002-of-00002.safetensors", "stale"), ("notes.txt", "mine")):
        (folder / name).write_text(text)
    E.save_model(model, tok, str(folder))  # over an earlier export (--overwrite): its stale shard goes
    names = set(os.listdir(folder))
    assert "model-00002-of-00002.safetensors" not in names
    assert {"model.safetensors", "config.json", "notes.txt", "rdo.safetensors"} <= names
    assert os.listdir(tmp_path) == ["export"]  # no temporary folder left
    before = {n: (folder / n).read_bytes() for n in names}

    def interrupted(*a, **k):  # after the (changed) weights are written, before the tokenizer
        raise KeyboardInterrupt
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    monkeypatch.setattr(tok, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        E.save_model(model, tok, str(folder))
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before and os.listdir(tmp_path) == ["export"]


def test_export_gemma_is_approximate_and_says_so(files, tmp_path, capsys):
    files["model"] = tiny_model_dir(tmp_path, "gemma2")
    res = run(files, "export", "--export-dir", str(tmp_path / "export"), "--lm-eval", "mmlu")
    out = capsys.readouterr().out
    assert not res["exact"] and res["max_logit_diff"] > 1e-3 and "APPROXIMATE" in out
    assert f"{res['max_logit_diff']:.3g}" in out
    if E.importlib.util.find_spec("lm_eval") is None:
        assert "lm-eval is not installed" in out and "skipped" in res["lm_eval"]


def test_lm_eval_applies_the_chat_template(monkeypatch):
    monkeypatch.setattr(E.importlib.util, "find_spec", lambda name, *a: object())  # as if lm_eval were installed
    ran = []
    monkeypatch.setattr(E.subprocess, "run", lambda cmd: ran.append(cmd) or SimpleNamespace(returncode=0))
    assert E.run_lm_eval("folder", "mmlu", "cpu")["returncode"] == 0
    assert "--apply_chat_template" in ran[0] and ran[0][ran[0].index("--tasks") + 1] == "mmlu"  # Appendix A.3


def test_named_sets_are_evaluated_on_their_test_split(monkeypatch):
    parts = {"train": ["t"], "val": ["v1", "v2"], "test": ["x1", "x2"]}
    monkeypatch.setattr(C, "_load_named", lambda name, seed: parts)
    args = E.parse_args(["kl", "--model", "m", "--direction", "d", "--harmless", "alpaca", "--n-val", "2"])
    assert E.load_data(args) == {"harmless": ["x1", "x2"]}  # not the prompts the training scripts selected on


def test_missing_optional_packages(monkeypatch, capsys, tmp_path):
    find_spec = E.importlib.util.find_spec  # only lm_eval goes missing: transformers looks packages up too
    monkeypatch.setattr(E.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    assert "not installed" in E.run_lm_eval("folder", "mmlu", "cpu")["skipped"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert C.plot_panels(str(tmp_path / "x.png"), [("bar", {"a": 1}, {})]) is None and not (tmp_path / "x.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    panels = [("bar", {"a": 0.5}, {}), ("box", {"c": [0.1, 0.5]}, {}), ("line", {"b": ([1, 2], [0.1, 0.2])}, {"ylim": (0, 1)})]
    assert os.path.getsize(C.plot_panels(str(tmp_path / "x.png"), panels)) > 1000
    assert os.listdir(tmp_path) == ["x.png"]  # written atomically: no temp file left


@pytest.mark.parametrize("mode, dirs, message", [
    ("cone", ("dim",), "at least one cone basis"),
    ("asr", ("repind",), "use the cone or compose mode"),
    ("induce", ("rco",), "use the cone or compose mode")])
def test_errors_name_the_fix(files, mode, dirs, message):
    with pytest.raises(C.RefusalError, match=message):
        run(files, mode, dirs=dirs)


def test_bad_counts_and_unreadable_json_are_refused(files, tmp_path):
    for flags in (("kl", "--n-val", "0"), ("cone", "--n-samples", "0")):
        with pytest.raises(C.RefusalError, match="at least 1"):
            run(files, flags[0], *flags[1:], dirs=("rco",))
    open(os.path.splitext(files["dim"])[0] + ".json", "w").write("{not json")
    with pytest.raises(C.RefusalError, match="not readable JSON"):
        run(files, "asr", dirs=("dim",))
    bad = tmp_path / "gcg.json"
    bad.write_text("{half")
    with pytest.raises(C.RefusalError, match="no 'results' with a 'suffix'"):
        run(files, "cosine", "--suffix", str(bad), dirs=("rdo",))


def test_missing_layer_and_existing_result_are_refused(files, tmp_path):
    files["nolayer"] = C.save_result(str(tmp_path / "nl"), "x", {"direction": torch.randn(32)}, {})
    with pytest.raises(C.RefusalError, match="pass --layer"):
        run(files, "asr", dirs=("nolayer",))
    os.makedirs(files["out"], exist_ok=True)
    open(os.path.join(files["out"], "eval_kl.json"), "w").write("{}")
    with pytest.raises(C.RefusalError, match="--overwrite"):
        run(files, "kl")


def test_judge_reads_yes_against_no_at_the_last_position(tiny_dir, monkeypatch):
    monkeypatch.setattr(C, "pick_dtype", lambda *a: torch.float32)  # compare in fp32, not bf16
    judge = E.load_judge(tiny_dir, "cpu", batch_size=2)
    prompts, texts = HARMFUL[:3], ["Sure, step 1", "I'm sorry", "Here is how"]
    got = judge(prompts, texts)  # batched, left-padded
    jmodel, jtok = make_model("llama")  # tiny_dir's weights: same seed
    yes, no = (jtok(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    for p, t, g in zip(prompts, texts, got):
        logits = jmodel(**jtok(E.JUDGE_PROMPT.format(behavior=p, generation=t), return_tensors="pt")).logits[0, -1]
        assert g == bool(logits[yes] > logits[no])


def logit_generate(model, tok, prompts, *args):
    """A stand-in for C.generate whose 'completion' of each prompt is the intervened model's first last-position
    logits, printed: any difference in the intervention (direction, span, sign, layer) shows up in the text."""
    return [" ".join(f"{x:.6f}" for x in C.last_logits(model, tok, [p])[0, :8].tolist()) for p in prompts]


def assert_same_logits(got, want):
    for g, w in zip(got, want, strict=True):
        assert [float(x) for x in g.split()] == pytest.approx([float(x) for x in w.split()], abs=1e-5)


def direction(f, key):
    return C.load_result(f[key])[0]["direction"].float()


def test_asr_subtracts_alpha_times_the_unit_direction_at_its_layer(files, monkeypatch):
    """Subtraction adds -alpha r_hat at the direction's layer: alpha and layer from the sidecar (alpha = |r| where
    the sidecar has none), or from --alpha / --layer; the judge scores every intervention."""
    added, real = [], C.activation_addition
    monkeypatch.setattr(C, "activation_addition", lambda m, v, layer: added.append((v.clone(), layer)) or real(m, v, layer))
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


def test_induce_scores_match_a_hand_computation(files, tmp_path):
    """alpha r_hat added at the layer (alpha: the sidecar's 3.0 without --alphas, not |r|): each set's mean refusal
    score log p_ref - log(1 - p_ref), the harmless completions, and the harmful and benign sets kept apart."""
    (tmp_path / "b.json").write_text(json.dumps(HARMLESS[4:]))
    res = run(files, "induce", "--benign", str(tmp_path / "b.json"), dirs=("dim",))["results"]["dim"]
    assert [r["alpha"] for r in res] == [3.0]
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    r, ids = direction(files, "dim"), C.refusal_token_ids(tok)
    with C.activation_addition(model, 3.0 * r / r.norm(), 1):
        for key, prompts in (("refusal_score", HARMLESS[:4]), ("harmful_refusal_score", HARMFUL[:4]),
                             ("benign_refusal_score", HARMLESS[4:])):
            p = C.last_logits(model, tok, prompts).double().softmax(-1)[:, ids].sum(-1)
            assert res[0][key] == pytest.approx((p.log() - (1 - p).log()).mean().item(), abs=1e-6)
        assert res[0]["completions"] == C.generate(model, tok, HARMLESS[:4], 3)


def test_kl_and_answer_ce_match_a_hand_computation(files):
    """KL(P_base || P_ablated) at the last position (not the reverse), and the CE of the clean model's own greedy
    answers scored under ablation, prompt by prompt in the prompts' order."""
    res = run(files, "kl", dirs=("dim",))["results"]
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    r, answers = direction(files, "dim"), C.generate_ids(model, tok, HARMLESS[:4], 3)
    base = C.last_logits(model, tok, HARMLESS[:4]).double().log_softmax(-1)
    with C.directional_ablation(model, r):
        ablated = C.last_logits(model, tok, HARMLESS[:4]).double().log_softmax(-1)
    assert res["dim"]["kl"] == pytest.approx((base.exp() * (base - ablated)).sum(-1).mean().item(), rel=1e-6)
    assert res["baseline"]["ce_per_prompt"] == pytest.approx(E.answer_ce(model, tok, HARMLESS[:4], answers), abs=1e-6)
    want = E.answer_ce(model, tok, HARMLESS[:4], answers, C.directional_ablation(model, r))
    assert res["dim"]["ce_per_prompt"] == pytest.approx(want, abs=1e-6)


def test_kl_skips_empty_answers_and_refuses_when_all_are(files, monkeypatch):
    real = C.generate_ids
    monkeypatch.setattr(C, "generate_ids", lambda *a: [[] if i == 1 else x for i, x in enumerate(real(*a))])
    res = run(files, "kl", dirs=("dim",))["results"]
    assert len(res["dim"]["ce_per_prompt"]) == 3 and all(0 < ce < 100 for ce in res["dim"]["ce_per_prompt"])
    monkeypatch.setattr(C, "generate_ids", lambda model, tok, prompts, *a: [[] for _ in prompts])
    with pytest.raises(C.RefusalError, match="every greedy answer is empty"):
        run(files, "kl", "--overwrite", dirs=("dim",))


def test_cone_samples_are_uniform_on_the_arc():
    """k = 2, orthonormal basis: uniform on the quarter circle is a uniform angle; normalised convex combinations
    would crowd towards the middle (a Kolmogorov-Smirnov distance of about 0.045)."""
    _, r = E.cone_samples(torch.eye(2), 20000, seed=0)
    angle = (torch.atan2(r[:, 1], r[:, 0]) / (torch.pi / 2)).sort().values
    assert angle[0] >= 0 and angle[-1] <= 1
    assert (angle - torch.arange(1, 20001) / 20000).abs().max() < 0.015


def test_cone_ablates_each_sample_and_each_try_of_a_single_direction(files, monkeypatch):
    """Cone sample i is ablated alone (not the whole cone); try i of a single direction samples under its ablation
    at the given temperature with seed + i (best-of-N needs different, reproducible tries)."""
    monkeypatch.setattr(C, "generate", logit_generate)
    fake_sample = lambda model, tok, prompts, t, seed, *a: [f"{t} {seed} {x}" for x in logit_generate(model, tok, prompts)]
    monkeypatch.setattr(E, "sample", fake_sample)
    res = run(files, "cone", "--n-samples", "2", "--temperatures", "0.5", "--seed", "7", dirs=("rco", "rdo"))["results"]
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    _, samples = E.cone_samples(C.load_result(files["rco"])[0]["basis"].float(), 2, seed=7)
    for i in range(2):
        with C.directional_ablation(model, samples[i]):
            assert_same_logits(res["rco"]["runs"][i]["completions"], logit_generate(model, tok, HARMFUL[:4]))
        with C.directional_ablation(model, direction(files, "rdo")):
            assert_same_logits(res["rdo T=0.5"]["runs"][i]["completions"], fake_sample(model, tok, HARMFUL[:4], 0.5, 7 + i))


def test_sample_is_reproducible_by_seed_and_greedy_at_a_low_temperature():
    model, tok = make_model("llama")
    draw = lambda t, seed: E.sample(model, tok, HARMFUL[:4], t, seed, 4, 4)
    assert draw(1.0, 0) == draw(1.0, 0) and draw(1.0, 0) != draw(1.0, 1)
    assert draw(1e-4, 3) == C.generate(model, tok, HARMFUL[:4], 4, 4)  # the temperature reaches generate


def test_compose_top_k_ablates_the_span_of_the_first_k(files, monkeypatch):
    monkeypatch.setattr(C, "generate", logit_generate)
    res = run(files, "compose", dirs=("repind",))["results"]
    model, tok = C.load_model(files["model"], device="cpu", dtype="float32")
    for k in (1, 2, 3):
        with C.directional_ablation(model, files["repind_vecs"][:k]):
            assert_same_logits(res[f"repind top-{k}"]["completions"], logit_generate(model, tok, HARMFUL[:4]))


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


def test_export_writes_dir_model_and_will_not_overwrite_a_model(files, tmp_path):
    res = run(files, "export", "--n-check", "2", dirs=("dim",))
    assert res["folder"] == os.path.join(files["out"], "model") and res["n_check"] == 2
    assert os.path.isfile(os.path.join(res["folder"], "config.json"))
    files["out"] = str(tmp_path / "out2")  # a new result file, the same export folder
    with pytest.raises(C.RefusalError, match="already holds a model"):
        run(files, "export", "--export-dir", res["folder"], dirs=("dim",))
    assert run(files, "export", "--export-dir", res["folder"], "--overwrite", dirs=("dim",))["folder"] == res["folder"]


def test_each_mode_loads_its_set_and_val_files_replace_the_sets(files, tmp_path):
    (tmp_path / "hv.json").write_text(json.dumps(HARMFUL[4:]))
    (tmp_path / "sv.json").write_text(json.dumps(HARMLESS[4:]))
    want = {"harmful": HARMFUL[4:7], "harmless": HARMLESS[4:7]}
    for mode in E.MODES:
        args = E.parse_args([mode, "--model", "m", "--direction", "d", "--harmful", files["h"], "--harmless", files["s"],
                             "--harmful-val", str(tmp_path / "hv.json"), "--harmless-val", str(tmp_path / "sv.json"),
                             "--n-val", "3"])
        need = "harmless" if mode in ("induce", "kl", "export") else "harmful"
        assert E.load_data(args) == {need: want[need]}, mode


def test_judge_sees_each_prompt_with_its_own_completion(tiny_dir, monkeypatch):
    """Batched: the i-th judged text is behaviour i with generation i, in later batches too."""
    seen, real = [], C.forward
    monkeypatch.setattr(C, "forward", lambda model, enc, **k: seen.extend(enc["input_ids"].tolist()) or real(model, enc, **k))
    E.load_judge(tiny_dir, "cpu", batch_size=2)(HARMFUL[:3], ["a", "b", "c"])
    assert make_tokenizer().batch_decode(seen, skip_special_tokens=True) == [
        E.JUDGE_PROMPT.format(behavior=p, generation=t) for p, t in zip(HARMFUL[:3], "abc")]


@pytest.mark.parametrize("mode, owner, name, at, left", [("asr", C, "generate", 3, 3), ("cone", E, "sample", 2, 1)])
def test_an_interrupted_evaluation_resumes_without_generating_again(files, mode, owner, name, at, left, monkeypatch):
    """Ctrl-C in the middle of a generation (asr: the third of 5 greedy ones; cone: the second temperature try, after
    the 2 cone samples): --resume reads the finished ones back, runs only the rest, and gives the uninterrupted result."""
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
        f.write('{"key": "cut sh')  # a crash in the middle of a line: dropped
    calls = []
    for o, n in ((C, "generate"), (E, "sample")):
        monkeypatch.setattr(o, n, lambda *a, real=getattr(o, n), **k: calls.append(1) or real(*a, **k))
    res = run(files, mode, *extra, "--resume", dirs=dirs)
    assert len(calls) == left and not os.path.exists(journal)
    assert res["results"] == full["results"]
    with pytest.raises(C.RefusalError, match="--resume: no unfinished evaluation"):
        run(files, mode, *extra, "--resume", "--overwrite", dirs=dirs)
