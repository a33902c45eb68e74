"""dim.py: the prompt filter, the means, the selection rules, and the script end to end on a tiny model folder."""
import math, os, subprocess, sys

import pytest
import torch

import common as C
import dim
from conftest import HARMFUL, HARMLESS, make_model, make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ----------------------------------------------------------------------------- the prompt filter

def test_prompt_filter_keeps_harmful_above_zero_and_harmless_below_zero_only(monkeypatch):
    scores = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    monkeypatch.setattr(dim.C, "last_logits", lambda *a, **k: None)
    monkeypatch.setattr(dim.C, "refusal_scores", lambda *a, **k: scores)
    assert C.filter_prompts(None, None, ["a", "b", "c"], None, True, 4) == ["a"]  # harmful: refused (> 0)
    assert C.filter_prompts(None, None, ["a", "b", "c"], None, False, 4) == ["c"]  # harmless: answered (< 0)


def test_filter_prompts_reads_the_refusal_tokens_probability(monkeypatch):
    # crafted last-position logits: prompts 0 and 2 put most mass on the refusal token 5
    logits = torch.zeros(4, 10)
    logits[[0, 2], 5] = 10.0
    monkeypatch.setattr(C, "last_logits", lambda model, tok, prompts, bs, desc=None: logits)
    assert C.filter_prompts(None, None, HARMFUL[:4], [5], True, 2) == [HARMFUL[0], HARMFUL[2]]
    assert C.filter_prompts(None, None, HARMFUL[:4], [5], False, 2) == [HARMFUL[1], HARMFUL[3]]


def test_filter_data_cuts_the_harmless_train_prompts_to_the_harmful_count(monkeypatch):
    """A stand-in score: +1 for the HARMFUL prompts, -1 for the others, on splits that mix both kinds."""
    monkeypatch.setattr(C, "filter_prompts", lambda model, tok, prompts, ids, harmful, bs:
                        [p for p in prompts if (p in HARMFUL) == harmful])
    data = (HARMFUL[:2] + HARMLESS[6:], HARMFUL[2:5] + HARMLESS[5:6], HARMLESS[:4] + HARMFUL[7:], HARMLESS[4:5])
    kept, counts = dim.filter_data(None, None, data, None, 4)
    assert kept == [HARMFUL[:2], HARMFUL[2:5], HARMLESS[:2], HARMLESS[4:5]]
    assert counts == {"harmful_train": [2, 4], "harmful_val": [3, 4], "harmless_train": [2, 5], "harmless_val": [1, 1]}
    with pytest.raises(C.RefusalError, match="kept none of the 2 harmless val prompts .*pass --no-filter"):
        dim.filter_data(None, None, data[:3] + (HARMFUL[5:7],), None, 4)


# ----------------------------------------------------------------------------- the selection rules

def crafted(n_post=2, n_layers=10):
    s = {k: torch.zeros(n_post, n_layers, dtype=torch.float64) for k in ("bypass", "induce", "kl")}
    s["bypass"] += 5.0
    s["induce"] += 1.0
    s["kl"] += 0.01
    return s


def select(s, layer=None, **kw):
    """(position index, layer) of the choice, and the discard reasons of every candidate."""
    table = dim.candidate_table(s, layer, **kw)
    c = dim.select_direction(table, layer)
    return (c and (c["position_index"], c["layer"])), {(r["position_index"], r["layer"]): r["discarded"] for r in table}


def test_selection_picks_lowest_bypass_among_kept():
    s = crafted()
    s["bypass"][1, 3] = -2.0
    s["bypass"][0, 4] = -1.0
    assert select(s)[0] == (1, 3)


@pytest.mark.parametrize("rule, cell, reason", [
    ("kl", 0.5, "kl>0.1"),
    ("induce", -0.1, "induce<0.0"),
    ("bypass", float("nan"), "nan/not scored")])
def test_selection_honours_each_filter(rule, cell, reason):
    s = crafted()
    s["bypass"][1, 3] = -3.0  # the best candidate...
    s["bypass"][0, 5] = -1.0  # ...and the runner-up
    s[rule][1, 3] = cell  # ...the best fails one rule
    chosen, reasons = select(s)
    assert chosen == (0, 5)
    assert reason in reasons[(1, 3)]


