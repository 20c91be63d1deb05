"""The server's front alone: its CPU per streamed token and per request, and a burst's intake.

The front is everything `tuili serve --engine-process true` runs in the server's own process: the
pipe reader (ProcessCore._read, _Rebuilder), AsyncLLM's delivery and RequestStreams, the
completions SSE writer, FastAPI/Starlette and uvicorn. All of it is the real code, serving real
HTTP on a local port. Only the engine side is replaced (`--engine replay`, the default): a process
of its own that answers the real commands from the pipe with real step messages built the way the
engine process builds them (tuili.outputs objects, the real Detokenizer of SmolLM2's tokenizer,
_PipeEvents' wire encoding and sender thread), one token per running request every --step-ms,
so the front's cost does not depend on how fast a model runs. The tokens it "generates" are a
fixed English passage tokenized by the model's tokenizer (each request starting elsewhere in it).
`--engine real` runs the real engine process instead (e.g. `--device cuda --shape llama3-8b`
for a random-weight model of that shape on the GPU machine, or `--model` a folder).

The clients run in another process (raw asyncio HTTP/1.1, cheap), so the front process's CPU
time (getrusage of this process: event loop, reader thread, tokenizer threads) over a run,
divided by the tokens streamed, is the front's CPU per token.

Prints, per concurrency C: front CPU us/token, us/chunk, CPU per request, wall, SSE chunks, and
the us/token of the event loop's thread and of the pipe's reader thread, and the part of the
front's us/token spent in the kernel (sys: socket and pipe syscalls, wake-ups);
then the intake of a burst: the spread from the first to the last of N requests reaching the
engine queue (AsyncLLM._queue), N = --intake (256) prompts of --intake-len (512) token ids.

    python benchmarks/serve_front.py                      # CPU, replayed engine
    python benchmarks/serve_front.py --engine real --device cuda --shape llama3-8b   # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this tree's tuili, unless PYTHONPATH names one (to run this script against another tree)
sys.path.insert(len(sys.path) if os.environ.get("PYTHONPATH") else 0, str(ROOT))

import tuili.engine_process as engine_process  # noqa: E402

PASSAGE = (
    "The river ran wide and slow past the old mill, where the wheel had not turned in forty "
    "years. Children came in summer to fish from the stone ledge, and in winter the ice made a "
    "road that the farmers used to bring their grain to town. Nobody remembered who had built "
    "the mill, only that it had once fed the whole valley, and that the family who kept it had "
    "gone west when the railway came — «a long way», as the old people said, “farther than the "
    "mountains”. Today the roof is gone; swallows nest in the beams, and the water still sings. ")


# ---- the replayed engine (its own process) --------------------------------------------------

def _replay_main(config, conn, log_level: int) -> None:
    """_engine_main's place: the real facts and wire, steps replayed instead of a model run."""
    import pickle

    from tuili.engine.detokenizer import Detokenizer
    from tuili.engine.engine import LLMEngine
    from tuili.engine_core import STOP, Abort, Add, CancelAll, EngineFacts, EngineStats
    from tuili.outputs import CompletionOutput, RequestOutput

    step_s = float(os.environ["SERVE_FRONT_STEP_MS"]) / 1000
    engine = LLMEngine(config)  # the real tokenizer and facts (the model itself is not run)
    tok = engine.tokenizer
    passage = tok.encode(PASSAGE * 8, add_special_tokens=False)
    engine_process._send(conn, ("ready", EngineFacts.of(engine)))
    events = engine_process._PipeEvents(conn)
    running: dict[str, list] = {}  # request id -> [params, prompt ids, detok, tokens, start]
    stop = False
    while not stop:
        t0 = time.monotonic()
        if not running and not conn.poll(1.0):
            continue
        while conn.poll():
            cmd = pickle.loads(conn.recv_bytes())
            if cmd == STOP:
                stop = True
            elif isinstance(cmd, Add):
                start = hash(cmd.request_id) % (len(passage) // 2)
                running[cmd.request_id] = [cmd.params, cmd.prompt_ids,
                                           Detokenizer(tok, cmd.prompt_ids, cmd.params), [], start]
            elif isinstance(cmd, Abort):
                running.pop(cmd.request_id, None)
            elif isinstance(cmd, CancelAll):
                for rid in running:
                    events.on_failed(rid, cmd.error)
                running.clear()
        outs = []
        for rid, (params, prompt, detok, tokens, start) in list(running.items()):
            token = passage[(start + len(tokens)) % len(passage)]
            tokens.append(token)
            detok.add(token, check_stop=False)
            done = len(tokens) >= params.max_tokens
            outs.append(RequestOutput(rid, None, prompt, [CompletionOutput(
                index=0, text=detok.text, token_ids=list(tokens),
                finish_reason="length" if done else None,
                delta_text=detok.take_delta(done), delta_token_ids=[token])], done))
            if done:
                del running[rid]
        if outs:
            events.on_outputs(outs, time.monotonic())
            events.on_stats(EngineStats(num_running=len(running)))
        time.sleep(max(0.0, step_s - (time.monotonic() - t0)))
    events.close()


# ---- the clients (their own process) --------------------------------------------------------

async def _one(port: int, body: bytes) -> tuple[int, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    chunks = 0
    tail = b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        chunks += (tail + data).count(b"data: ")
        tail = data[-8:]
        if b"data: [DONE]" in tail + data[-32:]:
            break
    writer.close()
    return chunks, time.monotonic()


def _clients(port: int, concurrency: int, prompt, max_tokens: int, result) -> None:
    async def run():
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                           "stream": True, "temperature": 0,
                           "ignore_eos": True}).encode()
        return await asyncio.gather(*(_one(port, body) for _ in range(concurrency)))

    start = time.monotonic()
    got = asyncio.run(run())
    result.put((sum(c for c, _ in got), time.monotonic() - start))


