"""What the real-model benches share: the held-out prompts, the three measurements of a direction, and random
weights in a real model's shape for timings on a machine the real weights cannot reach."""
import os

import torch

import common as C

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "saladbench_splits")
QWEN = os.path.expanduser("~/.cache/refusal-test-models/qwen2.5-coder-0.5b-instruct")
DIM = "runs/bench/dim_qwen/selected/dim.safetensors"  # bench/dim_qwen.py's chosen direction: the other benches' default


def split_args(data=DATA):
    """The paper's splits as command-line flags: train files for --harmful / --harmless, val files beside them."""
    D = lambda name: os.path.join(data, name)
    return ["--harmful", D("harmful_train.json"), "--harmful-val", D("harmful_val.json"),
            "--harmless", D("harmless_train.json"), "--harmless-val", D("harmless_val.json")]


def held_out(n=64, skip=32, seed=0):
    """n harmful and n harmless validation prompts after the first `skip` (which dim.py / rdo.py validate on)."""
    D = lambda name: os.path.join(DATA, name)
    harm = C.get_prompts(D("harmful_train.json"), 0, skip + n, D("harmful_val.json"), seed)[1][skip:]
    safe = C.get_prompts(D("harmless_train.json"), 0, skip + n, D("harmless_val.json"), seed)[1][skip:]
    return harm, safe


def refusal_rate(completions):
    return sum(map(C.is_refusal, completions)) / max(len(completions), 1)


def kl_last(base_logits, logits):
    """Mean over prompts of KL(P_base || P) at the last position."""
    return C.kl(base_logits.double(), logits.double()).mean().item()


def measure(model, tok, harm, safe, direction=None, alpha=None, layer=None, max_new_tokens=64):
    """Refusal rate of harmful prompts (ablated), refusal rate of harmless prompts (alpha * r_hat added at layer),
    and harmless KL at the last position under ablation. direction=None: the unmodified model."""
    if direction is None:
        return {"harmful_refusal": refusal_rate(hc := C.generate(model, tok, harm, max_new_tokens, desc="harmful")),
                "harmless_refusal": refusal_rate(sc := C.generate(model, tok, safe, max_new_tokens, desc="harmless")),
                "harmless_kl": 0.0, "completions": {"harmful": hc, "harmless": sc}}
    unit = direction / direction.norm()
    with C.directional_ablation(model, unit):
        hc = C.generate(model, tok, harm, max_new_tokens, desc="harmful, ablated")
        abl = C.last_logits(model, tok, safe)
    with C.activation_addition(model, alpha * unit, layer):
        sc = C.generate(model, tok, safe, max_new_tokens, desc="harmless, added")
    return {"harmful_refusal": refusal_rate(hc), "harmless_refusal": refusal_rate(sc),
            "harmless_kl": kl_last(C.last_logits(model, tok, safe), abl),
            "completions": {"harmful_ablated": hc, "harmless_added": sc}}


def random_model(folder, device, dtype, config=None):
    """Random weights in the shape of the model whose config.json and tokenizer are in `folder` (or of `config`,
    with the folder's tokenizer), set up as C.load_model sets up a loaded model: speed only (a GPU machine here
    cannot take the 1 GB of real weights)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # nanoGCG's 4.47.1 too
    torch.manual_seed(0)
    with torch.device(C.pick_device(device)):  # random init on the GPU: seconds instead of a minute
        model = AutoModelForCausalLM.from_config(config or AutoConfig.from_pretrained(folder), **{key: C.pick_dtype(dtype, device)})
    model.eval().requires_grad_(False)
    model.get_output_embeddings().register_forward_pre_hook(C._dense_input)
    return model, tok
