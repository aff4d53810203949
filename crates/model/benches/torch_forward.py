"""The PyTorch side of `cargo xtask bench forward` (xtask/src/bench_forward.rs runs it; see docs/benchmarks.md).

Usage: python torch_forward.py MODEL_DIR PROMPTS_JSON OUT_JSON THREADS

Tokenizes 128 chat prompts (harmless_val[:128] of the paper's splits, the model's chat template, generation
prompt added), writes their ids to OUT_JSON for the Rust side, and times on the CPU in float32 with THREADS
threads:
- prompt processing: `model(**batch)` on 4 left-padded batches of 32 (all-position logits, as a plain
  forward returns them); tokens/s counts real (unpadded) tokens;
- generation: `model.generate` on the first 32 prompts in one left-padded batch, greedy, exactly 64 new
  tokens each (min_new_tokens = max_new_tokens = 64, so no row stops early);
- the f32 matmul peak: `torch.matmul` of two 2048 x 2048 matrices.
Each timing is the best of `REPEATS` runs after one warm-up run.
"""

import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPEATS = 2


def best(fn, repeats=REPEATS):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    model_dir, prompts_json, out, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()

    instructions = [x["instruction"] for x in json.load(open(prompts_json))][:128]
    ids = [
        list(tok.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True, tokenize=True))
        for s in instructions
    ]
    batches = [tok.pad({"input_ids": ids[i : i + 32]}, return_tensors="pt") for i in range(0, 128, 32)]
    real = sum(len(x) for x in ids)
    padded = sum(b["input_ids"].numel() for b in batches)

    @torch.no_grad()
    def prompts():
        for b in batches:
            model(**b)

    prompt_s = best(prompts)

    gen_batch = tok.pad({"input_ids": ids[:32]}, return_tensors="pt")

    @torch.no_grad()
    def generate():
        out = model.generate(
            **gen_batch, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id
        )
        assert out.shape[1] == gen_batch["input_ids"].shape[1] + 64

    gen_s = best(generate)

    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    mm_s = best(lambda: torch.matmul(a, b), repeats=5)

    json.dump(
        {
            "prompts": ids,
            "torch": {
                "threads": threads,
                "prompt_seconds": prompt_s,
                "prompt_tokens": real,
                "padded_tokens": padded,
                "generate_seconds": gen_s,
                "generate_new_tokens": 32 * 64,
                "matmul_2048_gflops": 2 * 2048**3 / mm_s / 1e9,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        },
        open(out, "w"),
    )


if __name__ == "__main__":
    main()
