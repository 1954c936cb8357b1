"""Quantization time against encoding time, measured in one run on the same machine.

The target: quantizing a model takes less time than encoding 256 test sentences with it.
Prints a table and writes JSON (speed as a ratio against the encoding baseline, each the
best of ``--repeat`` runs taken by turns with the others, every run's time kept). For the
methods that run the model over sentences (error feedback, gobo-grid's gains) the fastest
run's passes over them are timed inside the call too ("passes"): the part of the time that
no work on the weights can take back.

    .venv/bin/python bench/bench_quantize.py --models minilm-l6 mpnet-base
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "mpnet-base"])
    ap.add_argument("--methods", nargs="+", default=["gobo", "gobo-paper", "directq", "gobo-rows-act", "gobo-rows-act-fb",
                                                        "gobo-rows-act-fb-mixed", "gobo-rows-act-fb-mixed-grouped",
                                                        "gobo-rows-act-fb-mixed-fast", "gobo-grid", "gobo-grid-fast"],
                    help="method names (gobo-grid, gobo-grid-fast: entropy-coded grids, timed as a whole gobo.quantize call), or gobo-rows-act: per-row codebooks and activation-weighted outliers "
                         "(the timing includes the forward pass over the synthetic sentences it measures), or "
                         "gobo-rows-act-fb: the same with error feedback on those sentences (timed as a whole "
                         "gobo.quantize call, loading the model from disk included), or gobo-rows-act-fb-mixed: "
                         "that with the feed-forward input matrices at 4 bits, in a compact file, or "
                         "gobo-rows-act-fb-mixed-grouped: that with inputs wider than 768 features fed back in groups "
                         "of 768 (feedback_group=768: four on BERT-base-size models, two on MiniLM), or "
                         "gobo-rows-act-fb-mixed-fast: that with the feed-forward output matrices (3072-wide inputs "
                         "in BERT-base-size models) left out of the feedback")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2, help="best of N for each timing, the N runs by turns")
    ap.add_argument("--out", default="bench/results/quantize.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from _models import installed

    import gobo
    from gobo.config import GoboConfig, method_config
    from gobo.feedback import fast_dtype, input_energy
    from gobo.data import load_rotten_tomatoes
    from gobo.evaluate import encode
    from gobo.hf import load_source, quantizable_names, state_numpy
    from gobo.quantizer import quantize_state

    def config_of(method: str):
        if method == "gobo-rows-act":
            return GoboConfig(bits=3, codebook="row", allocate="uniform", act_outliers=0.006)
        if method == "gobo-rows-act-fb":
            return GoboConfig(bits=3, codebook="row", allocate="uniform", act_outliers=0.006, feedback="synthetic",
                              feedback_texts=64, feedback_damp=1.0)
        if method == "gobo-rows-act-fb-mixed":
            return GoboConfig(bits=3, codebook="row", allocate="uniform", act_outliers=0.006, feedback="synthetic",
                              feedback_texts=64, feedback_damp=1.0, bits_for=(("*intermediate.dense*", 4),), compact=True)
        if method == "gobo-rows-act-fb-mixed-grouped":
            return dataclasses.replace(config_of("gobo-rows-act-fb-mixed"), feedback_group=768)
        if method == "gobo-rows-act-fb-mixed-fast":
            return dataclasses.replace(config_of("gobo-rows-act-fb-mixed"), feedback_exclude=("*[0-9].output.dense*",))
        return method_config(method, 3)

    @contextlib.contextmanager
    def passes_timed(spent: list):
        """Adds to ``spent`` the seconds that gobo.quantize spends in passes over sentences
        (the gains' forward and backward passes, the feedback's moments), timed inside the call."""
        import gobo.calibrate as calibrate
        import gobo.feedback as feedback

        init, moments = calibrate.JacobianSensitivity.__init__, feedback.input_moments

        def timed(f):
            @functools.wraps(f)
            def run(*a, **k):
                t = time.perf_counter()
                try:
                    return f(*a, **k)
                finally:
                    spent.append(time.perf_counter() - t)
            return run

        calibrate.JacobianSensitivity.__init__, feedback.input_moments = timed(init), timed(moments)
        try:
            yield
        finally:
            calibrate.JacobianSensitivity.__init__, feedback.input_moments = init, moments

    _, test = load_rotten_tomatoes()
    texts = list(test.texts[: args.sentences])
    results = []
    for name, path in installed(args.models):
        model = load_source(path)
        tok = AutoTokenizer.from_pretrained(str(path))
        state = state_numpy(model)
        names = quantizable_names(model)
        enc: list = []
        runs = {m: ([], []) for m in args.methods}  # each method's times and passes, run by run
        # by turns (the encoding, then every method, again): a machine that speeds up or slows
        # down during the benchmark moves the baseline and the methods alike
        for _ in range(args.repeat):
            t = time.perf_counter()
            encode(model, tok, texts, batch_size=32)
            enc.append(time.perf_counter() - t)
            for method in args.methods:
                cfg = config_of(method)
                spent: list = []
                t = time.perf_counter()
                if getattr(cfg, "feedback", None):
                    with passes_timed(spent):
                        gobo.quantize(name, cfg)
                else:
                    energy = input_energy(model, tok, names, cfg.act_texts, punctuation=getattr(cfg, "synthetic", "") == "punct",
                                          seed=getattr(cfg, "synthetic_seed", 0),
                                          dtype=getattr(cfg, "calibration_dtype", "float32")) if getattr(cfg, "act_outliers", 0) else None
                    quantize_state(state, names, cfg, input_energy=energy)
                runs[method][0].append(time.perf_counter() - t)
                runs[method][1].append(sum(spent))
        row = {"model": name, "threads": torch.get_num_threads(), "encode_seconds": min(enc), "sentences": len(texts),
               "calibration_dtype": fast_dtype(), "encode_runs": enc}
        for method, (qs, passes) in runs.items():
            row[f"{method}_seconds"] = min(qs)
            row[f"{method}_ratio_to_encode"] = min(qs) / min(enc)
            row[f"{method}_runs"] = qs
            if any(passes):  # in the fastest run: how much of it the passes over sentences took
                row[f"{method}_passes_seconds"] = passes[qs.index(min(qs))]
                row[f"{method}_passes_ratio_to_encode"] = row[f"{method}_passes_seconds"] / min(enc)
        results.append(row)

    head = ["model", "threads", f"encode {args.sentences} (s)"] + [f"{m} (s, x encode)" for m in args.methods]
    lines = [head]
    for r in results:
        lines.append([r["model"], str(r["threads"]), f"{r['encode_seconds']:.2f}"]
                     + [f"{r[m + '_seconds']:.2f} ({r[m + '_ratio_to_encode']:.2f}x)"
                        + (f", passes {r[m + '_passes_ratio_to_encode']:.2f}x" if m + "_passes_seconds" in r else "")
                        for m in args.methods])
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    for l in lines:
        print("  ".join(c.ljust(w) for c, w in zip(l, widths)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
