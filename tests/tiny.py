"""Tiny random models for fast tests (hidden size 32, 2 layers), written like a real model directory."""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from dylora.app import zoo
from dylora.app.zoo import ModelError

TINY_KINDS = ("bert", "gpt2", "llama")


def make_tiny_model(kind: str, path: str | Path, *, num_labels: int = 2, seed: int = 0, hidden_size: int = 32) -> Path:
    """Write a tiny random model of `kind` ("bert", "gpt2", "llama") plus the MiniLM wordpiece tokenizer.

    The checkpoint is a *ForSequenceClassification model (so the classification head is saved and
    deterministic); gpt2/llama tie their LM head to the embeddings, so AutoModelForCausalLM loads the
    same directory too. Hidden size 32 (64 for a 4-bit base: bitsandbytes' CPU kernel needs rows of at least
    its block size, 64), 2 layers: fast enough for unit and CLI tests.
    """
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        GPT2Config,
        LlamaConfig,
    )

    if kind not in TINY_KINDS:
        raise ModelError(f"unknown tiny model kind {kind!r}; use one of {', '.join(TINY_KINDS)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve_model("minilm"))
    max_len = 128
    tokenizer.model_max_length = max_len
    vocab = len(tokenizer)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.cls_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    if kind == "bert":
        config: Any = BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=max_len,
            **ids,
        )
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=max_len, **ids)
        config.tie_word_embeddings = True
    else:
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden_size,
            max_position_embeddings=max_len,
            tie_word_embeddings=True,
            **ids,
        )
    config.num_labels = num_labels
    if kind != "bert":
        # Decoder models need an eos token on the tokenizer for generation and for load_tokenizer.
        tokenizer.bos_token = tokenizer.cls_token
        tokenizer.eos_token = tokenizer.sep_token
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def run_cli(*args: Any, check: bool = True) -> Any:
    """Run `dylora ARGS` in this process (the entry point's `main`), stdout and stderr captured; returns an object
    with `returncode`, `stdout` and `stderr`, like `subprocess.run`."""
    import contextlib
    import io
    from types import SimpleNamespace

    from dylora.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    proc = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def refused(args: list[str], capsys: Any, code: int = 2, needle: str = "") -> str:
    """Run the CLI; check the exit code, one line on stderr naming `needle`, and no traceback."""
    from dylora.app.cli import main

    capsys.readouterr()
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle.lower() in err.lower(), err
    return err


# the loop every `ask` process runs around its script's `handle(*request)`: a JSON request a line, "ok" or the
# traceback back, and a check that the process never imported dylora (what makes it vanilla PEFT)
_SERVE = textwrap.dedent("""
    import json, sys, traceback
    for line in sys.stdin:
        try:
            handle(*json.loads(line))
            assert "dylora" not in sys.modules
            print(json.dumps("ok"), flush=True)
        except Exception:
            print(json.dumps(traceback.format_exc()), flush=True)
""")
_PROCESSES: dict[str, subprocess.Popen] = {}


def ask(script: str, *request: Any) -> None:
    """Run `handle(*request)` of `script` in a Python process of its own that never imports dylora: one process a
    script and test worker, started on first use (a process a call cost ~15 s of imports). A failure there fails
    here with its traceback."""
    proc = _PROCESSES.get(script)
    if proc is None or proc.poll() is not None:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script) + _SERVE], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        atexit.register(proc.kill)
        _PROCESSES[script] = proc
    proc.stdin.write(json.dumps(request) + "\n")
    proc.stdin.flush()
    answer = json.loads(proc.stdout.readline() or json.dumps("the process died"))
    assert answer == "ok", answer[-3000:]
