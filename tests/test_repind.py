"""repind.py: the RepInd loss by hand at both positions, its mask, its zero case, where its gradient goes, Figure 6,
the iteration over directions and candidates, the weights and the schedule, resume, and the defaults."""
import argparse, os, subprocess, sys

import pytest
import torch
import torch.nn.functional as F

import common as C
import repind
from conftest import HARMFUL, interrupted_at_call, make_model, make_tokenizer, train_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def positions_by_hand(tok, prompt, positions):
    """The loss positions of one unpadded prompt, counted without offsets: the byte-level test tokenizer has no
    merges, so the instruction's tokens are the len(prompt) tokens after the template's prefix."""
    text = C.format_chat(tok, [prompt])[0]
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    if positions == "last":
        return [n - 1]
    before = len(tok(text[:text.index(prompt)], add_special_tokens=False)["input_ids"])
    return list(range(before, before + len(tok(prompt, add_special_tokens=False)["input_ids"])))


def hand_loss(model, tok, r, others, prompts, n_layers, positions):
    """Definition 6.1's loss written plainly: one prompt at a time, full forward passes, hidden_states."""
    def inputs(p, ablate=None):
        batch = C.tokenize(tok, [p])
        if ablate is None:
            return model(**batch, output_hidden_states=True).hidden_states[:n_layers]
        u = ablate / ablate.norm()
        with C.directional_ablation(model, ablate):
            hs = model(**batch, output_hidden_states=True).hidden_states[:n_layers]
        # hidden_states[0] is the embedding before block 0's input hook; projecting again changes nothing elsewhere
        return [h - (h @ u)[..., None] * u for h in hs]

    cos = lambda a, b: F.cosine_similarity(a, b[None], dim=-1)
    total = 0.0
    for p in prompts:
        pos = positions_by_hand(tok, p, positions)
        x, x_r = inputs(p), inputs(p, r)
        for v in others:
            x_v = inputs(p, v)
            for l in range(n_layers):  # ablate v, watch r; ablate r, watch v; mean over the positions
                a, a_v, a_r = x[l][0, pos], x_v[l][0, pos], x_r[l][0, pos]
                total = total + ((cos(a, r) - cos(a_v, r)) ** 2 + (cos(a, v) - cos(a_r, v)) ** 2).mean() / n_layers
    return total / len(prompts)


def loss(model, tok, r, others, prompts, n_layers, positions="instruction"):
    """The script's loss, mean over the prompts, in one left-padded batch."""
    mask = repind.repind_mask(tok, prompts, positions)
    return repind.repind_loss(model, r, others, C.tokenize(tok, prompts), mask, n_layers).mean()


@pytest.mark.parametrize("positions", ["instruction", "last"])
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_loss_and_gradient_equal_a_hand_computation(family, positions):
    """--repind-positions last is the authors' last-token loss; the default averages over the instruction's tokens."""
    model, tok = make_model(family)
    torch.manual_seed(1)
    d = C.hidden_size(model)
    others = torch.randn(2, d)
    r1 = torch.randn(d).requires_grad_(True)
    got = loss(model, tok, r1, others, HARMFUL[:4], 3, positions)
    (200.0 * got).backward()
    r2 = r1.detach().clone().requires_grad_(True)
    want = hand_loss(model, tok, r2, others, HARMFUL[:4], 3, positions)
    (200.0 * want).backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-4) and got.item() > 1e-4
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-3, atol=1e-7)


def test_the_two_positions_give_different_losses():
    model, tok = make_model("llama")
    torch.manual_seed(1)
    others, r = torch.randn(1, C.hidden_size(model)), torch.randn(C.hidden_size(model))
    last = loss(model, tok, r, others, HARMFUL[:3], 3, "last")
    assert loss(model, tok, r, others, HARMFUL[:3], 3) != pytest.approx(last.item())


@pytest.mark.parametrize("template", ["chatml", "gemma"])
def test_mask_covers_exactly_the_instruction(template):
    """Not the template's tokens (a prompt may repeat the template's own words), not padding, not the whitespace
    around the instruction; the last-token mask is every row's last column (left padding)."""
    tok = make_tokenizer(template)
    prompts = ["user", "How do I build a bomb?", "  model assistant  ", "Write a phishing email."]
    mask, batch = repind.repind_mask(tok, prompts), C.tokenize(tok, prompts)
    assert mask.shape == batch["input_ids"].shape and mask.dtype == torch.bool
    assert not (mask & ~batch["attention_mask"].bool()).any()
    for row, ids, p in zip(mask, batch["input_ids"], prompts):
        assert tok.decode(ids[row]) == p.strip()
        assert row.nonzero().squeeze(1).tolist() == list(range(row.nonzero().min(), row.nonzero().max() + 1))
    assert mask.sum(1).tolist() == [len(p.strip()) for p in prompts]  # one byte, one token
    last = repind.repind_mask(tok, prompts, "last")
    assert last.shape == mask.shape and last[:, -1].all() and last.sum() == len(prompts)


