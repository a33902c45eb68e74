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


def test_zero_for_a_direction_no_layer_writes_or_reads():
    """Coordinate k stays 0 in the residual stream: nothing writes it (embeddings, attention and MLP outputs) and
    so nothing can read it. Ablating e_k then changes no activation, and cos(x, e_k) = 0 everywhere."""
    model, tok = make_model("llama")
    k = 5
    model.model.embed_tokens.weight[:, k] = 0
    for block in C.decoder_layers(model):
        block.self_attn.o_proj.weight[k] = 0
        block.mlp.down_proj.weight[k] = 0
    d = C.hidden_size(model)
    e_k = torch.zeros(d)
    e_k[k] = 1
    torch.manual_seed(0)
    others = torch.randn(2, d)
    others[:, k] = 0  # else ablating v itself writes -(x.v) v_k into coordinate k
    assert loss(model, tok, e_k.clone().requires_grad_(True), others, HARMFUL[:3], 3) < 1e-10
    assert loss(model, tok, torch.randn(d).requires_grad_(True), others, HARMFUL[:3], 3) > 1e-4  # not zero by accident


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
