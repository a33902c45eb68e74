"""Directional ablation and activation addition: invariants on tiny Llama / Qwen2 / Gemma2 / Gemma3 models."""
import pytest
import torch

import common as C
from conftest import FAMILIES, HARMFUL, make_model

PROMPTS = HARMFUL[:3]


def capture_blocks(model):
    """Register hooks that record every block's input and output; returns (records, remove)."""
    rec, handles = [], []
    for l, block in enumerate(C.decoder_layers(model)):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, l=l: rec.append(("in", l, (a[0] if a else kw["hidden_states"]).detach().clone())),
            with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda m, a, o, l=l: rec.append(("out", l, (o[0] if isinstance(o, tuple) else o).detach().clone()))))
    return rec, lambda: [h.remove() for h in handles]


def max_rel_projection(records, basis):
    q = C.unit_basis(basis)
    return max(((x.float() @ q.T).norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-6)).max().item() for _, _, x in records)


def run_forward_and_generate(model, tok):
    batch = C.tokenize(tok, PROMPTS)
    C.forward(model, batch)
    model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 2])
def test_ablation_leaves_no_projection_on_any_block_input_or_output(family, k):
    model, tok = make_model(family)
    torch.manual_seed(1)
    dirs = torch.randn(k, C.hidden_size(model)) if k > 1 else torch.randn(C.hidden_size(model))
    rec, remove = capture_blocks(model)
    run_forward_and_generate(model, tok)
    assert max_rel_projection(rec, dirs) > 0.05  # without the hooks the direction is clearly present
    rec.clear()
    with C.directional_ablation(model, dirs):
        r2, remove2 = capture_blocks(model)  # registered after the ablation hooks, so sees their result
        run_forward_and_generate(model, tok)
        remove2()
    remove()
    n_layers = len(C.decoder_layers(model))
    decode_steps = [x for kind, _, x in r2 if x.shape[1] == 1]
    assert decode_steps, "generate must have run with the KV cache (one new token per step)"
    assert {(kind, l) for kind, l, _ in r2} == {(kind, l) for kind in ("in", "out") for l in range(n_layers)}
    assert max_rel_projection(r2, dirs) < 1e-5


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_needs_the_post_norm_hooks(family, monkeypatch):
    """Hooking self_attn/mlp (as published code did) lets Gemma's post-norms re-introduce the direction."""
    model, tok = make_model(family)
    r = torch.randn(C.hidden_size(model))
    monkeypatch.setattr(C, "residual_writers", lambda block: [block.self_attn, block.mlp])
    with C.directional_ablation(model, r):
        rec, remove = capture_blocks(model)
        C.forward(model, C.tokenize(tok, PROMPTS))
        remove()
    assert max_rel_projection([x for x in rec if x[0] == "out"], r) > 1e-3


def test_ablation_in_bfloat16_on_cpu():
    model, tok = make_model("qwen2")
    model.to(torch.bfloat16)
    r = torch.randn(C.hidden_size(model))
    with C.directional_ablation(model, r):
        rec, remove = capture_blocks(model)
        run_forward_and_generate(model, tok)
        remove()
    assert max_rel_projection(rec, r) < 3e-2  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("family", FAMILIES)
