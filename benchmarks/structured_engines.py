"""Why lmforge constrains decoding with llguidance: it against outlines-core on SmolLM2's vocabulary,
the same JSON Schema, grammar compile time and per-token mask time (medians), one JSON line.

    python benchmarks/structured_engines.py      # needs: pip install outlines-core (skipped without it)

Measured here (2 cores, busy machine, 1 thread): llguidance compiles the schema in 1.4 ms and masks a
token in 0.19 ms; outlines-core needs 0.70 s to build its index and 0.08 ms a token. A server gets
a new schema with most requests, so compile time dominates; llguidance also takes Lark grammars.
"""
import importlib.util
import sys
import time, json, statistics, torch

if importlib.util.find_spec("outlines_core") is None:
    print(json.dumps({"skipped": "outlines-core is not installed: pip install outlines-core"}))
    sys.exit(0)
torch.set_num_threads(1)
from lmforge.tokenizer import load_tokenizer, _bytes_to_unicode
from lmforge.engine.constraints import compile_grammar, Constraint, mask_logits, _compile
tok = load_tokenizer()
V = tok.vocab_size
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
          "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}, "ok": {"type": "boolean"}},
          "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
TEXT = '{"name":"Ada Lovelace","age":36,"tags":["a","c"],"ok":true}'
ids = tok.encode(TEXT, add_special_tokens=False)
# llguidance
Constraint(compile_grammar(regex="a"), tok)  # tokenizer conversion, once
t = time.perf_counter(); _compile.cache_clear(); g = compile_grammar(json_schema=SCHEMA); c = Constraint(g, tok); llg_compile = time.perf_counter() - t
times = []
for i in ids:
    logits = torch.zeros(1, V)
    t = time.perf_counter(); mask_logits(logits, [c]); times.append(time.perf_counter() - t)
    c.advance(i)
llg_mask = statistics.median(times)
# outlines-core
from outlines_core import Index, Vocabulary, Guide
from outlines_core.json_schema import build_regex_from_schema
inv = {v: k for k, v in _bytes_to_unicode().items()}
vocab = {}
eos = sorted(tok.eos_ids)[0]
for i in range(V):
    if i in tok.eos_ids: continue
    s = tok.id_to_token(i)
    try: b = bytes(inv[ch] for ch in s)
    except KeyError: continue  # special tokens
    vocab.setdefault(b, []).append(i)
t = time.perf_counter(); voc = Vocabulary(eos, vocab); oc_vocab = time.perf_counter() - t
t = time.perf_counter(); idx = Index(build_regex_from_schema(json.dumps(SCHEMA)), voc); oc_compile = time.perf_counter() - t
guide = Guide(idx)
mask = torch.zeros((V + 31) // 32, dtype=torch.int32)
times = []
from lmforge.engine.constraints import unpack_bitmask
for i in ids:
    logits = torch.zeros(1, V)
    t = time.perf_counter()
    guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
    logits.masked_fill_(~unpack_bitmask(mask[None], V), float("-inf"))
    times.append(time.perf_counter() - t)
    guide.advance(i)
oc_mask = statistics.median(times)
print(json.dumps({"schema_tokens": len(ids), "llguidance": {"compile_s": round(llg_compile, 4), "mask_ms": round(llg_mask * 1e3, 3)},
                  "outlines_core": {"vocab_s": round(oc_vocab, 3), "compile_s": round(oc_compile, 3), "mask_ms": round(oc_mask * 1e3, 3)}}))
