"""The packed model against the dequantized one on the whole test split: same answers, speed.

For each model: quantize it with the default method (3 bits), load the result twice (dense:
``gobo.load(dir)``, weights dequantized to float32; packed: ``gobo.load(dir, packed=True)``,
weights kept as codes and multiplied by the fused kernel), encode every test text with both,
in turns, and report the largest difference of the sentence embeddings and of the last hidden states
(on the first batches; over every position and over the real tokens alone, as the padding
positions' states, which nothing reads, amplify float32 rounding most), the fraction of identical frozen-probe predictions, and the encoding
time of each (speed as a ratio, measured in the same run). Prints a table, writes JSON.

    .venv/bin/python bench/bench_packed.py --models minilm-l6 mpnet-base
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from _models import set_omp_wait_policy  # noqa: E402  (before torch loads)

set_omp_wait_policy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "mpnet-base"])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="test texts, spread over the split (default: all)")
    ap.add_argument("--hidden-batches", type=int, default=4, help="batches of 32 texts compared on the last hidden state")
    ap.add_argument("--chunk", type=int, default=256, help="texts per turn (dense and packed alternate)")
    ap.add_argument("--out", default="bench/results/packed.json")
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoTokenizer

    import gobo
    from gobo import kernels
    from _models import installed
    from gobo.evaluate import encode, prepare_benchmark
    from gobo.hf import load_source, weights_sha256

    rows = []
    for name, path in installed(args.models):
        tok = AutoTokenizer.from_pretrained(str(path))
        bench = prepare_benchmark(load_source(path), tok, source_sha=weights_sha256(path))
        texts = list(bench.test_texts)
        if args.limit:
            texts = texts[:: max(1, len(texts) // args.limit)][: args.limit]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "q"
            gobo.save(gobo.quantize(str(path), bits=args.bits), out)
            dense, packed = gobo.load(out), gobo.load(out, packed=True)
            # the two take turns on chunks of texts, so that a machine that speeds up or slows
            # down during the run does not favour one of them
            times = {"dense": 0.0, "packed": 0.0}
            parts: dict = {"dense": [], "packed": []}
            for start in range(0, len(texts), args.chunk):
                chunk = texts[start : start + args.chunk]
                for label, model in (("dense", dense), ("packed", packed)):
                    t = time.perf_counter()
                    parts[label].append(encode(model, tok, chunk, batch_size=32))
                    times[label] += time.perf_counter() - t
            embs = {label: np.concatenate(v) for label, v in parts.items()}
            hidden_diff = hidden_diff_tokens = 0.0
            with torch.inference_mode():
                for b in range(args.hidden_batches):
                    chunk = texts[b * 32 : (b + 1) * 32]
                    if not chunk:
                        break
                    enc = tok(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
                    d = (packed(**enc).last_hidden_state - dense(**enc).last_hidden_state).abs()
                    hidden_diff = max(hidden_diff, d.max().item())
                    hidden_diff_tokens = max(hidden_diff_tokens, d[enc["attention_mask"].bool()].max().item())
        pd, pp = bench.probe.predict(embs["dense"]), bench.probe.predict(embs["packed"])
        row = {
            "model": name,
            "bits": args.bits,
            "texts": len(texts),
            "threads": torch.get_num_threads(),
            "fused_kernel": kernels.simd_enabled(),
            "gemm_isa": kernels.gemm_isa(),
            "max_abs_diff_embedding": float(np.abs(embs["packed"] - embs["dense"]).max()),
            "max_abs_diff_hidden": hidden_diff,
            "max_abs_diff_hidden_real_tokens": hidden_diff_tokens,
            "identical_predictions": float(np.mean(pd == pp)),
            "encode_seconds_dense": times["dense"],
            "encode_seconds_packed": times["packed"],
            "speed_packed_vs_dense": times["dense"] / times["packed"],
        }
        rows.append(row)
        print(
            f"{name}: {row['texts']} texts, identical predictions {100 * row['identical_predictions']:.2f}%, "
            f"max |diff| embedding {row['max_abs_diff_embedding']:.2e}, hidden {row['max_abs_diff_hidden']:.2e} "
            f"({row['max_abs_diff_hidden_real_tokens']:.2e} on real tokens); "
            f"encode dense {times['dense']:.1f} s, packed {times['packed']:.1f} s ({row['speed_packed_vs_dense']:.2f}x)",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
