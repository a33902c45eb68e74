"""Which sign does the addition loss prefer along a run's iterates? (Qwen2.5-Coder-0.5B-Instruct, not part of CI)

The ablation and retain losses are even in r, so only the addition loss tells r from -r. For each run given, this
prints the mean addition loss CE(f_add(+-alpha r_hat, layer)(p_safe), refusal) of r and of -r at a few of its saved
iterates, on 32 held-out harmless prompts with one refusal sentence as the target (a proxy for the run's own
t_refusal). README: a run at lambda_add 0 can end at either mirror image; --sign-warmup picks the preferred one.

  python bench/rdo_sign.py runs/bench/rdo_qwen_512_ret2_add0_p10 runs/bench/rdo_qwen_512_ret2_add0_p10_s1
"""
import os, sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import rdo  # noqa: E402
from evalkit import QWEN, held_out  # noqa: E402

STEPS = (0, 1, 2, 3, 5, 8, -1)

model, tok = C.load_model(QWEN)
_, safe = held_out(32)
refusal = tok("I'm sorry, but I can't assist with that.", add_special_tokens=False)["input_ids"]
batch = rdo.pack(tok, safe, [refusal] * len(safe), C.input_device(model))
print(f"{'run':45s} " + " ".join(f"{'step ' + str(s) if s >= 0 else 'last':>11s}" for s in STEPS) + "   (+r / -r)")
for run in sys.argv[1:]:
    tensors, meta = C.load_result(os.path.join(run, "rdo.safetensors"))
    iterates = C.check_direction(model, tensors["iterates"], run)
    with torch.no_grad():
        loss = lambda v: rdo.addition_loss(model, v, batch, meta["alpha"], meta["layer"]).mean().item()
        cells = [f"{loss(iterates[s]):5.2f}/{loss(-iterates[s]):5.2f}" for s in STEPS]
    print(f"{os.path.basename(run.rstrip('/')):45s} " + " ".join(f"{c:>11s}" for c in cells), flush=True)
