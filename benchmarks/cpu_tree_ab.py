"""CPU A/B of two trees: SmolLM2 single-stream decode, CPU seconds per token (process time, one
torch thread) and wall, alternating arms over rounds (the machine is shared: CPU time is the steadier)."""
import json, os, subprocess, sys, time

def child():
    import torch
    torch.set_num_threads(1)
    from tuili import LLM, SamplingParams
    llm = LLM("smollm2-135m", dtype=os.environ.get("AB_DTYPE", "bfloat16"))
    p = SamplingParams(temperature=0, max_tokens=65, ignore_eos=True)
    prompt = "Write a short story about a lighthouse keeper."
    list(llm.generate([prompt], p))
    best = None
    for _ in range(3):
        c0, w0 = time.process_time(), time.perf_counter()
        out = llm.generate([prompt], p)[0].outputs[0].token_ids
        c, w = time.process_time() - c0, time.perf_counter() - w0
        best = min(best or (c, w), (c, w))
    print("AB " + json.dumps({"cpu_ms_per_tok": best[0] / 65 * 1e3, "wall_ms_per_tok": best[1] / 65 * 1e3, "tokens": list(out)[:16]}), flush=True)

if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(); sys.exit()
    trees = sys.argv[1:]
    res = {t: [] for t in trees}
    for rnd in range(3):
        for t in trees:
            env = {**os.environ, "PYTHONPATH": t, "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, cwd="/tmp")
            line = [l for l in out.stdout.splitlines() if l.startswith("AB ")]
            if not line:
                print(out.stderr[-2000:]); sys.exit(1)
            r = json.loads(line[0][3:]); res[t].append(r)
            print(rnd, t, r["cpu_ms_per_tok"], r["wall_ms_per_tok"], flush=True)
    for t, rows in res.items():
        print(t, "cpu ms/tok best %.3f mean %.3f; wall best %.3f" % (min(r["cpu_ms_per_tok"] for r in rows), sum(r["cpu_ms_per_tok"] for r in rows)/len(rows), min(r["wall_ms_per_tok"] for r in rows)))
    toks = [r["tokens"] for rows in res.values() for r in rows]
    print("tokens agree" if all(t == toks[0] for t in toks) else "tokens DIFFER")