def test_selection_prunes_the_last_20_percent_of_layers():
    s = crafted()
    s["bypass"][0, 8] = -9.0  # layers 8 and 9 of 10 are in the last 20%
    s["bypass"][0, 7] = -1.0
    chosen, reasons = select(s)
    assert chosen == (0, 7) and "layer in last 20%" in reasons[(0, 8)]
    assert select(s, prune_layers=0.0)[0] == (0, 8)
    # the authors' count, int(n * 0.8): Qwen-0.5B keeps layers 0-18 of 24, Gemma-2-2B 0-19 of 26, Llama-3-8B 0-24
    assert [dim.first_pruned_layer(n, 0.2) for n in (10, 24, 26, 32)] == [8, 19, 20, 25]
    s = crafted(n_layers=24)
    s["bypass"][0, 19], s["bypass"][0, 18] = -9.0, -1.0  # 24 - int(4.8) = 20 would have kept layer 19
    chosen, reasons = select(s)
    assert chosen == (0, 18) and "layer in last 20%" in reasons[(0, 19)]


def test_selection_with_a_pinned_layer_and_when_everything_is_discarded():
    s = crafted()
    s["bypass"][0, 2] = -5.0
    s["bypass"][1, 9] = -1.0
    assert select(s, layer=9)[0] == (1, 9)  # the user's layer is not pruned, and the better layer 2 not taken
    s["kl"] += 1.0
    chosen, _ = select(s)
    assert chosen is None
    best = dim.best_per_criterion(dim.candidate_table(s))
    assert (best["bypass"]["position_index"], best["bypass"]["layer"]) == (0, 2)
    assert (best["only_kl>0.1"]["position_index"], best["only_kl>0.1"]["layer"]) == (0, 2)
    s["induce"][0, 2] = -1.0  # fails two rules now: no longer the best "only kl" candidate
    s["bypass"][1, 7] = 0.0
    best = dim.best_per_criterion(dim.candidate_table(s))
    assert (best["only_kl>0.1"]["position_index"], best["only_kl>0.1"]["layer"]) == (1, 7)
    assert select(s, kl_threshold=2.0)[0] == (1, 7)
    assert select(s, layer=9)[0] == (1, 9)  # pinned: the best near miss there, though every candidate fails


def test_a_pinned_layer_takes_the_kl_bound_then_a_single_failed_rule():
    s = crafted(n_post=4)
    s["bypass"][:, 2] = torch.tensor([-9.0, -5.0, -1.0, -20.0])
    s["kl"][:, 2] = torch.tensor([0.5, 0.5, 0.01, 0.01])
    s["induce"][:, 2] = torch.tensor([-1.0, 1.0, -1.0, math.nan])
    assert select(s, layer=2)[0] == (2, 2)  # within the KL bound, though 0 and 1 bypass better; never the NaN 3
    s["kl"][2, 2] = 0.5
    assert select(s, layer=2)[0] == (1, 2)  # fails one rule only
    s["induce"][1, 2] = -1.0
    assert select(s, layer=2)[0] == (0, 2)  # any scored one
    s["bypass"][:, 2] = math.nan
    assert select(s, layer=2)[0] is None


def test_best_per_criterion_takes_the_highest_induce_and_lowest_kl():
    s = crafted()
    s["induce"][1, 4], s["kl"][0, 6] = 3.0, 0.001
    best = dim.best_per_criterion(dim.candidate_table(s))
    assert (best["induce"]["position_index"], best["induce"]["layer"]) == (1, 4)
    assert (best["kl"]["position_index"], best["kl"]["layer"]) == (0, 6)


def test_filters_discard_beyond_the_thresholds_only():
    # the rules are strict: KL > 0.1 and induce < 0 go; a candidate exactly at either bound stays
    assert C.discard_reasons({"bypass": 0.0, "induce": 0.0, "kl": 0.1}) == []
    assert C.discard_reasons({"bypass": 0.0, "induce": -1e-9, "kl": 0.1 + 1e-9}) == ["kl>0.1", "induce<0.0"]
    assert C.discard_reasons({"bypass": 0.0, "induce": 0.5, "kl": 0.3}, kl_threshold=0.5, induce_threshold=0.5) == []


