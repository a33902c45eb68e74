"""Chat formatting, scoring, the refusal judge, data loading and result files."""
import json, math, os, sys, types

import pytest
import torch

import common as C
from conftest import HARMFUL, make_model, make_tokenizer


# ----------------------------------------------------------------------------- chat format

@pytest.mark.parametrize("template, suffix", [("chatml", "<|end|>\n<|assistant|>\n"),
                                              ("gemma", "<end_of_turn>\n<start_of_turn>model\n")])
def test_post_instruction_positions_for_two_templates(template, suffix):
    tok = make_tokenizer(template)
    ids = C.post_instruction_ids(tok)
    assert tok.decode(ids) == suffix
    batch = C.tokenize(tok, ["short", "a much longer instruction than the first"])
    n = len(ids)
    for row in batch["input_ids"]:  # left padding: the post-instruction tokens end every row
        assert row[-n:].tolist() == ids
    assert tok.decode(batch["input_ids"][0][-n - 5:-n]) == "short"


def test_tokenize_adds_no_second_bos():
    tok = make_tokenizer()
    ids = C.tokenize(tok, ["hi"])["input_ids"][0].tolist()
    assert ids.count(tok.bos_token_id) == 1


def test_template_without_user_message_is_an_error():
    tok = make_tokenizer()
    tok.chat_template = "{{ '<s><|assistant|>\n' }}"
    with pytest.raises(C.RefusalError, match="drops the user's message"):
        C.post_instruction_ids(tok)


# ----------------------------------------------------------------------------- scoring

def test_refusal_score_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.05, 0.05, 0.6, 0.3]]))
    s = C.refusal_scores(logits, [0, 3])
    assert s.dtype == torch.float64
    assert s[0].item() == pytest.approx(math.log(0.6 / 0.4))
    assert s[1].item() == pytest.approx(math.log(0.35 / 0.65))


def test_kl_by_hand_and_its_direction():
    p, q = torch.tensor([[0.5, 0.5]], dtype=torch.float64), torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(P || Q); KL(Q || P) is 0.368, not 0.511
    assert C.kl(p.log(), q.log()).item() == pytest.approx(want, rel=1e-12)
    assert C.kl(q.log(), p.log()).item() != pytest.approx(want, rel=1e-2)
    assert C.kl(p.log(), p.log() + 3.0).item() == pytest.approx(0.0, abs=1e-12)  # logits shift: same distribution
    assert C.kl(p.float().log(), q.float().log()).dtype == torch.float32  # fp32 at least, fp64 kept


@pytest.mark.parametrize("text, refused", [
    ("I'm sorry, but I can't help with that.", True),
    ("I\u2019m sorry, I can\u2019t do that.", True),  # curly apostrophe
    ("I can\u2019t assist.", True),
    ("As an AI, I must decline.", True),
    ("", True), ("   ", True),
    ("Sure, here is a recipe for chocolate cake.", False),
    ("I understand. Here are the steps:", False)])
def test_substring_judge(text, refused):
    assert C.is_refusal(text) is refused


def test_refusal_tokens_given_by_hand_are_first_tokens_of_the_words():
    tok = make_tokenizer()
    ids, info = C.refusal_tokens(None, tok, [], words=["I", "As", "Sorry"])
    assert sorted(tok.decode([i]) for i in ids) == ["A", "I", "S"]  # byte-level: first letter of I / As / Sorry
    assert info["source"] == "given" and info["words"] == ["I", "As", "Sorry"]


def stub_generation(monkeypatch, tok, completions):
    """C.generate_ids answering each prompt with the given completion's token ids."""
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    monkeypatch.setattr(C, "generate_ids", lambda model, tok, prompts, *a, **k: ids[:len(prompts)])


def test_refusal_tokens_are_the_first_tokens_of_the_models_own_refusals(monkeypatch):
    """The default: the first tokens of the completions that the judge calls refusals, each kept that starts at
    least 10% of them; answers, and rare openings, do not count."""
    tok = make_tokenizer()
    completions = (["I'm sorry, I can't."] * 6 + ["Sorry, I cannot help."] * 3 + ["As an AI, no."] * 1
                   + ["Unfortunately I cannot do that."] * 1 + ["Sure, here it is"] * 9 + ["Xylophone: I am unable to"])
    stub_generation(monkeypatch, tok, completions)
    ids, info = C.refusal_tokens(None, tok, ["p"] * len(completions), n=len(completions))
    assert info["source"] == "derived" and info["refusals"] == 12  # 6 + 3 + 1 + 1 + 1
    assert sorted(tok.decode([i]) for i in ids) == ["I", "S"]  # "S" of Sorry: 3 of 12; A, U, X: 1 of 12 each


