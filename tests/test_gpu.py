"""The CUDA / bf16 path: runs only where a GPU is present (bench/gpu_smoke.sh runs it there)."""
import pytest
import torch

import common as C
import rdo
from conftest import FAMILIES, HARMFUL, HARMLESS, make_model
from test_hooks import capture_blocks, max_rel_projection

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_ablation_invariant_on_cuda(family):
    model, tok = make_model(family)
    model.to("cuda", torch.bfloat16)
    r = torch.randn(C.hidden_size(model), device="cuda")
    with C.directional_ablation(model, r):
        rec, remove = capture_blocks(model)
        batch = C.tokenize(tok, HARMFUL[:3], "cuda")
        C.forward(model, batch)
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        remove()
    assert max_rel_projection(rec, r) < 2e-2  # bf16 rounding of the projected states


def test_rdo_loss_and_gradient_on_cuda_match_the_cpu():
    model, tok = make_model("llama")
    tg = {"answer": [[40, 41, 42], [43, 44]], "refusal": [[45], [46, 47]], "retain": [[50, 51], [52]]}
    batch = list(zip(HARMFUL[:2], HARMLESS[:2], tg["answer"], tg["refusal"], tg["retain"]))
    lam = {"abl": 1.0, "add": 0.2, "ret": 1.0}
    r = torch.randn(C.hidden_size(model))
    r1 = r.clone().requires_grad_(True)
    cpu = rdo.loss_and_grad(model, tok, r1, batch, 3.0, 1, lam, 2)
    model.to("cuda")
    r2 = r.cuda().requires_grad_(True)
    gpu = rdo.loss_and_grad(model, tok, r2, batch, 3.0, 1, lam, 2)
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
    torch.testing.assert_close(r2.grad.cpu(), r1.grad, rtol=1e-2, atol=1e-4)
    states = rdo.clean_states(model, tok, HARMLESS[:2], tg["retain"], 2)  # rdo.py's step: the clean side precomputed
    assert all(s.device.type == "cuda" for s in states)
    r4 = r.cuda().requires_grad_(True)
    cached = rdo.loss_and_grad(model, tok, r4, [b + (s,) for b, s in zip(batch, states)], 3.0, 1, lam, 2)
    assert cached["ret"] == pytest.approx(gpu["ret"], rel=1e-4, abs=1e-7)
    torch.testing.assert_close(r4.grad, r2.grad, rtol=1e-3, atol=1e-6)
    model.to(torch.bfloat16)
    r3 = r.cuda().requires_grad_(True)
    bf = rdo.loss_and_grad(model, tok, r3, batch, 3.0, 1, lam, 2)
    assert r3.grad.dtype == torch.float32 and torch.isfinite(r3.grad).all()
    assert bf["loss"] == pytest.approx(cpu["loss"], rel=5e-2)


def test_load_model_picks_cuda_and_bf16(tiny_dir):
    model, tok = C.load_model(tiny_dir)
    assert C.input_device(model).type == "cuda" and model.dtype == torch.bfloat16
    r = torch.randn(C.hidden_size(model))
    with C.directional_ablation(model, r):
        out = C.generate(model, tok, HARMFUL[:4], max_new_tokens=4)
        with C.block_inputs(model) as seen:  # the hooks act on CUDA in bf16: every block input has ~0 along r
            C.forward(model, C.tokenize(tok, HARMFUL[:4], "cuda"))
    assert len(out) == 4 and len(seen) == len(C.decoder_layers(model))
    u = (r / r.norm()).cuda()
    for x in seen:
        assert ((x.float() @ u).abs() <= 2e-2 * x.float().norm(dim=-1) + 1e-3).all()
    scores = C.refusal_scores(C.last_logits(model, tok, HARMFUL[:4]), C.refusal_token_ids(tok))
    assert scores.dtype == torch.float64 and torch.isfinite(scores).all()


def test_gcg_candidate_losses_on_cuda_match_the_cpu():
    """A GPU runs GCG's candidates in one batch, a CPU in four that share the suffix head: the same losses."""
    import torch.nn.functional as F
    import gcg_repind as G
    from test_gcg import setup
    model, tok, before, after, target, ids = setup("qwen2")
    unit = F.normalize(torch.randn(C.hidden_size(model)), dim=0)
    g = torch.Generator().manual_seed(0)
    cand = ids.repeat(9, 1)
    cand[torch.arange(9), torch.randint(0, len(ids), (9,), generator=g)] = torch.randint(40, 120, (9,), generator=g)
    cpu = G.candidate_losses(model, G.make_context(model, before, after, target), ids, cand, unit, 2.0, 16)[0]
    model.to("cuda")
    gpu = G.candidate_losses(model, G.make_context(model, before, after, target), ids, cand, unit.cuda(), 2.0, 16)[0]
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)
