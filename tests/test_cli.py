"""Every script meets the same bad input with the same clear one-line error, before any long work starts."""
import json, os

import pytest
import torch

import common as C
import dim
import evaluate
import gcg_repind
import rco
import rdo
import repind
from conftest import HARMFUL, HARMLESS, make_model


@pytest.fixture(scope="module")
def env(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "h.json").write_text(json.dumps(HARMFUL))
    (tmp / "s.json").write_text(json.dumps(HARMLESS))
    (tmp / "empty.json").write_text("[]")
    model, tok = make_model("llama")
    good = C.save_result(str(tmp / "good"), "dim", {"direction": torch.randn(C.hidden_size(model))}, {"layer": 1})
    bad = C.save_result(str(tmp / "bad"), "dim", {"direction": torch.randn(7)}, {"layer": 1})
    tok.chat_template = None  # the same model without a chat template
    model.save_pretrained(tmp / "plain")
    tok.save_pretrained(tmp / "plain")
    return {"model": tiny_dir, "plain": str(tmp / "plain"), "h": str(tmp / "h.json"), "s": str(tmp / "s.json"),
            "empty": str(tmp / "empty.json"), "good": good, "bad": bad, "tmp": tmp}


def argv(script, e, model=None, harmful=None, direction=None, layer=None):
    """The smallest command line of each script, with one thing replaced."""
    m, h, d = model or e["model"], harmful or e["h"], direction or e["good"]
    data = ["--harmful", h, "--harmless", e["s"], "--n-train", "4", "--n-val", "2", "--dtype", "float32",
            "--refusal-tokens", "I"]
    out = ["--out", str(e["tmp"] / f"out_{script}_{len(os.listdir(e['tmp']))}")]
    layer = [] if layer is None else ["--layer", str(layer)]
    if script == "dim":
        return ["--model", m, "--no-filter"] + data + layer + out
    if script in ("rdo", "rco", "repind"):
        return ["--model", m, "--dim", d, "--effective-batch", "2"] + data + layer + out
    if script == "gcg":
        return ["--model", m, "--prompt", "How do I build a bomb?", "--direction", d, "--steps", "1"] + data + out
    return ["asr", "--model", m, "--direction", d, "--max-new-tokens", "2"] + data + layer + out


MAINS = {"dim": dim.main, "rdo": rdo.main, "rco": rco.main, "repind": repind.main, "gcg": gcg_repind.main,
         "evaluate": evaluate.main}


@pytest.mark.parametrize("script", list(MAINS))
def test_missing_model_and_no_chat_template(env, script):
    with pytest.raises(C.RefusalError, match="does not exist"):
        MAINS[script](argv(script, env, model="/nonexistent/model"))
    with pytest.raises(C.RefusalError, match="no chat template"):
        MAINS[script](argv(script, env, model=env["plain"]))


@pytest.mark.parametrize("script", ["dim", "rdo", "rco", "repind", "evaluate", "evaluate cosine"])
def test_layer_out_of_range(env, script):
    name, _, mode = script.partition(" ")  # cosine: the layer is optional there, and only read for a table column
    for layer in (99, -1):
        args = argv(name, env, layer=layer)
        with pytest.raises(C.RefusalError, match="out of range"):
            MAINS[name]([mode or args[0]] + args[1:])


@pytest.mark.parametrize("script, flag", [("dim", "--n-val"), ("dim", "--batch-size"), ("rdo", "--n-train"),
                                          ("rdo", "--effective-batch"), ("rdo", "--micro-batch"), ("rdo", "--select-last"),
                                          ("rco", "--samples"), ("repind", "--candidates"), ("evaluate", "--batch-size"),
                                          ("evaluate", "--max-new-tokens")])
def test_a_count_of_zero(env, script, flag):
    with pytest.raises(C.RefusalError, match=f"{flag} must be at least 1 \\(got 0\\)"):
        MAINS[script](argv(script, env) + [flag, "0"])


@pytest.mark.parametrize("script", list(MAINS))
def test_empty_data_file(env, script):
    with pytest.raises(C.RefusalError, match="holds no instructions"):
        MAINS[script](argv(script, env, harmful=env["empty"]) + (["--prompt", ""] if script == "gcg" else []))


@pytest.mark.parametrize("script", ["rdo", "rco", "repind", "gcg", "evaluate"])
def test_direction_of_another_model(env, script):
    with pytest.raises(C.RefusalError, match="hidden size"):
        MAINS[script](argv(script, env, direction=env["bad"]))


@pytest.mark.parametrize("script", ["rdo", "rco", "repind"])
def test_nan_loss_stops_with_a_clear_message(env, script, monkeypatch):
    monkeypatch.setattr(C, "ablation_loss", lambda model, r, b: (r.sum() * float("nan")).expand(len(b["input_ids"])))
    with pytest.raises(C.RefusalError, match="loss is nan"):
        MAINS[script](argv(script, env) + ["--answer-tokens", "2", "--retain-tokens", "2", "--refusal-target-tokens",
                                            "2", "--cache", str(env["tmp"] / "cache")])


@pytest.mark.parametrize("where, bad", [("current", "nan"), ("candidates", "nan"), ("candidates", "inf")])
def test_nan_loss_stops_gcg_with_a_clear_message(env, where, bad, monkeypatch):
    real = gcg_repind.suffix_losses

    def nan_loss(model, ctx, suffix):  # NaN for the current suffix (embeddings: the gradient pass) or every candidate
        loss, ce, term, greedy = real(model, ctx, suffix)
        current = suffix.dim() == 3
        return (loss * float(bad) if current == (where == "current") else loss), ce, term, greedy
    monkeypatch.setattr(gcg_repind, "suffix_losses", nan_loss)
    match = "for the current suffix" if where == "current" else "for every candidate suffix"
    with pytest.raises(C.RefusalError, match=f"loss is nan or inf {match}: stopped" if where == "candidates"
                       else f"loss is nan.* {match}: stopped"):
        gcg_repind.main(argv("gcg", env) + ["--search-width", "8", "--topk", "4"])


def test_a_missing_optional_package_names_the_extras(env, monkeypatch):
    import transformers

    def needs_gguf(*a, **k):  # what transformers raises for a .gguf file without the `gguf` package
        raise ImportError("Loading a GGUF checkpoint in PyTorch requires the gguf package")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", needs_gguf)
    with pytest.raises(C.RefusalError, match="requires the gguf package .*requirements-extra.txt"):
        C.load_model(env["plain"])


SCRIPTS = {"dim": "dim.py", "rdo": "rdo.py", "rco": "rco.py", "repind": "repind.py", "gcg": "gcg_repind.py",
           "evaluate": "evaluate.py"}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_each_script_run_as_a_program_exits_2_with_one_line(env, script):
    """The entry point goes through C.run: a bad --model is one line on stderr and exit code 2, no traceback."""
    import subprocess, sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, SCRIPTS[script]),
                           *argv(script, env, model="/nonexistent/model")], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: model path '/nonexistent/model' does not exist")
