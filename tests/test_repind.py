"""repind.py: the RepInd loss by hand, its zero case, where its gradient goes, the iteration, resume."""
import os

import pytest
import torch
import torch.nn.functional as F

import common as C
import repind
from conftest import HARMFUL, interrupted_at_call, make_model, train_files


def hand_loss(model, tok, r, others, prompts, n_layers):
    """Definition 6.1's loss written plainly: one prompt at a time, full forward passes, hidden_states."""
    def inputs(p, ablate=None):
        batch = C.tokenize(tok, [p])
        if ablate is None:
            return [h[0, -1] for h in model(**batch, output_hidden_states=True).hidden_states[:n_layers]]
        u = ablate / ablate.norm()
        with C.directional_ablation(model, ablate):
            hs = model(**batch, output_hidden_states=True).hidden_states[:n_layers]
        # hidden_states[0] is the embedding before block 0's input hook; projecting again changes nothing elsewhere
        return [h[0, -1] - (h[0, -1] @ u) * u for h in hs]

    cos = lambda a, b: F.cosine_similarity(a, b, dim=0)
    total = 0.0
    for p in prompts:
        x, x_r = inputs(p), inputs(p, r)
        for v in others:
            x_v = inputs(p, v)
            total = total + sum((cos(x[l], r) - cos(x_v[l], r)) ** 2 for l in range(n_layers)) / n_layers
            total = total + sum((cos(x[l], v) - cos(x_r[l], v)) ** 2 for l in range(n_layers)) / n_layers
    return total / len(prompts)


def loss(model, tok, r, others, prompts, n_layers, weight=1.0, micro_batch=2):
    acts = (repind.cache_inputs(model, tok, prompts, n_layers, 3),
            torch.stack([repind.cache_inputs(model, tok, prompts, n_layers, 3, v) for v in others]))
    return repind.repind_loss_and_grad(model, tok, r, prompts, list(range(len(prompts))), acts, others, n_layers,
                                       weight, micro_batch)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_loss_and_gradient_equal_a_hand_computation(family):
    model, tok = make_model(family)
    torch.manual_seed(1)
    d = C.hidden_size(model)
    others = torch.randn(2, d)
    r1 = torch.randn(d).requires_grad_(True)
    got = loss(model, tok, r1, others, HARMFUL[:4], 3, weight=200.0)
    r2 = r1.detach().clone().requires_grad_(True)
    want = hand_loss(model, tok, r2, others, HARMFUL[:4], 3)
    (200.0 * want).backward()
    assert got == pytest.approx(want.item(), rel=1e-4) and got > 1e-4
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-3, atol=1e-7)


