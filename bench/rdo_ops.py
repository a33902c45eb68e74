"""Operations dispatched in one RDO optimizer step (16 pairs): rdo.py, the floor, and both without the shared prefix.

A small model on a GPU waits on kernel launches more than on arithmetic, so the number of operations, not FLOPs,
is what a step costs there (an H100 ran rdo.py's step at 2.0x the floor's time while this CPU ran it at 1.17x).
This counts them on any machine: Qwen2.5-Coder-0.5B-Instruct's config (or --config) and tokenizer with its
layers and heads as they are but 4-wide heads and random weights (the count does not depend on the width), fp32,
on the 16 examples bench/rdo_step.py wrote. "kernels" leaves out views (view, transpose, slice, expand, ...), which launch nothing.

  python bench/rdo_ops.py [--micro-batch 16] [--config gemma2]
"""
import argparse, collections, json, os, sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import rdo  # noqa: E402
import rdo_step  # noqa: E402
from evalkit import random_model  # noqa: E402

VIEWS = {"view", "_unsafe_view", "t", "transpose", "slice", "expand", "as_strided", "unsqueeze", "squeeze", "select",
         "permute", "alias", "detach", "reshape", "split", "unbind", "split_with_sizes", "narrow", "_reshape_alias"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--config", default=rdo_step.MODEL, help="a folder with another model's config.json, or a "
                   "model type whose transformers defaults to take (gemma2: Gemma-2-2B's shape); its layers and heads are kept")
    args = p.parse_args()
    examples = "runs/bench/rdo_step_examples.json"
    if not (os.path.isdir(rdo_step.MODEL) and os.path.isfile(examples)):
        sys.exit(f"needs {rdo_step.MODEL} (../shared/scripts/get_test_models.py) and {examples} (bench/rdo_step.py)")
    cfg = rdo_step.load_config(args.config)
    cfg.head_dim = 4  # the model's layers and heads, each head 4 wide
    cfg.hidden_size, cfg.intermediate_size = 4 * cfg.num_attention_heads, 8 * cfg.num_attention_heads
    model, tok = random_model(rdo_step.MODEL, "cpu", "float32", cfg)  # Qwen's tokenizer: the examples are its ids
    batch = [tuple(e) for e in json.load(open(examples))]
    r = torch.nn.functional.normalize(torch.randn(C.hidden_size(model)), dim=0)
    rows_with_states = rdo_step.with_clean_states(model, tok, batch, args.micro_batch)[0]  # as rdo.py's loop has them
    steps = {"rdo.py": lambda: rdo.loss_and_grad(model, tok, r.clone().requires_grad_(True), rows_with_states, 12.0,
                                                 rdo_step.LAYER, rdo_step.LAMBDAS, args.micro_batch),
             "floor": lambda: rdo_step.floor_step(model, tok, batch, args.micro_batch)}
    rows = []
    for prefix in (True, False):
        rdo.SHARE_PREFIX = {"cpu"} if prefix else set()
        for name, step in steps.items():
            with Count() as c:
                step()
            total = sum(c.ops.values())
            rows.append((name, prefix, total, total - sum(n for op, n in c.ops.items() if op in VIEWS)))
    print(f"\nops dispatched in one 16-pair RDO step, {cfg.model_type}, {cfg.num_hidden_layers} layers, "
          f"micro-batch {args.micro_batch}")
    print(f"{'variant':8s} {'shared prefix':>13s} {'all ops':>8s} {'kernels':>8s} {'vs floor':>8s}")
    for name, prefix, total, kernels in rows:
        floor = next(k for n, p, _, k in rows if n == "floor" and p == prefix)
        print(f"{name:8s} {'yes' if prefix else 'no':>13s} {total:8d} {kernels:8d} {kernels / floor:7.2f}x")


if __name__ == "__main__":
    main()
