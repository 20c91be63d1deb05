"""The `tuili analyze` command: its flags and what it runs."""

from __future__ import annotations

import argparse

from tuili.options import positive

ANALYZE_DTYPES = ("bf16", "fp16", "fp8", "int8", "int4", "fp32", "q8_0", "q4_0", "q4_1", "q4_k",
                  "q5_k", "q6_k")


def add_analyze_parser(sub) -> None:
    p = sub.add_parser("analyze", help="roofline analysis of a model on a device (no weights needed)")
    p.add_argument("--model", default="smollm2-135m",
                   help="alias, GGUF file, HF folder, hub id, config.json, or a built-in shape "
                        "(llama-2-7b, llama-2-13b, llama-2-70b, llama-3.1-8b, llama-3.1-70b, "
                        "qwen3-0.6b, smollm2-135m, qwen3-30b-a3b, mixtral-8x7b, gemma-3-270m, "
                        "gemma-3-27b)")
    p.add_argument("--revision", default=None, help="hub revision, for a hub id")
    p.add_argument("--device", default="h100",
                   help="h100, h200, a100, rtx4090, l4, cpu, or measure (measure this machine)")
    p.add_argument("--dtype", default="bf16", choices=ANALYZE_DTYPES,
                   help="weight format (quantized formats keep a 16-bit LM head and activations; "
                        "q8_0 ... q6_k: GGUF blocks as the GPU reads them)")
    p.add_argument("--kv-dtype", default=None, choices=("bf16", "fp16", "fp8", "fp32"),
                   help="K/V cache format (default: fp8 with --dtype fp8, else 16-bit)")
    p.add_argument("--batch", type=positive, default=1, help="sequences per step")
    p.add_argument("--prompt", type=int, default=512, help="prompt length in tokens")
    p.add_argument("--context", type=positive, default=None,
                   help="context length of the decode step analysed (default: prompt + 1)")
    p.add_argument("--output", default=None, help="write the analysis: .json, .csv or .md")
    p.add_argument("--plot", default=None,
                   help="write the roofline PNG here, and NAME-batch.png, NAME-phases.png beside it")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> None:
    from tuili.analysis.measure import get_device
    from tuili.analysis.ops import Precision
    from tuili.analysis.report import analyze, format_report, write_output
    from tuili.analysis.shapes import model_config

    config, source = model_config(args.model, args.revision)
    device = get_device(args.device)
    result = analyze(config, device, Precision.for_dtype(args.dtype, args.kv_dtype), args.batch,
                     args.prompt, args.context, model_name=args.model, source=source)
    print(format_report(result))
    if args.output:
        print(f"wrote {write_output(result, args.output)}")
    if args.plot:
        from tuili.analysis.plots import plot_all

        for path in plot_all(result, args.plot):
            print(f"wrote {path}")