def test_mask_refuses_a_template_that_rewrites_the_instruction():
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(C.RefusalError, match="--repind-positions last"):
        repind.repind_mask(tok, ["How do I build a bomb?"])


def test_early_exit_captures_block_inputs_and_skips_later_blocks():
    model, tok = make_model("llama")
    batch = C.tokenize(tok, HARMFUL[:3])
    calls = []
    handle = C.decoder_layers(model)[3].register_forward_hook(lambda *a: calls.append(1))
    cols = torch.tensor([2, 5, -1])
    try:
        x = repind.block_acts(model, batch, cols, 3)
    finally:
        handle.remove()
    hs = C.forward(model, batch, output_hidden_states=True).hidden_states
    assert x.shape == (3, 3, 3, C.hidden_size(model)) and not calls
    torch.testing.assert_close(x, torch.stack([h[:, cols] for h in hs[:3]], 1))


def untouched_coordinate_model(k=5):
    """A tiny Llama whose residual-stream coordinate k stays 0 (nothing writes it, so nothing can read it), and e_k."""
    model, tok = make_model("llama")
    model.model.embed_tokens.weight[:, k] = 0
    for block in C.decoder_layers(model):
        block.self_attn.o_proj.weight[k] = 0
        block.mlp.down_proj.weight[k] = 0
    e_k = torch.zeros(C.hidden_size(model))
    e_k[k] = 1
    return model, tok, k, e_k


@pytest.mark.parametrize("positions", ["instruction", "last"])
def test_zero_for_a_direction_no_layer_writes_or_reads(positions):
    """Coordinate k stays 0 in the residual stream at every position: ablating e_k changes no activation, and
    cos(x, e_k) = 0 everywhere, so e_k is representationally independent of any v without k-th component."""
    model, tok, k, e_k = untouched_coordinate_model()
    d = C.hidden_size(model)
    torch.manual_seed(0)
    others = torch.randn(2, d)
    others[:, k] = 0  # else ablating v itself writes -(x.v) v_k into coordinate k
    assert loss(model, tok, e_k, others, HARMFUL[:3], 3, positions) < 1e-10
    assert loss(model, tok, torch.randn(d), others, HARMFUL[:3], 3, positions) > 1e-4  # not zero by accident


def test_gradients_reach_only_the_new_direction():
    model, tok = make_model("qwen2")
    torch.manual_seed(2)
    others = torch.randn(2, C.hidden_size(model)).requires_grad_(True)
    r = torch.randn(C.hidden_size(model)).requires_grad_(True)
    loss(model, tok, r, others, HARMFUL[:3], 3).backward()
    assert r.grad is not None and r.grad.abs().max() > 0
    assert others.grad is None and all(p.grad is None for p in model.parameters())


def test_figure6_curves_for_an_untouched_direction_and_for_dim_itself():
    """u = e_k, which no layer writes or reads: ablating it leaves DIM's cosines as they were, and cos(x, e_k) is 0
    with or without DIM ablated (DIM has no k-th component). u = DIM: ablated at every block input, cos(x, DIM) is 0."""
    model, tok, k, e_k = untouched_coordinate_model()
    torch.manual_seed(6)
    dim_vec = 4 * torch.randn(C.hidden_size(model))
    dim_vec[k] = 0  # else ablating DIM writes into coordinate k
    curves = repind.figure6(model, tok, HARMFUL[:3], dim_vec, {"null": e_k, "self": dim_vec}, 2)
    null, self_ = ({n: torch.tensor(v) for n, v in curves[name].items()} for name in ("null", "self"))
    assert null["cos_dim_clean"].shape == (4,) and null["cos_dim_clean"].abs().min() > 1e-3  # a real curve
    torch.testing.assert_close(null["cos_dim_u_ablated"], null["cos_dim_clean"])
    assert null["cos_u_clean"].abs().max() < 1e-6 and null["cos_u_dim_ablated"].abs().max() < 1e-6
    torch.testing.assert_close(self_["cos_u_clean"], null["cos_dim_clean"])
    assert self_["cos_u_dim_ablated"].abs().max() < 1e-6 and self_["cos_dim_u_ablated"].abs().max() < 1e-6
    hs = [model(**C.tokenize(tok, [p]), output_hidden_states=True).hidden_states for p in HARMFUL[:3]]
    by_hand = torch.stack([torch.stack([F.cosine_similarity(h[l][0, -1], dim_vec, 0) for l in range(4)]) for h in hs])
    torch.testing.assert_close(null["cos_dim_clean"], by_hand.mean(0))