def test_early_exit_captures_block_inputs_and_skips_later_blocks():
    model, tok = make_model("llama")
    batch = C.tokenize(tok, HARMFUL[:3])  # left-padded: the last position is every row's last token
    calls = []
    handle = C.decoder_layers(model)[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        x = repind.last_token_inputs(model, batch, 3)
    finally:
        handle.remove()
    hs = C.forward(model, batch, output_hidden_states=True).hidden_states
    assert x.shape == (3, 3, C.hidden_size(model)) and not calls
    torch.testing.assert_close(x, torch.stack([h[:, -1] for h in hs[:3]], 1))
    assert repind.n_loss_layers(model, 0.9) == 3 and repind.n_loss_layers(model, 1.0) == 4


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


def test_zero_for_a_direction_no_layer_writes_or_reads():
    """Coordinate k stays 0 in the residual stream: nothing writes it (embeddings, attention and MLP outputs) and
    so nothing can read it. Ablating e_k then changes no activation, and cos(x, e_k) = 0 everywhere."""
    model, tok, k, e_k = untouched_coordinate_model()
    d = C.hidden_size(model)
    torch.manual_seed(0)
    others = torch.randn(2, d)
    others[:, k] = 0  # else ablating v itself writes -(x.v) v_k into coordinate k
    assert loss(model, tok, e_k.clone().requires_grad_(True), others, HARMFUL[:3], 3) < 1e-10
    assert loss(model, tok, torch.randn(d).requires_grad_(True), others, HARMFUL[:3], 3) > 1e-4  # not zero by accident


def test_loss_reads_the_cache_rows_of_its_prompts():
    """In training the cache holds the whole training set and `ids` are a batch's shuffled indices into it (the
    helper above always passes 0..n-1): prompts 4, 1, 3 read from a cache of six give their own loss and gradient."""
    model, tok = make_model("llama")
    torch.manual_seed(4)
    d = C.hidden_size(model)
    others = torch.randn(2, d)
    acts = (repind.cache_inputs(model, tok, HARMFUL[:6], 3, 4),
            torch.stack([repind.cache_inputs(model, tok, HARMFUL[:6], 3, 4, v) for v in others]))
    ids = [4, 1, 3]
    prompts = [HARMFUL[i] for i in ids]
    r1 = torch.randn(d).requires_grad_(True)
    r2 = r1.detach().clone().requires_grad_(True)
    got = repind.repind_loss_and_grad(model, tok, r1, prompts, ids, acts, others, 3, 1.0, 2)
    assert got == pytest.approx(loss(model, tok, r2, others, prompts, 3), rel=1e-5)
    torch.testing.assert_close(r1.grad, r2.grad)


def test_topk_bypass_ablates_the_first_k_directions_together():
    model, tok = make_model("llama")
    torch.manual_seed(5)
    dirs = torch.randn(3, C.hidden_size(model))
    got = repind.topk_bypass(model, tok, dirs, HARMFUL[:3], 2)
    ids = C.refusal_token_ids(tok)
    for k in range(1, 4):  # one prompt at a time, full forward passes
        with C.directional_ablation(model, dirs[:k]):
            logits = torch.stack([model(**C.tokenize(tok, [p])).logits[0, -1] for p in HARMFUL[:3]])
        assert got[k - 1] == pytest.approx(C.refusal_scores(logits, ids).mean().item(), abs=1e-5)


def test_figure6_curves_for_an_untouched_direction_and_for_dim_itself():
    """u = e_k, which no layer writes or reads: ablating it leaves DIM's cosines as they were, and cos(x, e_k) is 0
    with or without DIM ablated (DIM has no k-th component). u = DIM: ablated at every block input, cos(x, DIM) is 0."""
    model, tok, k, e_k = untouched_coordinate_model()
    torch.manual_seed(6)
    dim_vec = 4 * torch.randn(C.hidden_size(model))
    dim_vec[k] = 0  # else ablating DIM writes into coordinate k
    curves = repind.figure6(model, tok, HARMFUL[:3], dim_vec, {"null": e_k, "self": dim_vec}, 3, 2)
    null, self_ = ({n: torch.tensor(v) for n, v in curves[name].items()} for name in ("null", "self"))
    assert null["cos_dim_clean"].abs().min() > 1e-3  # a real curve, not zeros
    torch.testing.assert_close(null["cos_dim_u_ablated"], null["cos_dim_clean"])
    assert null["cos_u_clean"].abs().max() < 1e-6 and null["cos_u_dim_ablated"].abs().max() < 1e-6
    assert null["mean_abs_change_u_when_dim_ablated"] < 1e-6 and null["mean_abs_change_dim_when_u_ablated"] < 1e-6
    torch.testing.assert_close(self_["cos_u_clean"], null["cos_dim_clean"])
    assert self_["cos_u_dim_ablated"].abs().max() < 1e-6 and self_["cos_dim_u_ablated"].abs().max() < 1e-6
    # the mean change covers the loss layers 0..2 only
    assert self_["mean_abs_change_dim_when_u_ablated"] == pytest.approx(null["cos_dim_clean"][:3].abs().mean().item(), rel=1e-5)


def test_gradients_reach_only_the_new_direction():
    model, tok = make_model("qwen2")
    torch.manual_seed(2)
    others = torch.randn(2, C.hidden_size(model)).requires_grad_(True)
    r = torch.randn(C.hidden_size(model)).requires_grad_(True)
    loss(model, tok, r, others, HARMFUL[:3], 3)
    assert r.grad is not None and r.grad.abs().max() > 0
    assert others.grad is None and all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- the script

@pytest.fixture
def setup(tiny_dir, tmp_path):
    h, s, dim_file = train_files(tmp_path)
    perp = C.save_result(str(tmp_path / "perp"), "rdo", {"direction": torch.randn(C.load_result(dim_file)[0]["direction"].shape[0])},
                         {"layer": 2})
    base = ["--model", tiny_dir, "--harmful", h, "--harmless", s, "--n-train", "6", "--n-val", "2",
            "--dim", dim_file, "--effective-batch", "3", "--micro-batch", "2", "--dtype", "float32", "--epochs", "1",
            "--answer-tokens", "3", "--retain-tokens", "2", "--refusal-tokens", "3", "--select-last", "2",
            "--cache", str(tmp_path / "cache"), "--lr", "0.05", "--n-directions", "2", "--candidates", "2"]
    return base, tmp_path, dim_file, perp


def test_iteration_keeps_earlier_directions_fixed(setup, monkeypatch):
    base, tmp, dim_file, perp = setup
    real, seen = repind.train_candidate, []

    def spy(S, args, seed, activations, others, *a, **k):
        seen.append((seed, others.clone(), activations()[1].shape[0]))
        return real(S, args, seed, activations, others, *a, **k)

    monkeypatch.setattr(repind, "train_candidate", spy)
    repind.main(base + ["--out", str(tmp / "run"), "--compare", perp])
    t, meta = C.load_result(str(tmp / "run" / "repind.safetensors"))
    dirs, dim_vec = t["directions"], C.load_result(dim_file)[0]["direction"]
    assert dirs.shape == (2, dim_vec.shape[0]) and torch.allclose(dirs.norm(dim=-1), torch.ones(2))
    assert [s for s, _, _ in seen] == [0, 1, 2, 3]  # one seed per candidate
    for s, others, m in seen:  # direction 1 is independent of DIM; direction 2 of DIM and the kept direction 1
        assert m == len(others) == (1 if s < 2 else 2)
        torch.testing.assert_close(others[0].cpu(), dim_vec)  # the run may sit on a GPU
        if s >= 2:
            torch.testing.assert_close(others[1].cpu(), dirs[0], rtol=0, atol=0)
    for f in meta["directions"]:  # the kept candidate has the lowest validation refusal score
        assert f["scores"]["bypass"] == min(c["scores"]["bypass"] for c in f["candidates"])
        assert len(f["candidates"]) == 2 and all(len(c["history"]) == 2 for c in f["candidates"])
    assert set(meta["figure6"]) == {"repind1", "repind2", "compare"} and len(meta["topk_bypass"]) == 2
    assert len(meta["figure6"]["repind1"]["cos_dim_u_ablated"]) == 4
    assert not os.path.exists(tmp / "run" / "repind_checkpoint.pt")


def test_training_hands_the_loss_its_weight_and_its_batch_activations(setup, monkeypatch):
    """What train_candidate passes to the RepInd loss: --lambda-ind as the weight, and for the batch's ids the
    cached block inputs of exactly those prompts, clean and with each v (DIM, then the kept direction 1) ablated."""
    base, tmp, _, _ = setup
    real, seen = repind.repind_loss_and_grad, []

    def spy(model, tok, r, prompts, ids, acts, others, n_layers, weight, micro_batch):
        seen.append((model, tok, prompts, acts[0][ids].clone(), acts[1][:, ids].clone(), others.clone(), n_layers, weight))
        return real(model, tok, r, prompts, ids, acts, others, n_layers, weight, micro_batch)

    monkeypatch.setattr(repind, "repind_loss_and_grad", spy)
    repind.main(base + ["--out", str(tmp / "run"), "--candidates", "1", "--max-steps", "1", "--lambda-ind", "7"])
    assert [len(s[5]) for s in seen] == [1, 2]  # one step for each direction
    for model, tok, prompts, clean, by_v, others, n_layers, weight in seen:
        assert weight == 7.0 and n_layers == 3
        torch.testing.assert_close(clean, repind.cache_inputs(model, tok, prompts, n_layers, 8))
        for v, got in zip(others, by_v):
            torch.testing.assert_close(got, repind.cache_inputs(model, tok, prompts, n_layers, 8, v))


@pytest.mark.parametrize("flag, value, key", [("--lambda-ind", "100", "lambda_ind"),
                                              ("--layer-cutoff", "0.5", "layer_cutoff"),
                                              ("--candidates", "3", "candidates")])
def test_resume_refuses_other_repind_settings(setup, flag, value, key):
    base, tmp, _, _ = setup
    with interrupted_at_call(repind.rdo, "plateau_step", 2):  # a checkpoint after the first step
        repind.main(base + ["--out", str(tmp / "c")])
    with pytest.raises(C.RefusalError, match=f"other settings \\(.*{key}: "):
        repind.main(base + ["--out", str(tmp / "c"), "--resume", flag, value])


def test_resume_reaches_the_same_directions(setup):
    base, tmp, _, _ = setup
    base = base + ["--candidates", "1"]
    repind.main(base + ["--out", str(tmp / "full")])
    full, meta_full = C.load_result(str(tmp / "full" / "repind.safetensors"))
    # direction 2, second step: after its backward pass, before its checkpoint
    with interrupted_at_call(repind.rdo, "plateau_step", 4):
        repind.main(base + ["--out", str(tmp / "part")])
    ck = torch.load(tmp / "part" / "repind_checkpoint.pt", weights_only=False)
    assert len(ck["found"]) == 1 and ck["train"]["state"]["step"] == 1
    with pytest.raises(C.RefusalError, match="unfinished run"):
        repind.main(base + ["--out", str(tmp / "part")])
    repind.main(base + ["--out", str(tmp / "part"), "--resume"])
    part, meta_part = C.load_result(str(tmp / "part" / "repind.safetensors"))
    torch.testing.assert_close(part["directions"], full["directions"], rtol=0, atol=1e-6)
    assert [h["loss"] for f in meta_part["directions"] for h in f["history"]] == \
        pytest.approx([h["loss"] for f in meta_full["directions"] for h in f["history"]], rel=1e-6)


def test_bad_flags(setup):
    base, tmp, _, _ = setup
    with pytest.raises(C.RefusalError, match="layer-cutoff"):
        repind.main(base + ["--layer-cutoff", "0", "--out", str(tmp / "x")])
    with pytest.raises(C.RefusalError, match="at least 1"):
        repind.main(base + ["--candidates", "0", "--out", str(tmp / "y")])
