"""Shared fixtures: tiny randomly initialised models built from configs, so core tests run in seconds."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dylora.app import registry

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, not two threads fighting per core
    torch.set_num_threads(1)

# the files that run for a minute or more (multi-process runs, real models), in `make test`'s measured order: handed
# out first, so `--dist loadfile` does not leave one of them to run alone at the end while the other worker idles
LONGEST_FIRST = ("test_distributed.py", "test_quantized.py", "test_cli.py", "test_hostile.py", "test_qlora_bench.py",
                 "test_generation.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


def tiny_bert(num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, num_labels=num_labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def randomise_lora(model, seed: int = 1, std: float = 0.3) -> None:
    """Give every LoRA weight random values (B starts at zero, which would hide rank effects)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def ids():
    return torch.randint(0, 120, (3, 9), generator=torch.Generator().manual_seed(0))


def _normal(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()


class LocalIndex:
    """A simple index served over HTTP from memory: PEP 691 JSON or PEP 503 HTML project pages."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.gets: list[str] = []
        routes, gets = self.routes, self.gets

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                gets.append(self.path)
                if self.path not in routes:
                    self.send_error(404)
                    return
                ctype, body = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, project: str, filename: str, data: bytes, *, html_page: bool = False,
                pin: str | None = None) -> registry.Artifact:
        """Serve `data` as `filename` of `project` (linked relatively, with a #sha256 fragment); return its
        Artifact, pinned to `pin` or to the sha256 of `data`."""
        digest = hashlib.sha256(data).hexdigest()
        self.routes[f"/files/{project}/{filename}"] = ("application/octet-stream", data)
        href = f"../../files/{project}/{filename}#sha256={digest}"
        if html_page:
            page = f'<html><body><a href="{html.escape(href)}">{html.escape(filename)}</a><br></body></html>'
            self.routes[f"/simple/{_normal(project)}/"] = ("text/html", page.encode())
        else:
            files = [{"filename": filename, "url": href, "hashes": {"sha256": digest}}]
            body = json.dumps({"meta": {"api-version": "1.0"}, "name": project, "files": files}).encode()
            self.routes[f"/simple/{_normal(project)}/"] = (registry.JSON_PAGE, body)
        return registry.Artifact(project, filename, pin or digest)


@pytest.fixture
def local_index(monkeypatch: pytest.MonkeyPatch):
    """A LocalIndex that $DYLORA_INDEX_URL points at for the test."""
    index = LocalIndex()
    monkeypatch.setenv(registry.INDEX_ENV, index.url)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    yield index
    index.server.shutdown()
    index.server.server_close()