# ---- the front (this process) ---------------------------------------------------------------

def _cpu() -> tuple[float, float]:
    """(user + system, system) CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, by name (tokenizer workers summed)."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            s = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (OSError, TypeError):
            continue
        name = "tuili-tokenize" if t.name.startswith("tuili-tokenize") else t.name
        out[name] = out.get(name, 0.0) + s
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=["replay", "real"], default="replay")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", help="with --device cuda: a random-weight model of this shape")
    p.add_argument("--concurrency", default="1,32,128,256")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=10.0, help="the replayed engine's step time")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--intake", type=int, default=256)
    p.add_argument("--intake-len", type=int, default=512)
    p.add_argument("--profile", help="write a cProfile of the front's event loop thread here")
    p.add_argument("--json")
    args = p.parse_args()
    os.environ["SERVE_FRONT_STEP_MS"] = str(args.step_ms)
    if args.engine == "replay":
        engine_process._engine_main = _replay_main  # spawned by reference: __mp_main__
    model = args.model
    if args.shape:
        import tempfile

        from tests.gpu.random_models import build, word_tokenizer
        tmp = tempfile.mkdtemp()
        hf = build(args.shape, Path(tmp))
        word_tokenizer(hf.config.vocab_size).save(str(Path(tmp) / "tokenizer.json"))
        del hf
        model = tmp
    import uvicorn

    from tuili.async_llm import AsyncLLM
    from tuili.server.app import build_app
    from tuili.server.serving import ServerState

    options = {"device": args.device, "engine_process": True}
    if args.device.startswith("cuda"):
        options["dtype"] = "bfloat16"
    llm = AsyncLLM(model, **options)
    stamps: list[float] = []
    loops: list[asyncio.AbstractEventLoop] = []  # the server's (for the profiler)
    queue = llm._queue

    def stamped(*a, **kw):
        stamps.append(time.monotonic())
        loops[:] = [asyncio.get_running_loop()]
        return queue(*a, **kw)

    llm._queue = stamped
    state = ServerState(llm, "m", max_waiting=100000)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port,
                                           access_log=False, log_level="warning"))
    loop_thread = threading.Thread(target=server.run, name="event-loop", daemon=True)
    loop_thread.start()
    while not server.started:
        time.sleep(0.05)
    ctx = multiprocessing.get_context("spawn")

    def run(concurrency: int, prompt, max_tokens: int) -> dict:
        result = ctx.Queue()
        proc = ctx.Process(target=_clients, args=(port, concurrency, prompt, max_tokens, result))
        stamps.clear()
        proc.start()
        while not stamps:  # the clients' start-up is not the front's work
            time.sleep(0.001)
        cpu0, threads0 = _cpu(), _thread_cpu()
        chunks, wall = result.get()
        (cpu1, sys1), threads1 = _cpu(), _thread_cpu()
        cpu, sys_s = cpu1 - cpu0[0], sys1 - cpu0[1]
        proc.join()
        tokens = concurrency * max_tokens
        by_thread = {k: (v - threads0.get(k, 0.0)) / tokens * 1e6 for k, v in threads1.items()}
        return {"concurrency": concurrency, "tokens": tokens, "chunks": chunks - concurrency,
                "cpu_s": cpu, "sys_us_per_token": sys_s / tokens * 1e6, "wall_s": wall, "us_per_token": cpu / tokens * 1e6,
                "ms_per_request": cpu / concurrency * 1e3,
                "intake_ms": (stamps[-1] - stamps[0]) * 1e3 if len(stamps) > 1 else 0.0,
                "loop_us_per_token": by_thread.get(loop_thread.name, 0.0),
                "reader_us_per_token": by_thread.get("tuili-engine-reader", 0.0)}

    run(4, "Hello", 4)  # warm-up: imports, first-call caches
    profiler = None
    if args.profile:  # the event loop's thread only (cProfile follows the thread enabling it)
        import cProfile

        profiler = cProfile.Profile(time.thread_time)  # CPU time: no GIL waits counted
        asyncio.run_coroutine_threadsafe(_switch(profiler.enable), loops[0]).result()
    results = []
    print(f"front CPU ({args.engine} engine, step {args.step_ms:g} ms, {args.max_tokens} tokens "
          f"a request, prompt 'Hello'; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")
    print(f"{'streams':>8} {'us/token':>9} {'us/chunk':>9} {'ms/req':>7} {'wall s':>7} "
          f"{'chunks':>7} {'loop':>6} {'reader':>6} {'sys':>6}")
    for _ in range(args.rounds):
        for c in map(int, args.concurrency.split(",")):
            r = run(c, "Hello", args.max_tokens)
            r["us_per_chunk"] = r["cpu_s"] / max(r["chunks"], 1) * 1e6
            results.append(r)
            print(f"{c:>8} {r['us_per_token']:>9.1f} {r['us_per_chunk']:>9.1f} "
                  f"{r['ms_per_request']:>7.2f} {r['wall_s']:>7.2f} {r['chunks']:>7} "
                  f"{r['loop_us_per_token']:>6.1f} {r['reader_us_per_token']:>6.1f} "
                  f"{r['sys_us_per_token']:>6.1f}", flush=True)
    intake = []
    if args.intake:
        for _ in range(args.rounds):
            ids = [(17 * i) % 1000 + 10 for i in range(args.intake_len)]
            r = run(args.intake, ids, 2)
            intake.append(r)
            print(f"intake: {args.intake} requests x {args.intake_len} token ids reached the "
                  f"engine queue over {r['intake_ms']:.0f} ms (front CPU {r['cpu_s'] * 1e3:.0f} "
                  f"ms, {r['ms_per_request']:.2f} ms/request)", flush=True)
    if profiler is not None:
        asyncio.run_coroutine_threadsafe(_switch(profiler.disable), loops[0]).result()
        profiler.dump_stats(args.profile)
    server.should_exit = True
    loop_thread.join(10)
    llm.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps({"streams": results, "intake": intake}, indent=2))


async def _switch(fn) -> None:
    fn()


if __name__ == "__main__":
    main()