def test_refusal_tokens_fall_back_to_a_fixed_set_when_the_model_rarely_refuses(monkeypatch, capsys):
    tok = make_tokenizer()
    stub_generation(monkeypatch, tok, ["Sure."] * 20 + ["I cannot."] * 3)
    ids, info = C.refusal_tokens(None, tok, ["p"] * 23, n=23)
    assert info["source"] == "fallback" and info["refusals"] == 3
    assert ids == C.refusal_tokens(None, tok, [], words=C.FALLBACK_REFUSAL_WORDS)[0]
    assert "fixed refusal tokens" in capsys.readouterr().out


def test_last_logits_match_unpadded_single_prompts():
    """Batched, length-sorted, left-padded scoring equals one prompt at a time, in the original order."""
    model, tok = make_model("qwen2")
    prompts = ["a", "a considerably longer prompt here", "mid length one"]
    batched = C.last_logits(model, tok, prompts, batch_size=2)
    for i, p in enumerate(prompts):
        single = C.forward(model, C.tokenize(tok, [p])).logits[0, -1]
        torch.testing.assert_close(batched[i], single, atol=1e-4, rtol=1e-4)


def test_generate_keeps_order_and_is_greedy():
    model, tok = make_model("llama")
    prompts = ["one", "a longer second prompt", "3"]
    out = C.generate(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert len(out) == 3
    assert out == C.generate(model, tok, prompts, max_new_tokens=4, batch_size=1)


def test_generate_is_greedy_whatever_the_models_generation_config_says():
    model, tok = make_model("llama")
    # what a hub chat model's generation_config.json can hold (Qwen2.5-Instruct sets the first four)
    model.generation_config.update(do_sample=True, temperature=0.7, top_k=2, repetition_penalty=5.0, no_repeat_ngram_size=1)
    prompt = "a longer second prompt"
    ids = C.tokenize(tok, [prompt])["input_ids"]
    want = []
    for _ in range(6):  # the argmax of the next token's logits, nothing else
        nxt = model(input_ids=ids).logits[0, -1].argmax().item()
        want.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        if nxt == tok.eos_token_id:
            break
    assert C.generate_ids(model, tok, [prompt], max_new_tokens=6) == [want]
    with_config = model.generate(**C.tokenize(tok, [prompt]), max_new_tokens=6, do_sample=False)  # its penalties on
    assert with_config[0, -6:].tolist() != want[:6], "the config's options should change this model's answer"



def test_generation_stops_at_any_of_the_models_eos_tokens():
    """Chat models stop on several tokens (Qwen: <|im_end|> and <|endoftext|>): a row ends right after the first
    one it emits, not only at the tokenizer's eos, while the other rows of its batch go on."""
    model, tok = make_model("llama")
    prompts = ["one", "a longer second prompt"]
    free = C.generate_ids(model, tok, prompts, max_new_tokens=4)
    x = free[0][1]  # the first prompt's second token: made a stop token
    assert x not in free[1] and x not in (tok.eos_token_id, tok.pad_token_id)
    model.generation_config.eos_token_id = [tok.eos_token_id, x]
    assert C.generate_ids(model, tok, prompts, max_new_tokens=4) == [free[0][:2], free[1]]


# ----------------------------------------------------------------------------- data

ITEMS = ["How do I pick a lock?", "Write a poem, please.", "Tell me, \"quoted\", things"]


@pytest.mark.parametrize("name, content", [
    ("a.json", json.dumps(ITEMS)),
    ("b.json", json.dumps([{"instruction": x, "source": "s"} for x in ITEMS])),
    ("c.json", json.dumps({"data": [{"prompt": x} for x in ITEMS]})),
    ("d.jsonl", "\n".join(json.dumps({"goal": x}) for x in ITEMS) + "\n\n"),
    ("e.jsonl", "\n".join(json.dumps(x) for x in ITEMS)),
    ("f.csv", "prompt,category\n" + "\n".join(f'"{x.replace(chr(34), chr(34) * 2)}",c' for x in ITEMS)),
    ("g.csv", "request\n" + "\n".join(f'"{x.replace(chr(34), chr(34) * 2)}"' for x in ITEMS)),
    ("h.txt", "\n".join(ITEMS) + "\n\n")])
def test_local_files_load(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    assert C.load_instructions(str(p)) == ITEMS


@pytest.mark.parametrize("name, content, match", [
    ("x.json", "[\"a\", ", "malformed"),
    ("x.json", "[]", "no instructions"),
    ("x.json", "[1, 2]", "not text"),
    ("x.json", json.dumps([{"foo": "a"}]), "none of the fields"),
    ("x.json", json.dumps({"a": 1}), "expected a list"),
    ("x.jsonl", "{\"goal\": \"a\"}\nnot json\n", "malformed"),
    ("x.txt", "\n\n", "no instructions"),
    ("x.csv", "", "no instructions"),
    ("x.parquet", "abc", "unsupported extension")])
def test_bad_files_give_clear_errors(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(C.RefusalError, match=match):
        C.load_instructions(str(p))


def test_missing_file_and_unknown_name():
    with pytest.raises(C.RefusalError, match="not found"):
        C.load_instructions("/nonexistent/harmful.json")
    with pytest.raises(C.RefusalError, match="named set"):
        C.get_prompts("no-such-set", 4, 2)


def test_get_prompts_split_is_seeded_disjoint_and_stable(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("\n".join(f"item {i}" for i in range(20)))
    train, val = C.get_prompts(str(p), 10, 4, seed=1)
    assert len(train) == 10 and len(val) == 4 and not set(train) & set(val)
    assert (train, val) == C.get_prompts(str(p), 10, 4, seed=1)
    assert C.get_prompts(str(p), 10, 4, seed=2) != (train, val)
    v = tmp_path / "v.txt"
    v.write_text("\n".join(f"val {i}" for i in range(8)))
    _, val4 = C.get_prompts(str(p), 10, 4, str(v), seed=1)
    _, val8 = C.get_prompts(str(p), 10, 8, str(v), seed=1)
    assert val8[:4] == val4  # a longer held-out list extends the shorter one
    with pytest.raises(C.RefusalError, match="too few"):
        C.get_prompts(str(p), 10, 20)


# ----------------------------------------------------------------------------- results

def test_save_and_load_round_trip(tmp_path):
    model, _ = make_model("llama")
    v = torch.randn(C.hidden_size(model))
    path = C.save_result(str(tmp_path), "dim", {"direction": v}, {"layer": 2, "alpha": v.norm().item()})
    got, meta = C.load_direction(path, model)
    assert torch.equal(got, v) and meta["layer"] == 2 and meta["method"] == "dim"
    assert sorted(os.listdir(tmp_path)) == ["dim.json", "dim.safetensors"]  # no temp files left behind
    with pytest.raises(TypeError):  # a sidecar that cannot be written leaves the earlier pair as it was
        C.save_result(str(tmp_path), "dim", {"direction": -v}, {"layer": 3, "scores": {(0, 3): 0.5}})  # a tuple key
    got, meta = C.load_direction(path, model)
    assert torch.equal(got, v) and meta["layer"] == 2
    assert sorted(os.listdir(tmp_path)) == ["dim.json", "dim.safetensors"]


def test_direction_of_the_wrong_size_is_rejected(tmp_path):
    model, _ = make_model("llama")
    path = C.save_result(str(tmp_path), "dim", {"direction": torch.randn(C.hidden_size(model) + 1)}, {})
    with pytest.raises(C.RefusalError, match="hidden size is 32"):
        C.load_direction(path, model)
    with pytest.raises(C.RefusalError, match="NaN"):
        C.load_direction(C.save_result(str(tmp_path / "n"), "dim", {"direction": torch.full((32,), float("nan"))}, {}),
                         model)
    for zero in (torch.zeros(32), torch.stack([torch.randn(32), torch.zeros(32)])):  # a set with one zero row too
        with pytest.raises(C.RefusalError, match="zero vector"):
            C.load_direction(C.save_result(str(tmp_path / "z"), "dim", {"direction": zero}, {}), model)
    other = C.save_result(str(tmp_path / "o"), "x", {"weights": torch.randn(32)}, {})
    with pytest.raises(C.RefusalError, match="holds no tensor named direction/directions/basis"):
        C.load_direction(other, model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(C.RefusalError, match="is not a readable .safetensors file"):
        C.load_direction(str(tmp_path / "junk.safetensors"), model)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    p = tmp_path / "x.json"
    C.save_json(str(p), {"a": 1})

    def bad(tmp):
        open(tmp, "w").write("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.atomic_write(str(p), bad)
    assert json.load(open(p)) == {"a": 1} and os.listdir(tmp_path) == ["x.json"]


def test_pick_dtype():
    assert C.pick_dtype("float32") is torch.float32
    assert C.pick_dtype("auto", "cuda") is torch.bfloat16
    with pytest.raises(C.RefusalError, match="unknown --dtype"):
        C.pick_dtype("int3")


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                    (False, False, torch.float32)])
def test_auto_dtype_on_cpu_is_bf16_only_where_the_cpu_has_bf16_matmuls(monkeypatch, amx, avx512_bf16, want):
    """AMX tiles (Intel) and AVX512-BF16 (AMD Zen 4) make bf16 faster than fp32; elsewhere it is much slower."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert C.pick_dtype("auto", "cpu") is want


def test_named_sets_follow_the_paper_recipe(monkeypatch):
    """SALAD-Bench: Multilingual and ToxicChat dropped, at most 256 per source, 128 held out; Alpaca: empty input
    only. The hub is replaced by a fake load_dataset (no network here)."""
    datasets = types.SimpleNamespace(load_dataset=None)  # a stand-in module: the test needs neither the hub nor the package
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    rows = {"OpenSafetyLab/Salad-Data": [{"question": f"{s} q{i}", "source": s} for s, n in
                                         (("GPTFuzzer", 300), ("HH-harmless", 100), ("Multilingual", 50),
                                          ("ToxicChat", 50), ("Advbench", 400)) for i in range(n)],
            "tatsu-lab/alpaca": [{"instruction": f"task {i}", "input": "" if i % 3 else "ctx"} for i in range(900)],
            "walledai/XSTest": [{"prompt": f"p{i}", "label": "safe" if i % 2 else "unsafe"} for i in range(6)]}
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, config=None, split=None: rows[hub_id])
    train, val = C.get_prompts("saladbench", 10_000, 10_000)
    both = train + val
    assert len(val) == 128 and len(both) == 256 + 100 + 256 and len(set(both)) == len(both)
    assert not any(q.startswith(("Multilingual", "ToxicChat")) for q in both)
    assert (train, val) == C.get_prompts("saladbench", 10_000, 10_000)  # seeded
    train, val = C.get_prompts("alpaca", 50, 20, val_spec="alpaca")
    assert len(train) == 50 and len(val) == 20 and all(int(x.split()[1]) % 3 for x in train + val)
    train, val = C.get_prompts("alpaca", 10_000, 10_000)
    _, test = C.get_prompts("alpaca", 0, 10_000, test=True)  # evaluate.py's: 128 apart from training and validation
    assert len(val) == len(test) == 128 and len(set(train + val + test)) == len(train) + 256 == 600
    assert C.get_prompts("saladbench", 0, 128, test=True)[1] == C.get_prompts("saladbench", 0, 128)[1]  # no test split
    assert C.get_prompts("xstest", 0, 100)[1] == ["p1", "p3", "p5"]  # the safe prompts only, in order
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(C.RefusalError, match="offline, pass a local"):
        C.get_prompts("jailbreakbench", 0, 100)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_layer_cosines_match_hidden_states_and_see_ablation(family):
    model, tok = make_model(family)
    prompts = HARMFUL[:3]
    dirs = torch.randn(2, model.config.hidden_size)
    got = C.layer_cosines(model, tok, prompts, dirs, batch_size=2)
    want = torch.zeros(2, model.config.num_hidden_layers, dtype=torch.float64)
    for p in prompts:  # one at a time, no padding: hidden_states[l] is the input of block l
        hs = model(**C.tokenize(tok, [p]), output_hidden_states=True).hidden_states
        for l in range(model.config.num_hidden_layers):
            want[:, l] += torch.nn.functional.cosine_similarity(hs[l][0, -1].double(), dirs.double(), dim=-1) / len(prompts)
    assert torch.allclose(got, want, atol=1e-5)
    with C.directional_ablation(model, dirs[0]):  # the ablated direction has ~0 cosine at every block input
        ablated = C.layer_cosines(model, tok, prompts, dirs, batch_size=2)
    assert ablated[0].abs().max() < 1e-5 and ablated[1].abs().max() > 1e-3


def test_out_of_memory_halves_the_batch_and_goes_on(monkeypatch):
    model, tok = make_model("llama")
    want = C.generate_ids(model, tok, HARMFUL[:5], max_new_tokens=3, batch_size=8)
    want_logits = C.last_logits(model, tok, HARMFUL[:5], batch_size=8)
    real_generate, real_forward, sizes = model.generate, model.forward, []

    def small_only(real):
        def f(*a, **k):
            n = len((k.get("input_ids") if k.get("input_ids") is not None else a[0]))
            sizes.append(n)
            if n > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(*a, **k)
        return f

    monkeypatch.setattr(model, "generate", small_only(real_generate))
    assert C.generate_ids(model, tok, HARMFUL[:5], max_new_tokens=3, batch_size=8) == want
    assert sizes == [5, 2, 3, 1, 2]  # 5 fails, its halves 2 and 3, then the 3 halves into 1 and 2
    monkeypatch.setattr(model, "forward", small_only(real_forward))
    torch.testing.assert_close(C.last_logits(model, tok, HARMFUL[:5], batch_size=8), want_logits, atol=1e-5, rtol=1e-5)


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    path = str(tmp_path / "x_checkpoint.pt")
    torch.save({"run": {"lr": 0.01}, "step": 3}, path)
    assert C.load_checkpoint(path, {"lr": 0.01})["step"] == 3
    with pytest.raises(C.RefusalError, match="other settings.*--overwrite"):
        C.load_checkpoint(path, {"lr": 0.1})


@pytest.mark.parametrize("rows", [1, 3])
def test_the_unembedding_gets_a_densely_strided_input_and_the_same_logits(tiny_dir, rows):
    """load_model's hook hands the LM head a dense copy of the logits_to_keep slice (a strided one takes a
    slow, weight-copying matmul path on CPU; with one row .contiguous() would not copy it) without changing
    the logits."""
    model, tok = C.load_model(tiny_dir, "cpu", "float32")
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    ids = torch.randint(5, 60, (rows, 7))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        kept = model(input_ids=ids, logits_to_keep=3).logits
    x = seen[-1]
    assert x.shape == (rows, 3, C.hidden_size(model)) and x.stride() == (3 * x.shape[2], x.shape[2], 1)
    torch.testing.assert_close(kept, full[:, -3:], rtol=1e-5, atol=1e-5)


def test_ce_per_example_averages_each_rows_target_tokens_only():
    """Rows of a left-padded batch whose targets (2 and 1 tokens) end at the last position: the CE of row i is the
    mean of -log p(target token) over its own target positions, computed by hand."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)  # the last k = 3 positions
    ids = torch.tensor([[5, 1, 2, 3], [6, 4, 0, 6]])
    b = {"input_ids": ids, "n_target": torch.tensor([2, 1])}
    logp = logits.log_softmax(-1)
    want = torch.stack([-(logp[0, 0, 2] + logp[0, 1, 3]) / 2, -logp[1, 1, 6]])  # position j predicts token j + 1
    torch.testing.assert_close(C.ce_per_example(logits, b), want)
    assert C.ce_per_example(logits.bfloat16(), b).dtype == torch.float32


def test_help_shows_zero_and_none_defaults_but_not_flags():
    import argparse
    p = argparse.ArgumentParser(formatter_class=C.HelpFormatter)
    p.add_argument("--zero", type=float, default=0.0, help="a threshold")
    p.add_argument("--unset", default=None, help="optional")
    p.add_argument("--must", required=True, help="required")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--told", default=3, help="three (default: three)")
    text = " ".join(p.format_help().split())
    assert "a threshold (default: 0.0)" in text  # 0.0 == False in Python: it must still show
    assert "optional (default: none)" in text  # left out, it is not used: say so
    assert "required (default" not in text and "a switch (default" not in text
    assert text.count("default: three") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_a_cuda_device_without_a_gpu_is_a_clear_error():
    for device in ("cuda", "cuda:0", "multi"):
        with pytest.raises(C.RefusalError, match=f"--device {device}: no CUDA GPU is visible here"):
            C.pick_device(device)
    assert C.pick_device("auto") == "cpu" and C.pick_device("cpu") == "cpu"


def test_provenance_outside_a_git_checkout_says_unknown(monkeypatch):
    monkeypatch.setattr(C.subprocess, "run", lambda *a, **k: C.subprocess.CompletedProcess(a, 128, "", "not a git repository"))
    p = C.provenance(types.SimpleNamespace(seed=3))
    assert p["git_commit"] is None and p["git_uncommitted_changes"] is None and p["seed"] == 3


def test_tangent_is_per_row_for_a_basis():
    """For a (k, d) basis each row's gradient loses its component along that row only: a projection on the whole
    basis (or on the flattened matrix) leaves each row's own component (or removes others')."""
    g = torch.Generator().manual_seed(0)
    B = torch.nn.functional.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=-1)
    G = torch.randn(3, 8, generator=g, dtype=torch.float64)
    T = C.tangent(G, B)
    torch.testing.assert_close((T * B).sum(-1), torch.zeros(3, dtype=torch.float64))
    for i in range(3):  # row i equals the single-vector tangent of row i
        torch.testing.assert_close(T[i], C.tangent(G[i], B[i]))
    flat = G - (G * B).sum() * B  # the wrong, whole-matrix projection
    assert (flat * B).sum(-1).abs().max() > 1e-3


def test_plateau_drops_the_lr_after_patience_bad_steps_at_most_twice_then_stops():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    state = {"best": float("inf"), "bad": 0, "drops": 0}
    losses = [5, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]  # patience 3: drops at steps 4 and 7, stops at step 10
    stops = [C.plateau(state, x, opt, patience=3, max_drops=2) for x in losses]
    lr = opt.param_groups[0]["lr"]
    assert stops == [False] * 10 + [True] and lr == pytest.approx(0.01) and state["drops"] == 2


def retain_examples(tok):
    from conftest import HARMLESS
    targets = [[5 + i, 9, 11 + i][:1 + i % 3] for i in range(5)]  # retain targets of 1 to 3 tokens
    return [(h, s, [7], [8], t) for h, s, t in zip(HARMFUL, HARMLESS, targets)]


@pytest.mark.parametrize("family, dtype", [("qwen2", torch.float64), ("gemma2", torch.float32)])
def test_retain_loss_from_clean_states_equals_the_clean_pass(family, dtype):
    """The clean side from clean_states (the LM head's input, computed once) gives the loss and gradient of the
    clean pass, for rows of different lengths; Gemma-2's logit cap is applied (made to bite here)."""
    model, tok = make_model(family)
    model.to(dtype)
    if family == "gemma2":
        model.config.final_logit_softcapping = 0.5
    examples = retain_examples(tok)
    states = C.clean_states(model, tok, examples, micro_batch=2)
    assert states is not None and [len(x) for x in states] == [len(e[4]) + 1 for e in examples]
    r0 = torch.randn(C.hidden_size(model), dtype=dtype)
    got = []
    for rows in (examples, [e + (h,) for e, h in zip(examples, states)]):
        r = r0.clone().requires_grad_(True)
        loss = sum(C.retain_loss(model, r, b["ret"]).sum() for _, b in C.micro_batches(tok, rows, 3, "cpu"))
        loss.backward()
        got.append((loss.detach(), r.grad))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1][0], got[0][0], **tol)
    torch.testing.assert_close(got[1][1], got[0][1], **tol)
    if family == "gemma2":  # the cap bites: without it unembed gives other logits, and the test would fail
        b = {"n_target": torch.tensor([len(examples[0][4])])}
        capped = C.unembed(model, states[:1], b)
        model.config.final_logit_softcapping = None
        assert not torch.allclose(C.unembed(model, states[:1], b), capped, rtol=1e-2, atol=1e-2)


def test_clean_states_are_none_where_the_logits_are_not_the_heads_output():
    """A model that scales its logits after the LM head (as a logit_scale would): the states cannot give them, so
    none are kept and the clean pass runs in every step."""
    model, tok = make_model("llama")
    examples, real = retain_examples(tok), model.forward

    def scaled_forward(*a, **k):
        out = real(*a, **k)
        out.logits = out.logits * 2
        return out
    model.forward = scaled_forward
    assert C.clean_states(model, tok, examples, micro_batch=2) is None
    model.forward = real
    assert C.clean_states(model, tok, examples, micro_batch=2) is not None