def test_score_direction_equals_a_per_prompt_hand_computation():
    """bypass on the harmful prompts ablated, induce on the harmless ones with v added at `layer`, KL(base || ablated)
    on the harmless ones: each by hand, one unpadded prompt at a time (uneven val sets: a mixed-up split shows)."""
    model, tok = make_model("llama")
    harm, safe, layer, ids = HARMFUL[:3], HARMLESS[:2], 2, list(range(8, 40))
    # a direction the residual stream really uses, so that ablating it moves the output
    v = model(**C.tokenize(tok, [HARMFUL[0]]), output_hidden_states=True).hidden_states[layer][0, -1]
    last = lambda p: model(**C.tokenize(tok, [p])).logits[0, -1].double().log_softmax(-1)
    score = lambda logp: (logp[ids].logsumexp(0) - torch.log1p(-logp[ids].logsumexp(0).exp())).item()
    base = [last(p) for p in safe]
    with C.directional_ablation(model, v):
        abl_harm, abl_safe = [last(p) for p in harm], [last(p) for p in safe]
    with C.activation_addition(model, v, layer):
        add = [last(p) for p in safe]
    got = C.score_direction(model, tok, v, layer, harm, safe, C.last_logits(model, tok, safe, 4), ids, batch_size=2)
    assert got["bypass"] == pytest.approx(sum(map(score, abl_harm)) / 3, abs=1e-5)
    assert got["induce"] == pytest.approx(sum(map(score, add)) / 2, abs=1e-5)
    kl = sum((p.exp() * (p - q)).sum().item() for p, q in zip(base, abl_safe)) / 2
    assert got["kl"] == pytest.approx(kl, rel=1e-4)  # KL(ablated || base) differs by 2e-3 relative here


# ----------------------------------------------------------------------------- the script

@pytest.fixture
def args_for(tiny_dir, data_files, tmp_path):
    h, s = data_files
    return lambda *extra: ["--model", tiny_dir, "--harmful", h, "--harmless", s, "--n-train", "5", "--n-val", "3",
                           "--batch-size", "4", "--out", str(tmp_path / "out"), "--dtype", "float32", *extra]


def result(tmp_path):
    return C.load_result(str(tmp_path / "out" / "dim.safetensors"))


def test_script_end_to_end(args_for, tmp_path, capsys):
    # a random tiny model never "refuses" (every refusal score is far below 0): no filter, and no induce rule
    dim.main(args_for("--no-filter", "--refusal-tokens", "I", "As", "--kl-threshold", "1e9", "--induce-threshold=-1e9"))
    tensors, meta = result(tmp_path)
    n_layers = len(C.decoder_layers(make_model("llama")[0]))
    assert tensors["candidates"].shape == (4, n_layers, 32)
    i, l = meta["chosen"]
    assert meta["layer"] == l and meta["position"] == i - 4 and "relaxed" not in meta
    assert torch.equal(tensors["direction"], tensors["candidates"][i, l])
    assert meta["alpha"] == pytest.approx(tensors["direction"].norm().item())
    table = meta["candidates_table"]
    assert len(table) == 4 * n_layers
    # scored: not layer 0 (the same post-instruction embeddings in every prompt: no difference), not the pruned
    # last 20% (layer 3 of 4), which the filters would discard anyway
    scored = [r for r in table if not math.isnan(r["bypass"])]
    assert {r["layer"] for r in scored} == {1, 2}
    assert meta["selected_scores"]["bypass"] == min(r["bypass"] for r in scored)
    assert meta["selected_scores"] == {k: table[i * n_layers + l][k] for k in ("bypass", "induce", "kl")}
    assert meta["filtered"] is None and meta["args"]["no_filter"]
    assert meta["data"] == {"harmful_train": 5, "harmful_val": 3, "harmless_train": 5, "harmless_val": 3}
    assert meta["refusal_tokens"]["source"] == "given" and meta["refusal_tokens"]["words"] == ["I", "As"]
    assert meta["method"] == "dim" and meta["seed"] == 0 and meta["args"]["kl_threshold"] == 1e9
    assert {"torch", "transformers", "tokenizers", "safetensors"} <= set(meta["versions"])
    assert meta["model_revision"] is None  # a local folder, not a hub download
    assert "git_uncommitted_changes" in meta  # True, False, or None outside a git checkout
    # the means of every prompt, unfiltered
    model, tok = C.load_model(args_for()[1], "cpu", "float32")
    harm, _, safe, _ = C.load_data(dim.parse_args(args_for()))
    want = dim.mean_activations(model, tok, harm, 4, 4) - dim.mean_activations(model, tok, safe, 4, 4)
    torch.testing.assert_close(tensors["candidates"], want.float())
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(C.RefusalError, match="already holds a dim result"):
        dim.main(args_for())