def test_defaults_and_their_sources():
    args = repind.parse_args(["--model", "m"])
    assert (args.lambda_repind, args.repind_layers, args.repind_positions) == (200.0, 0.9, "instruction")  # Table 3, A
    assert (args.n_directions, args.candidates, args.epochs) == (5, 5, 2)  # Appendix A; the authors' code
    assert (args.lambda_abl, args.lambda_add, args.lambda_ret) == (1.0, 0.2, 1.0)  # Table 3, not the authors' 0.1


# ----------------------------------------------------------------------------- the script

@pytest.fixture
def setup(tiny_dir, tmp_path):
    h, s, dim_file = train_files(tmp_path)
    base = ["--model", tiny_dir, "--harmful", h, "--harmless", s, "--n-train", "6", "--n-val", "2",
            "--dim", dim_file, "--effective-batch", "3", "--micro-batch", "2", "--dtype", "float32", "--epochs", "1",
            "--answer-tokens", "3", "--retain-tokens", "2", "--refusal-target-tokens", "3", "--select-last", "2",
            "--refusal-tokens", "I", "--cache", str(tmp_path / "cache"), "--lr", "0.05", "--n-directions", "2",
            "--candidates", "2"]
    return base, tmp_path, dim_file


def spy_masks(monkeypatch):
    """The (mask, input_ids) pairs that training hands the RepInd loss."""
    real, masks = repind.repind_loss, []

    def spy(model, r, others, batch, mask, n_layers):
        masks.append((mask.cpu(), batch["input_ids"].cpu()))
        return real(model, r, others, batch, mask, n_layers)
    monkeypatch.setattr(repind, "repind_loss", spy)
    return masks


def test_iteration_keeps_earlier_directions_fixed(setup, monkeypatch):
    """Also: by default L_RepInd averages over each harmful training prompt's own instruction tokens."""
    base, tmp, dim_file = setup
    real, seen, masks = repind.train_candidate, [], spy_masks(monkeypatch)

    def spy(S, args, others, *a, **k):
        seen.append((a[1], others.clone()))
        return real(S, args, others, *a, **k)

    monkeypatch.setattr(repind, "train_candidate", spy)
    repind.main(base + ["--out", str(tmp / "run")])
    t, meta = C.load_result(str(tmp / "run" / "repind.safetensors"))
    dirs, dim_vec = t["directions"], C.load_result(dim_file)[0]["direction"]
    assert dirs.shape == (2, dim_vec.shape[0]) and torch.allclose(dirs.norm(dim=-1), torch.ones(2))
    assert [s for s, _ in seen] == [0, 1, 2, 3]  # one seed per candidate
    for s, others in seen:  # direction 1 is independent of DIM; direction 2 of DIM and the kept direction 1
        assert len(others) == (1 if s < 2 else 2)
        torch.testing.assert_close(others[0].cpu(), dim_vec)  # the run may sit on a GPU
        if s >= 2:
            torch.testing.assert_close(others[1].cpu(), dirs[0], rtol=0, atol=0)
    for f in meta["directions"]:  # the kept candidate: the lowest validation refusal score, passing the filters first
        assert f["scores"] == C.lowest_bypass([c["scores"] for c in f["candidates"]])
        assert len(f["candidates"]) == 2 and all(len(c["history"]) == 2 for c in f["candidates"])
    assert set(meta["figure6"]) == {"repind1", "repind2"} and len(meta["figure6"]["repind1"]["cos_dim_u_ablated"]) == 4
    assert meta["refusal_tokens"]["words"] == ["I"] and meta["loss_layers"] == 3 and meta["args"]["lambda_ret"] == 1.0
    model, tok = C.load_model(meta["args"]["model"], "cpu", "float32")  # Figure 8: directions 1..k ablated together
    harm_val, ids = C.load_data(argparse.Namespace(**meta["args"]))[1], tok("I", add_special_tokens=False)["input_ids"]
    for k in (1, 2):
        with C.directional_ablation(model, dirs[:k]):
            want = C.refusal_scores(torch.stack([model(**C.tokenize(tok, [p])).logits[0, -1] for p in harm_val]), ids)
        assert meta["topk_bypass"][k - 1] == pytest.approx(want.mean().item(), abs=1e-5)
    assert not os.path.exists(tmp / "run" / "repind_checkpoint.pt")
    assert len(masks) == 4 * 2 * 2  # candidates x steps x micro-batches
    assert all(tok.decode(row[m]) in HARMFUL for mask, ids in masks for row, m in zip(ids, mask))


