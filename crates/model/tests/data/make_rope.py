"""Reference rotary embeddings from transformers 4.57.1 for every `rope_scaling` type the runtime supports,
read by `crates/model/src/rope.rs`'s tests (`cargo test` never runs Python).

Usage (from the workspace root):
    /work/pyenv/venv/bin/python crates/model/tests/data/make_rope.py crates/model/tests/data/rope.json

Each case builds a LlamaConfig (Phi3Config for partial rotary) with the given fields, runs the model's
rotary embedding on positions 0..seq_len-1 (so dynamic and longrope see seq_len), and stores cos and sin
(float32, both halves) at a few positions, plus inv_freq and the attention factor.
"""

import json
import sys

import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

CASES = [
    ("default", {"rope_theta": 10000.0, "head_dim": 64}, 64),
    ("linear", {"rope_theta": 10000.0, "head_dim": 64, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, 64),
    ("dynamic_short", {"rope_theta": 10000.0, "head_dim": 64, "max_position_embeddings": 512,
                       "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 100),
    ("dynamic_long", {"rope_theta": 10000.0, "head_dim": 64, "max_position_embeddings": 512,
                      "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 1024),
    ("llama3", {"rope_theta": 500000.0, "head_dim": 128, "max_position_embeddings": 131072,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, 2048),
    ("yarn", {"rope_theta": 10000.0, "head_dim": 64, "max_position_embeddings": 2048,
              "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}}, 300),
    ("yarn_mscale", {"rope_theta": 10000.0, "head_dim": 64, "max_position_embeddings": 2048,
                     "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                      "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16.0, "truncate": False}},
     300),
]
LONGROPE = {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(16)],
            "long_factor": [1.0 + 0.3 * i for i in range(16)]}
PHI = [
    ("longrope_short", {"rope_theta": 10000.0, "hidden_size": 256, "num_attention_heads": 8,
                        "max_position_embeddings": 2048, "original_max_position_embeddings": 512,
                        "rope_scaling": LONGROPE}, 300),
    ("longrope_long", {"rope_theta": 10000.0, "hidden_size": 256, "num_attention_heads": 8,
                       "max_position_embeddings": 2048, "original_max_position_embeddings": 512,
                       "rope_scaling": LONGROPE}, 1000),
    ("partial", {"rope_theta": 10000.0, "hidden_size": 256, "num_attention_heads": 4,
                 "partial_rotary_factor": 0.5}, 40),
]
POSITIONS = [0, 1, 7, 39, 99, 299, 999, 1023, 2047]


def run(name, cls, emb_cls, fields, seq_len):
    config = cls(hidden_size=fields.pop("hidden_size", 512), num_attention_heads=fields.pop("num_attention_heads", 8),
                 **fields)
    emb = emb_cls(config)
    x = torch.zeros(1, dtype=torch.float32)
    pos = torch.arange(seq_len)[None, :]
    cos, sin = emb(x, pos)
    keep = [p for p in POSITIONS if p < seq_len]
    return {
        "name": name,
        "config": {k: v for k, v in config.to_dict().items()
                   if k in ("rope_theta", "head_dim", "hidden_size", "num_attention_heads", "max_position_embeddings",
                            "original_max_position_embeddings", "rope_scaling", "partial_rotary_factor")},
        "seq_len": seq_len,
        "inv_freq": [float(v) for v in emb.inv_freq],
        "attention_scaling": float(emb.attention_scaling),
        "positions": keep,
        "cos": [[float(v) for v in cos[0, p]] for p in keep],
        "sin": [[float(v) for v in sin[0, p]] for p in keep],
    }


def main():
    out = [run(n, LlamaConfig, LlamaRotaryEmbedding, dict(f), s) for n, f, s in CASES]
    out += [run(n, Phi3Config, Phi3RotaryEmbedding, dict(f), s) for n, f, s in PHI]
    with open(sys.argv[1], "w") as f:
        json.dump({"transformers": __import__("transformers").__version__, "cases": out}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
