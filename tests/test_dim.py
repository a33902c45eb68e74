"""dim.py: the means, the selection rules, and the script end to end on a tiny model folder."""
import json, math

import pytest
import torch

import common as C
import dim
from conftest import HARMFUL, HARMLESS, make_model, make_tokenizer


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_means_equal_a_hand_computation_from_unpadded_hidden_states(family):
    model, tok = make_model(family, template="gemma")
    n_post, n_layers = len(C.post_instruction_ids(tok)), len(C.decoder_layers(model))
    got = dim.mean_activations(model, tok, HARMFUL[:5], n_post, batch_size=2)  # padded batches
    hand = torch.zeros_like(got)
    for p in HARMFUL[:5]:  # one prompt at a time: no padding at all
        hs = model(**C.tokenize(tok, [p]), output_hidden_states=True).hidden_states
        hand += torch.stack([hs[l][0, -n_post:].double() for l in range(n_layers)], dim=1)
    torch.testing.assert_close(got, hand / 5, atol=1e-5, rtol=1e-5)


def crafted(n_post=2, n_layers=10):
    s = {k: torch.zeros(n_post, n_layers, dtype=torch.float64) for k in ("bypass", "induce", "kl")}
    s["bypass"] += 5.0
    s["induce"] += 1.0
    s["kl"] += 0.01
    return s


def test_selection_picks_lowest_bypass_among_kept():
    s = crafted()
    s["bypass"][1, 3] = -2.0
    s["bypass"][0, 4] = -1.0
    assert dim.select_direction(s, 10)[0] == (1, 3)


@pytest.mark.parametrize("rule, cell, reason", [
    ("kl", 0.5, "kl>0.1"),
    ("induce", -0.1, "induce<0.0"),
    ("bypass", float("nan"), "nan/not scored")])
def test_selection_honours_each_filter(rule, cell, reason):
    s = crafted()
    s["bypass"][1, 3] = -3.0  # the best candidate...
    s["bypass"][0, 5] = -1.0  # ...and the runner-up
    if rule == "bypass":
        s["bypass"][1, 3] = cell
    else:
        s[rule][1, 3] = cell  # ...fails one rule
    chosen, reasons = dim.select_direction(s, 10)
    assert chosen == (0, 5)
    assert reason in reasons[(1, 3)]


def test_selection_prunes_the_last_20_percent_of_layers():
    s = crafted()
    s["bypass"][0, 8] = -9.0  # layers 8 and 9 of 10 are in the last 20%
    s["bypass"][0, 7] = -1.0
    chosen, reasons = dim.select_direction(s, 10)
    assert chosen == (0, 7) and "layer in last 20%" in reasons[(0, 8)]
    assert dim.select_direction(s, 10, prune_layers=0.0)[0] == (0, 8)
    # Arditi et al.'s count, int(n * 0.8): Qwen-0.5B keeps layers 0-18 of 24, Gemma-2-2B 0-19 of 26, Llama-3-8B 0-24
    assert [dim.first_pruned_layer(n, 0.2) for n in (10, 24, 26, 32)] == [8, 19, 20, 25]
    s = crafted(n_layers=24)
    s["bypass"][0, 19], s["bypass"][0, 18] = -9.0, -1.0  # 24 - int(4.8) = 20 would have kept layer 19
    chosen, reasons = dim.select_direction(s, 24)
    assert chosen == (0, 18) and "layer in last 20%" in reasons[(0, 19)]


def test_prompt_filter_keeps_harmless_prompts_scoring_below_zero_only(monkeypatch):
    scores = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    monkeypatch.setattr(dim.C, "last_logits", lambda *a, **k: None)
    monkeypatch.setattr(dim.C, "refusal_scores", lambda *a, **k: scores)
    assert dim.filter_prompts(None, None, ["a", "b", "c"], None, True, 4) == ["a"]  # harmful: refused (> 0)
    assert dim.filter_prompts(None, None, ["a", "b", "c"], None, False, 4) == ["c"]  # harmless: answered (< 0)