def test_addition_shifts_only_the_chosen_block_input_by_alpha_r_hat(family):
    model, tok = make_model(family)
    layer, alpha = 2, 3.0
    r = torch.randn(C.hidden_size(model))
    vec = alpha * r / r.norm()
    batch = C.tokenize(tok, PROMPTS)
    before, remove_before = capture_blocks(model)  # runs before the addition hook
    C.forward(model, batch)
    clean = list(before)
    before.clear()
    with C.activation_addition(model, vec, layer):
        after, remove_after = capture_blocks(model)  # runs after it
        C.forward(model, batch)
        n_prefill = len(after)
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        remove_after()
    remove_before()
    ins = lambda rec: [(l, x) for k, l, x in rec if k == "in"]
    assert any(x.shape[1] == 1 for _, x in ins(after)), "generate must have run with the KV cache"
    # every call, prefill and each generated token: the chosen block's input moves by exactly alpha * r_hat at
    # every position, and no other block input is touched by the hook
    for (l, x0), (l1, x1) in zip(ins(before), ins(after)):
        assert l == l1
        expected = vec.expand_as(x0) if l == layer else torch.zeros_like(x0)
        torch.testing.assert_close(x1 - x0, expected, atol=1e-5, rtol=0)
    # and nothing upstream of the chosen block differs from the clean run
    for (k, l, x), (k2, l2, x2) in zip(clean, after[:n_prefill]):
        if l < layer:
            torch.testing.assert_close(x2, x)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_addition_and_ablation_act_on_every_generated_token(family):
    """During generate (KV cache), each decoding step's new token passes through the hooks: the block input at the
    step's one new position is shifted by exactly the vector (addition), or has no component along r (ablation),
    not only the prompt's positions at prefill."""
    model, tok = make_model(family)
    batch = C.tokenize(tok, PROMPTS[:2])
    block = C.decoder_layers(model)[1]
    seen = []
    capture = lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
    gen = lambda: model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                                 min_new_tokens=4)
    v = 5 * torch.randn(C.hidden_size(model))
    with C.hooks([(lambda h: block.register_forward_pre_hook(h, with_kwargs=True), capture)]):
        base = gen()
        n = len(seen)
        with C.activation_addition(model, v, 1):  # registered after the capture: the capture sees the raw input
            steered = gen()
    raw = seen[n:]
    assert n == 4 and len(raw) == 4 and all(x.shape[1] == 1 for x in raw[1:])  # prefill, then one token a step
    # replay: the same steered tokens through the model, the addition seen after it acts this time
    after = []
    grab = lambda m, args, kwargs: after.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
    with C.activation_addition(model, v, 1):
        with C.hooks([(lambda h: block.register_forward_pre_hook(h, with_kwargs=True), grab)]):
            again = gen()
    assert torch.equal(again, steered) and not torch.equal(base, steered)
    for x_raw, x_after in zip(raw[1:], after[1:]):  # every decoding step's new token got exactly +v
        torch.testing.assert_close(x_after - x_raw, v.expand_as(x_raw), atol=1e-5, rtol=0)
    r = torch.randn(C.hidden_size(model))
    after.clear()
    with C.directional_ablation(model, r):
        with C.hooks([(lambda h: block.register_forward_pre_hook(h, with_kwargs=True), grab)]):
            gen()
    assert len(after) == 4 and all((x @ (r / r.norm())).abs().max() < 1e-4 * x.norm() for x in after)
    assert torch.equal(gen(), base)  # and the model is back to normal afterwards


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_on_exception_and_weights_unchanged():
    model, tok = make_model("gemma2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n0 = hook_count(model)
    r = torch.randn(C.hidden_size(model))
    with C.directional_ablation(model, r), C.activation_addition(model, r, 1):
        assert hook_count(model) > n0
        C.forward(model, C.tokenize(tok, PROMPTS))
    assert hook_count(model) == n0
    with pytest.raises(RuntimeError, match="boom"):
        with C.directional_ablation(model, torch.randn(2, C.hidden_size(model))):
            with C.activation_addition(model, r, 0):
                raise RuntimeError("boom")
    assert hook_count(model) == n0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gradients_reach_the_direction_exactly(family):
    """Autograd through both hooks matches finite differences (float64 tiny model)."""
    model, tok = make_model(family, layers=2)
    model.to(torch.float64)
    batch = C.tokenize(tok, PROMPTS[:1])  # unpadded: float64 eager attention turns fully masked rows into NaN
    torch.manual_seed(0)
    r0 = torch.randn(C.hidden_size(model), dtype=torch.float64)

    def f_ablate(r):
        with C.directional_ablation(model, r):
            return C.forward(model, batch).logits[:, -1, :5].sum()

    def f_add(r):
        with C.activation_addition(model, 2.0 * r / r.norm(), 1):
            return C.forward(model, batch).logits[:, -1, :5].sum()

    for f in (f_ablate, f_add):
        r = r0.clone().requires_grad_(True)
        f(r).backward()
        assert r.grad is not None and r.grad.abs().sum() > 0
    # the directional derivative along a random e against a central difference (the models' norms compute in fp32
    # even in float64, which leaves the difference ~1e-4 relative noise); both functions see only r / |r|, so the
    # exact gradient is orthogonal to r
    e = torch.randn(r0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for f in (f_ablate, f_add):
        r = r0.clone().requires_grad_(True)
        f(r).backward()
        fd = (f(r0 + 1e-2 * e) - f(r0 - 1e-2 * e)).item() / 2e-2
        assert (r.grad @ e).item() == pytest.approx(fd, rel=2e-3)
        assert abs((r.grad @ r0).item()) < 1e-8 * r.grad.norm().item() * r0.norm().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_are_finite_through_padded_batches(family):
    model, tok = make_model(family)
    batch = C.tokenize(tok, PROMPTS)
    assert (batch["attention_mask"] == 0).any()
    r = torch.randn(C.hidden_size(model), requires_grad=True)
    with C.directional_ablation(model, r), C.activation_addition(model, 2 * r / r.norm(), 1):
        C.forward(model, batch).logits[:, -1].logsumexp(-1).sum().backward()
    assert torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0


def test_per_row_ablation_equals_each_row_ablated_alone():
    """directions of shape (batch, 1, d): row i sees exactly the ablation of its own direction."""
    model, tok = make_model("llama")
    batch = C.tokenize(tok, ["first prompt", "a second, longer prompt"])
    dirs = torch.randn(2, model.config.hidden_size)
    with C.directional_ablation(model, dirs.unsqueeze(1)):
        both = C.forward(model, batch).logits
    for i in range(2):
        with C.directional_ablation(model, dirs[i]):
            alone = C.forward(model, batch).logits
        assert torch.allclose(both[i], alone[i], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_block_inputs_are_the_hidden_states_and_stop_early(family):
    """block_inputs records x_l = hidden_states[l] at the position, one pass per clear; stop_at=L ends the pass
    before block L runs (and the with block with it); every hook is removed afterwards."""
    model, tok = make_model(family)
    batch = C.tokenize(tok, PROMPTS)
    with torch.no_grad():
        hidden = C.forward(model, batch, output_hidden_states=True).hidden_states
        with C.block_inputs(model, position=-2) as seen:
            C.forward(model, batch)
            assert len(seen) == len(C.decoder_layers(model))
            for l, x in enumerate(seen):
                torch.testing.assert_close(x, hidden[l][:, -2])
        ran, after_forward = [], []
        handle = C.decoder_layers(model)[1].register_forward_hook(lambda *a: ran.append(1))  # after block 1 ran
        with C.block_inputs(model, stop_at=1) as seen:
            C.forward(model, batch)
            after_forward.append(1)  # never reached: the stop ends the with block
        handle.remove()
    assert len(seen) == 1 and not ran and not after_forward
    torch.testing.assert_close(seen[0], hidden[0][:, -1])
    assert all(not b._forward_pre_hooks for b in C.decoder_layers(model))
