"""The CUDA / bf16 path: runs only where a GPU is present (bench/gpu_smoke.sh runs it there)."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common as C
import rdo
from conftest import FAMILIES, HARMFUL, HARMLESS, make_model, train_files

DEV = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def max_rel_projection(model, r, run):
    """The largest |x . r_hat| / |x| over every block's input and output (all positions) while run() runs."""
    u, worst = F.normalize(r.float(), dim=0), [0.0]

    def record(x):
        x = x.float()
        worst[0] = max(worst[0], ((x @ u.to(x.device)).abs() / x.norm(dim=-1).clamp_min(1e-6)).max().item())
    regs = []
    for block in C.decoder_layers(model):
        regs.append((lambda h, b=block: b.register_forward_pre_hook(h, with_kwargs=True),
                     lambda m, a, kw: record(a[0] if a else kw["hidden_states"])))
        regs.append((block.register_forward_hook, lambda m, a, out: record(out[0] if isinstance(out, tuple) else out)))
    with C.hooks(regs):
        run()
    return worst[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_ablation_invariant_on_cuda(family):
    model, tok = make_model(family)
    model.to(DEV, torch.bfloat16)
    r = torch.randn(C.hidden_size(model), device=DEV)
    batch = C.tokenize(tok, HARMFUL[:3], DEV)

    def run():
        C.forward(model, batch)
        model.generate(**batch, max_new_tokens=4, **C.GREEDY, pad_token_id=tok.pad_token_id)
    assert max_rel_projection(model, r, run) > 0.05  # the check can fail: without ablation r is there
    with C.directional_ablation(model, r):
        assert max_rel_projection(model, r, run) < 2e-2  # bf16 rounding of the projected states


EXAMPLES = list(zip(HARMFUL[:3], HARMLESS[:3], [[40, 41, 42], [43, 44], [45, 46, 47]], [[45], [46, 47], [48, 49]],
                    [[50, 51], [52], [53, 54, 55]]))


def compute_loss(model, tok, r, device, lambdas=(1.0, 0.2, 1.0)):
    S = SimpleNamespace(model=model, tok=tok, micro_batch=2, device=torch.device(device), alpha=3.0, layer=1)
    r = r.to(device).requires_grad_(True)
    sums = rdo.compute_loss(S, r, EXAMPLES, lambdas)
    return sums, r.grad.cpu()


def test_rdo_loss_and_gradient_on_cuda_match_the_cpu():
    """rdo.compute_loss (COMPUTELOSS over micro-batches) on the GPU: fp32 as on the CPU; bf16 close, its gradient
    fp32 and finite."""
    model, tok = make_model("llama")
    r = torch.randn(C.hidden_size(model), generator=torch.Generator().manual_seed(0))
    cpu, cpu_grad = compute_loss(model, tok, r, "cpu")
    model.to(DEV)
    gpu, gpu_grad = compute_loss(model, tok, r, DEV)
    for k in ("abl", "add", "ret"):
        assert gpu[k] == pytest.approx(cpu[k], rel=1e-3, abs=1e-6), k
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-2, atol=1e-4)
    model.to(torch.bfloat16)
    bf, bf_grad = compute_loss(model, tok, r, DEV)
    assert bf_grad.dtype == torch.float32 and torch.isfinite(bf_grad).all()
    for k in ("abl", "add"):
        assert bf[k] == pytest.approx(cpu[k], rel=5e-2), k
    assert bf["ret"] >= 0 and F.cosine_similarity(bf_grad, cpu_grad, dim=0) > 0.9


def test_load_model_picks_cuda_and_bf16(tiny_dir):
    model, tok = C.load_model(tiny_dir)
    assert C.input_device(model).type == "cuda" and model.dtype == torch.bfloat16
    r = torch.randn(C.hidden_size(model))
    with C.directional_ablation(model, r):
        out = C.generate(model, tok, HARMFUL[:4], max_new_tokens=4)
        with C.block_inputs(model) as seen:  # the hooks act on CUDA in bf16: every block input has ~0 along r
            C.forward(model, C.tokenize(tok, HARMFUL[:4], C.input_device(model)))
    assert len(out) == 4 and len(seen) == len(C.decoder_layers(model))
    u = (r / r.norm()).to(C.input_device(model))
    for x in seen:
        assert ((x.float() @ u).abs() <= 2e-2 * x.float().norm(dim=-1) + 1e-3).all()
    ids, info = C.refusal_tokens(model, tok, HARMFUL * 2)  # the model's own (a random model: the fixed fallback)
    assert info["source"] in ("derived", "fallback") and ids
    scores = C.refusal_scores(C.last_logits(model, tok, HARMFUL[:4]), ids)
    assert scores.dtype == torch.float64 and torch.isfinite(scores).all()


def test_rdo_runs_end_to_end_on_cuda(tiny_dir, tmp_path):
    """The whole loop on the GPU in the default dtype (bf16): whole effective batches per pass, a unit direction."""
    h, s, dim_file = train_files(tmp_path, repeat=3)
    rdo.main(["--model", tiny_dir, "--harmful", h, "--harmless", s, "--n-train", "16", "--n-val", "4",
              "--dim", dim_file, "--effective-batch", "4", "--answer-tokens", "4", "--retain-tokens", "3",
              "--refusal-target-tokens", "4", "--refusal-tokens", "I", "--select-last", "2", "--device", DEV,
              "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    d, _ = C.load_result(str(tmp_path / "out" / "rdo.safetensors"))
    meta = json.load(open(tmp_path / "out" / "rdo.json"))
    assert len(meta["history"]) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in meta["history"])
    assert d["direction"].norm().item() == pytest.approx(1.0, abs=1e-4)


def test_gcg_candidate_losses_on_cuda_match_the_cpu():
    """GCG's candidate batch (prefix cache, CE and the RepInd term) on the GPU gives the CPU's losses."""
    import gcg_repind as G
    model, tok = make_model("qwen2")
    before, after = G.split_template(tok, HARMFUL[0])
    target = tok("Sure, here is", add_special_tokens=False)["input_ids"]
    ids = torch.tensor(G.init_suffix(tok, 8))
    unit = F.normalize(torch.randn(C.hidden_size(model), generator=torch.Generator().manual_seed(0)), dim=0)
    g = torch.Generator().manual_seed(0)
    cand = ids.repeat(9, 1)
    cand[torch.arange(9), torch.randint(0, len(ids), (9,), generator=g)] = torch.randint(40, 120, (9,), generator=g)
    cpu = G.candidate_losses(model, G.make_context(model, before, after, target, unit, 2.0, 3), cand, 16)
    model.to(DEV)
    gpu = G.candidate_losses(model, G.make_context(model, before, after, target, unit.to(DEV), 2.0, 3), cand, 16)
    assert (cpu[:, 2] > 0).all()  # the term is in the losses compared
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