def test_selection_with_a_pinned_layer_and_when_everything_is_discarded():
    s = crafted()
    s["bypass"][0, 2] = -5.0
    s["bypass"][1, 9] = -1.0
    assert dim.select_direction(s, 10, layer=9)[0] == (1, 9)  # the user's layer is not pruned
    s["kl"] += 1.0
    chosen, reasons = dim.select_direction(s, 10)
    assert chosen is None
    best = dim.best_per_criterion(s, reasons)
    assert (best["bypass"]["position_index"], best["bypass"]["layer"]) == (0, 2)
    assert (best["only_kl>0.1"]["position_index"], best["only_kl>0.1"]["layer"]) == (0, 2)
    s["induce"][0, 2] = -1.0  # fails two rules now: no longer the best "only kl" candidate
    s["bypass"][1, 7] = 0.0
    best = dim.best_per_criterion(s, dim.select_direction(s, 10)[1])
    assert (best["only_kl>0.1"]["position_index"], best["only_kl>0.1"]["layer"]) == (1, 7)
    assert dim.select_direction(s, 10, kl_threshold=2.0)[0] == (1, 7)


# ----------------------------------------------------------------------------- the script

@pytest.fixture
def args_for(tiny_dir, data_files, tmp_path):
    h, s = data_files
    return lambda *extra: ["--model", tiny_dir, "--harmful", h, "--harmless", s, "--n-train", "5", "--n-val", "3",
                           "--batch-size", "4", "--out", str(tmp_path / "out"), "--dtype", "float32", *extra]


def test_script_end_to_end(args_for, tmp_path, monkeypatch, capsys):
    # a random tiny model never "refuses"; count most tokens as refusal tokens so that induce > 0 is possible
    monkeypatch.setattr(C, "refusal_token_ids", lambda tok, words=None: list(range(8, 200)))
    dim.main(args_for("--kl-threshold", "1e9"))
    out = tmp_path / "out"
    meta = json.load(open(out / "dim.json"))
    tensors, _ = C.load_result(str(out / "dim.safetensors"))
    model, _ = make_model("llama")
    n_layers = len(C.decoder_layers(model))
    assert tensors["candidates"].shape == (4, n_layers, 32)
    i, l = meta["chosen"]
    assert meta["layer"] == l and meta["position"] == i - 4
    assert torch.equal(tensors["direction"], tensors["candidates"][i, l])
    assert meta["alpha"] == pytest.approx(tensors["direction"].norm().item())
    assert len(meta["candidates_table"]) == 4 * n_layers
    # scored: not layer 0 (the same post-instruction embeddings in every prompt: no difference), not the pruned
    # last 20% (layer 3 of 4), which the filters would discard anyway
    assert {r["layer"] for r in meta["candidates_table"] if not math.isnan(r["bypass"])} == {1, 2}
    assert meta["args"]["seed"] == 0 and {"torch", "transformers", "tokenizers", "safetensors"} <= set(meta["versions"])
    assert meta["model_revision"] is None  # a local folder, not a hub download
    assert "git_uncommitted_changes" in meta  # True, False, or None outside a git checkout
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(C.RefusalError, match="already holds a dim result"):
        dim.main(args_for())


def test_script_says_so_when_every_candidate_is_discarded(args_for, tmp_path):
    with pytest.raises(C.RefusalError, match="every DIM candidate was discarded.*rerun with --overwrite"):
        dim.main(args_for())
    meta = json.load(open(tmp_path / "out" / "dim.json"))
    assert meta["layer"] is None and meta["best_per_criterion"]["bypass"]["layer"] is not None
    tensors, _ = C.load_result(str(tmp_path / "out" / "dim.safetensors"))
    assert list(tensors) == ["candidates"]  # no direction to hand on, but the work is kept


