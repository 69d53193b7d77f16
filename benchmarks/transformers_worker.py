"""A benchmark child for Hugging Face transformers (torch, fp32), speaking tinyllm.bench's line protocol,
so `benchmarks/compare.py` measures it in the same run, the same way, as tinyllm's schedules:
the same prompt (tinyllm.bench.bench_prompt, tokenized by the model's tokenizer), greedy decoding
with a KV cache, EOS ignored, warm-up first, memory as RSS after loading minus RSS after imports.
"""
import argparse
import json
import sys
import time

from tinyllm.bench import bench_prompt, peak_rss_mib, rss_mib


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer
    from transformers import DynamicCache, LlamaForCausalLM

    rss_imports = rss_mib()
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    prompt = bench_prompt(lambda text: tok.encode(text, add_special_tokens=False).ids, args.prompt_tokens)

    @torch.inference_mode()
    def one_run(n_new):
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            out = model(token.view(1, 1), past_key_values=cache, use_cache=True)
            token = out.logits[0, -1].argmax()
        t2 = time.perf_counter()
        return {"prefill_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": (n_new - 1) / (t2 - t1), "ttft_s": t1 - t0}

    one_run(8)  # warm-up
    send({"ready": True, "load_s": load_s, "weights_rss_mib": rss_mib() - rss_imports})
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "run":
            send(one_run(args.new_tokens))
        elif cmd == "stats":
            send({"peak_rss_mib": peak_rss_mib()})
        elif cmd == "quit":
            return


if __name__ == "__main__":
    main()
