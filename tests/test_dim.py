"""dim.py: the means, the selection rules, and the script end to end on a tiny model folder."""
import json

import pytest
import torch

import common as C
import dim
from conftest import HARMFUL, make_model, make_tokenizer


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
    assert meta["args"]["seed"] == 0 and "torch" in meta["versions"]
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