def test_a_pinned_layer_gives_its_best_position_even_when_filtered(args_for, tmp_path):
    dim.main(args_for("--layer", "2"))  # the random tiny model fails the induce rule everywhere
    meta = json.load(open(tmp_path / "out" / "dim.json"))
    tensors, _ = C.load_result(str(tmp_path / "out" / "dim.safetensors"))
    assert meta["layer"] == 2 and "near miss" in meta["relaxed"]
    assert torch.equal(tensors["direction"], tensors["candidates"][meta["chosen"][0], 2])


def test_run_exits_2_with_one_line(args_for, capsys):
    with pytest.raises(SystemExit) as e:
        C.run(lambda: dim.main(args_for("--layer", "99")))
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: transformers' loading bar)
    assert last == "error: --layer 99 is out of range: this model has layers 0..3"


@pytest.mark.parametrize("extra, match", [
    (["--harmful", "/nonexistent.json"], "not found"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--model", "/nonexistent/model.gguf"], "does not exist")])
def test_bad_input(args_for, extra, match):
    with pytest.raises(C.RefusalError, match=match):
        dim.main(args_for(*extra))


def test_model_without_chat_template(tmp_path):
    model, tok = make_model("llama")
    tok.chat_template = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(C.RefusalError, match="no chat template"):
        C.load_model(str(tmp_path), dtype="float32")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = make_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(C.RefusalError, match="unsupported architecture GPT2LMHeadModel"):
        C.load_model(str(tmp_path), dtype="float32")


def test_not_a_model_folder(tmp_path):
    with pytest.raises(C.RefusalError, match="cannot load model"):
        C.load_model(str(tmp_path), dtype="float32")


def test_filter_prompts_keeps_refused_harmful_and_answered_harmless(monkeypatch):
    # crafted last-position logits: prompts 0 and 2 put most mass on the refusal token 5
    logits = torch.zeros(4, 10)
    logits[[0, 2], 5] = 10.0
    monkeypatch.setattr(C, "last_logits", lambda model, tok, prompts, bs: logits)
    assert dim.filter_prompts(None, None, HARMFUL[:4], [5], True, 2) == [HARMFUL[0], HARMFUL[2]]
    assert dim.filter_prompts(None, None, HARMFUL[:4], [5], False, 2) == [HARMFUL[1], HARMFUL[3]]


# ----------------------------------------------------------------------------- the scores and the fallbacks

def test_score_direction_equals_a_per_prompt_hand_computation():
    """bypass on the harmful prompts ablated, induce on the harmless ones with v added at `layer`, KL(base || ablated)
    on the harmless ones: each by hand, one unpadded prompt at a time (uneven val sets: a mixed-up split shows)."""
    model, tok = make_model("llama")
    harm, safe, layer, ids = HARMFUL[:3], HARMLESS[:2], 2, list(range(8, 40))
    # a direction the residual stream really uses, so that ablating it moves the output (KL ~ 0.008)
    v = model(**C.tokenize(tok, [HARMFUL[0]]), output_hidden_states=True).hidden_states[layer][0, -1]
    last = lambda p: model(**C.tokenize(tok, [p])).logits[0, -1].double().log_softmax(-1)
    score = lambda logp: (logp[ids].logsumexp(0) - torch.log1p(-logp[ids].logsumexp(0).exp())).item()
    base = [last(p) for p in safe]
    with C.directional_ablation(model, v):
        abl_harm, abl_safe = [last(p) for p in harm], [last(p) for p in safe]
    with C.activation_addition(model, v, layer):
        add = [last(p) for p in safe]
    got = dim.score_direction(model, tok, v, layer, harm, safe, C.last_logits(model, tok, safe, 4), ids, batch_size=2)
    assert got["bypass"] == pytest.approx(sum(map(score, abl_harm)) / 3, abs=1e-5)
    assert got["induce"] == pytest.approx(sum(map(score, add)) / 2, abs=1e-5)
    kl = sum((p.exp() * (p - q)).sum().item() for p, q in zip(base, abl_safe)) / 2
    assert got["kl"] == pytest.approx(kl, rel=1e-4)  # KL(ablated || base) differs by 2e-3 relative here


def test_near_miss_prefers_the_kl_bound_then_a_single_failed_rule():
    bypass = {"a": -9.0, "b": -5.0, "c": -1.0, "d": -20.0}
    reasons = {"a": ["kl>0.1", "induce<0.0"], "b": ["kl>0.1"], "c": ["induce<0.0"], "d": ["nan/not scored"]}
    pick = lambda items: dim.near_miss(items, bypass.get, reasons.get)
    assert pick("abcd") == "c"  # within the KL bound, though a and b bypass better; never the unscored d
    assert pick("abd") == "b"  # fails one rule only
    assert pick("ad") == "a" and pick("d") is None


def test_best_per_criterion_takes_the_highest_induce_and_lowest_kl():
    s = crafted()
    s["induce"][1, 4], s["kl"][0, 6] = 3.0, 0.001
    best = dim.best_per_criterion(s, dim.select_direction(s, 10)[1])
    assert (best["induce"]["position_index"], best["induce"]["layer"]) == (1, 4)
    assert (best["kl"]["position_index"], best["kl"]["layer"]) == (0, 6)


def test_compute_dim_filters_prompts_and_takes_the_means_of_what_is_kept(monkeypatch):
    """--filter-prompts: a stand-in filter that 'refuses' exactly the HARMFUL prompts, on splits that mix both kinds.
    The candidates are mean(kept harmful) - mean(kept harmless); a split left empty is an error, not a crash."""
    model, tok = make_model("llama")
    seen = []

    def fake_filter(model, tok, prompts, refusal_ids, harmful, batch_size):
        seen.append(harmful)
        return [p for p in prompts if (p in HARMFUL) == harmful]

    monkeypatch.setattr(dim, "filter_prompts", fake_filter)
    args = dim.parse_args(["--model", "m", "--filter-prompts", "--layer", "2", "--batch-size", "4"])
    data = (HARMFUL[:3] + HARMLESS[6:], HARMFUL[3:5] + HARMLESS[5:6],  # each split holds prompts to drop
            HARMLESS[:2] + HARMFUL[7:], HARMLESS[2:5] + HARMFUL[5:7])
    _, info = dim.compute_dim(model, tok, args, data, log=lambda *a: None)
    assert sorted(seen) == [False, False, True, True]
    assert info["data"] == {"harmful_train": 3, "harmful_val": 2, "harmless_train": 2, "harmless_val": 3}
    n_post = info["n_post"]
    want = dim.mean_activations(model, tok, HARMFUL[:3], n_post, 4) - dim.mean_activations(model, tok, HARMLESS[:2], n_post, 4)
    torch.testing.assert_close(info["candidates"], want.float())
    base = C.refusal_scores(C.last_logits(model, tok, HARMFUL[3:5]), info["refusal_token_ids"]).mean().item()
    assert info["baseline_refusal_score_harmful_val"] == pytest.approx(base)
    data = (HARMFUL[:3], HARMFUL[3:5], HARMLESS[:2], HARMFUL[5:7])  # no harmless val prompt survives
    with pytest.raises(C.RefusalError, match="left no prompts in a split"):
        dim.compute_dim(model, tok, args, data, log=lambda *a: None)


def test_filters_discard_beyond_the_thresholds_only():
    # the spec's rules are strict: KL > 0.1 and induce < 0 go; a candidate exactly at either bound stays
    assert dim.discard_reasons({"bypass": 0.0, "induce": 0.0, "kl": 0.1}) == []
    assert dim.discard_reasons({"bypass": 0.0, "induce": -1e-9, "kl": 0.1 + 1e-9}) == ["kl>0.1", "induce<0.0"]
    assert dim.discard_reasons({"bypass": 0.0, "induce": 0.5, "kl": 0.3}, kl_threshold=0.5, induce_threshold=0.5) == []