def test_the_filter_counts_and_the_means_of_what_it_keeps(args_for, tmp_path, monkeypatch):
    """Refusal scores shifted so that the tiny model 'refuses' some prompts: dim.json's counts equal a direct count
    of scores > 0 (harmful) and < 0 (harmless), the harmless train prompts cut to the harmful count, and the
    direction is the difference of the kept prompts' means."""
    argv = args_for("--refusal-tokens", "I", "As", "--layer", "2")
    model, tok = C.load_model(argv[1], "cpu", "float32")
    data = C.load_data(dim.parse_args(argv))
    ids = C.refusal_tokens(model, tok, data[0], ["I", "As"])[0]
    real = C.refusal_scores
    scores = [real(C.last_logits(model, tok, x, 4), ids) for x in data]
    top = scores[0].sort(descending=True).values
    shift = (top[0] + top[1]).item() / 2  # one harmful train prompt scores above it
    monkeypatch.setattr(C, "refusal_scores", lambda logits, ids: real(logits, ids) - shift)
    kept = [[p for p, s in zip(x, sc - shift) if (s > 0 if harmful else s < 0)]
            for x, sc, harmful in zip(data, scores, (True, True, False, False))]
    assert len(kept[0]) == 1 < len(kept[2]) and kept[1] and kept[3]  # the cut matters here
    dim.main(argv)
    tensors, meta = result(tmp_path)
    assert meta["filtered"] == {"harmful_train": [1, 5], "harmful_val": [len(kept[1]), 3],
                                "harmless_train": [1, 5], "harmless_val": [len(kept[3]), 3]}
    assert meta["data"] == {"harmful_train": 1, "harmful_val": len(kept[1]), "harmless_train": 1,
                            "harmless_val": len(kept[3])}
    want = dim.mean_activations(model, tok, kept[0], 4, 4) - dim.mean_activations(model, tok, kept[2][:1], 4, 4)
    torch.testing.assert_close(tensors["candidates"], want.float())
    assert meta["layer"] == 2


def test_a_filter_that_keeps_nothing_says_to_pass_no_filter(args_for, tmp_path):
    with pytest.raises(C.RefusalError, match="kept none of the 5 harmful train prompts .*pass --no-filter"):
        dim.main(args_for())  # the fixed fallback tokens: every harmful prompt scores far below 0
    assert not os.path.exists(tmp_path / "out" / "dim.safetensors")


def test_script_says_so_when_every_candidate_is_discarded(args_for, tmp_path, capsys):
    with pytest.raises(C.RefusalError, match="every DIM candidate was discarded.*rerun with --overwrite"):
        dim.main(args_for("--no-filter"))
    assert "refused 0 of 5 harmful prompts: fixed refusal tokens" in capsys.readouterr().out
    tensors, meta = result(tmp_path)
    assert meta["layer"] is None and meta["best_per_criterion"]["bypass"]["layer"] is not None
    assert meta["refusal_tokens"] == {"source": "fallback", "words": list(C.FALLBACK_REFUSAL_WORDS), "refusals": 0}
    assert list(tensors) == ["candidates"]  # no direction to hand on, but the work is kept


def test_a_pinned_layer_gives_its_best_position_even_when_filtered(args_for, tmp_path):
    dim.main(args_for("--no-filter", "--refusal-tokens", "I", "--layer", "2"))  # fails the induce rule everywhere
    tensors, meta = result(tmp_path)
    assert meta["layer"] == 2 and "near miss" in meta["relaxed"]
    assert torch.equal(tensors["direction"], tensors["candidates"][meta["chosen"][0], 2])
    assert {r["layer"] for r in meta["candidates_table"] if not math.isnan(r["bypass"])} == {2}


def test_run_exits_2_with_one_line(args_for, capsys):
    with pytest.raises(SystemExit) as e:
        C.run(lambda: dim.main(args_for("--layer", "99")))
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: transformers' loading bar)
    assert last == "error: --layer 99 is out of range: this model has layers 0..3"


def test_the_script_as_a_process_exits_2_with_exactly_one_stderr_line(args_for):
    argv = args_for("--model", "/nonexistent/model")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "dim.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: model path '/nonexistent/model' does not exist: give a hub id, "
                                        "a model folder or a .gguf file"]


@pytest.mark.parametrize("extra, match", [
    (["--harmful", "/nonexistent.json"], "not found"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--model", "/nonexistent/model.gguf"], "does not exist"),
    (["--prune-layers", "1"], "must lie in"),
    (["--n-train", "0"], "--n-train must be at least 1")])
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