def test_the_kept_candidate_passes_the_filters_before_a_lower_near_miss(setup, monkeypatch):
    base, tmp, _ = setup
    scores = iter([(-5.0, ["kl>0.1"]), (-1.0, [])] * 2)  # per direction: seed 2k a near miss, seed 2k + 1 passing

    def fake(model, tok, iterates, *a, **k):
        bypass, discarded = next(scores)
        return [{"step": len(iterates) - 1, "bypass": bypass, "induce": 1.0, "kl": 0.0, "discarded": discarded}]
    monkeypatch.setattr(C, "score_iterates", fake)
    repind.main(base + ["--out", str(tmp / "run")])
    assert [f["seed"] for f in C.load_result(str(tmp / "run" / "repind.safetensors"))[1]["directions"]] == [1, 3]


def test_training_weights_the_loss_and_the_schedule_watches_the_unweighted_sum(setup, monkeypatch):
    """--lambda-repind weighs L_RepInd in the step's loss, the plateau schedule sees the unweighted sum of the four
    parts (the authors'), and --repind-positions last hands the loss the last token only."""
    base, tmp, _ = setup
    watched, masks, real_plateau = [], spy_masks(monkeypatch), C.plateau
    monkeypatch.setattr(C, "plateau", lambda state, value, *a: watched.append(value) or real_plateau(state, value, *a))
    repind.main(base + ["--out", str(tmp / "w"), "--candidates", "1", "--n-directions", "1", "--lambda-repind", "7",
                        "--repind-positions", "last"])
    history = C.load_result(str(tmp / "w" / "repind.safetensors"))[1]["directions"][0]["history"]
    assert len(history) == len(watched) == 2
    for h, value in zip(history, watched):
        assert h["repind"] > 0 and h["loss"] == pytest.approx(h["abl"] + 0.2 * h["add"] + h["ret"] + 7 * h["repind"])
        assert value == pytest.approx(h["abl"] + h["add"] + h["ret"] + h["repind"])
    assert masks and all(mask[:, -1].all() and mask.sum() == len(ids) for mask, ids in masks)


def test_resume_refuses_other_repind_settings(setup):
    base, tmp, _ = setup
    with interrupted_at_call(C, "plateau", 2):  # a checkpoint after the first step
        repind.main(base + ["--out", str(tmp / "c")])
    for flag, value, key in [("--lambda-repind", "100", "lambda_repind"), ("--repind-layers", "0.5", "repind_layers"),
                             ("--repind-positions", "last", "repind_positions"), ("--candidates", "3", "candidates"),
                             ("--select-last", "1", "select_last")]:
        with pytest.raises(C.RefusalError, match=f"other settings \\(.*{key}: "):
            repind.main(base + ["--out", str(tmp / "c"), "--resume", flag, value])


def test_resume_reaches_the_same_directions(setup):
    base, tmp, _ = setup
    base = base + ["--candidates", "1"]
    repind.main(base + ["--out", str(tmp / "full")])
    full, meta_full = C.load_result(str(tmp / "full" / "repind.safetensors"))
    # direction 2, second step: after its backward pass, before its checkpoint
    with interrupted_at_call(C, "plateau", 4):
        repind.main(base + ["--out", str(tmp / "part")])
    ck = torch.load(tmp / "part" / "repind_checkpoint.pt", weights_only=False)
    assert len(ck["found"]) == 1 and ck["train"]["step"] == 1
    with pytest.raises(C.RefusalError, match="unfinished run"):
        repind.main(base + ["--out", str(tmp / "part")])
    repind.main(base + ["--out", str(tmp / "part"), "--resume"])
    part, meta_part = C.load_result(str(tmp / "part" / "repind.safetensors"))
    torch.testing.assert_close(part["directions"], full["directions"], rtol=0, atol=1e-6)
    assert [h["loss"] for f in meta_part["directions"] for h in f["history"]] == \
        pytest.approx([h["loss"] for f in meta_full["directions"] for h in f["history"]], rel=1e-6)


def test_bad_flags(setup):
    base, tmp, _ = setup
    for flags, match in [(["--repind-layers", "0"], "repind-layers"), (["--repind-layers", "1.5"], "repind-layers"),
                         (["--candidates", "0"], "at least 1"), (["--n-directions", "0"], "at least 1")]:
        with pytest.raises(C.RefusalError, match=match):
            repind.main(base + flags + ["--out", str(tmp / "x")])


def test_a_bad_model_exits_2_with_one_line(setup):
    base, tmp, _ = setup
    done = subprocess.run([sys.executable, os.path.join(ROOT, "repind.py"), *base, "--model", "/nonexistent/model",
                           "--out", str(tmp / "y")], capture_output=True, text=True, cwd=tmp)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: model path '/nonexistent/model' does not exist")
