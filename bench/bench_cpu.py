"""CPU inference benchmark: FP32 PyTorch vs gobo packed (3-bit, 4-bit) vs torch dynamic int8,
and the installable 4-bit peers (torchao, optimum-quanto, ONNX Runtime, bitsandbytes).

    .venv/bin/python bench/bench_cpu.py                 # minilm-l6 and mpnet-base, all shapes
    .venv/bin/python bench/bench_cpu.py --quick         # minilm-l6, batch 1 and 8, seq 128
    .venv/bin/python bench/bench_cpu.py --quick --no-peers   # gobo and torch only
    .venv/bin/python bench/bench_cpu.py --models mpnet-base --shapes 1x128,32x128

All contenders use the same thread count (``--threads``, default ``torch.get_num_threads()``),
and idle threads wait without spinning (``OMP_WAIT_POLICY=PASSIVE`` unless set otherwise, ONNX
Runtime's ``allow_spinning=0``), so that a contender's idle threads do not slow the next one.
Timing: one subprocess loads every contender and runs them round-robin (rep i of each within
the same few seconds), so that a busy machine slows them alike; the median latency of a
forward pass (``last_hidden_state``) per batch x sequence length, throughput in sequences per
second, and the speed ratio to FP32 from that same process (> 1 means faster than FP32). The
warm-up pass also gives each contender's largest absolute difference from FP32's
``last_hidden_state`` on the same input (``max_abs_diff_vs_fp32``).
Memory: each contender alone in its own subprocess: peak RSS (VmHWM) after each shape, and
the bytes of the model's resident weights (every parameter and buffer, what a quantized
tensor holds inside: packed codes, scales, zero points, bitsandbytes' nested statistics; for
int8, the packed int8 weights, their scales and the FP32 rest; for ONNX Runtime, the
initializers of the graph it loads). A table goes to stdout, everything to JSON.

Contenders:

* ``fp32``: the source model, transformers, FP32.
* ``gobo-3b`` / ``gobo-4b``: ``gobo.quantize(model, GoboConfig(bits=b))`` (size-aware mixed
  widths averaging b bits, row statistics), loaded with ``gobo.load(dir, packed=True)``.
* ``gobo-paper-3b``: the MICRO 2020 recipe (every tensor 3 bits, one codebook, no row stats).
* ``int8-dynamic``: ``torch.ao.quantization.quantize_dynamic`` on every nn.Linear.

Peers (``--peers``, on by default; each runs only when its packages are installed:
``pip install -e '.[bench]'``). They quantize the nn.Linear weights to 4 bits in groups along
the input dimension, with each library's default group size; embeddings, biases and
LayerNorms stay as they are (gobo also quantizes the embeddings).

* ``torchao-int4``: torchao's CPU int4 weight-only path (``PrototypeInt4WeightOnlyConfig``,
  ``Int4OpaqueTensor``, ``aten._weight_int4pack_mm_for_cpu``), groups of 128, asymmetric. The
  model runs in bfloat16, the activations that kernel is fast for: with FP32 activations
  MiniLM took 22.5 s at batch 8 x 128 tokens, against 0.4-0.5 s in FP32 (2 AVX2 cores).
  Its difference from FP32 includes bfloat16's.
* ``quanto-int4``: optimum-quanto, ``quantize(model, weights=qint4); freeze(model)`` on the
  FP32 model (groups of 128, FP32 scales and shifts). quanto's packed CPU kernel (tinygemm)
  serves only bfloat16 models; in FP32 each linear unpacks its weight and multiplies in FP32.
  It runs under ``torch.no_grad()``: quanto fails inside ``torch.inference_mode()``.
* ``ort-fp32`` / ``ort-int4``: the encoder exported with ``torch.onnx.export`` (dynamo, dynamic
  batch and sequence; the pooler is left out, as nothing here uses it), run by ONNX
  Runtime's CPU provider with the same intra-op thread count; ``ort-int4`` quantizes every
  weight MatMul with ``MatMulNBitsQuantizer`` (4 bits, blocks of 128, asymmetric, FP32
  compute). ``ort-fp32`` separates what the runtime gains from what the 4-bit weights gain.
  Export and quantization run once per model in a subprocess (``quantize_s``; reused from
  ``--workdir``).
* ``bnb-nf4``: bitsandbytes ``Linear4bit`` (NF4, blocks of 64, nested absmax statistics,
  FP32 compute) on its CPU backend.

A peer whose packages are missing, or whose export, load or forward pass fails, is skipped
with a one-line reason, printed and stored as ``{"skipped": reason}`` in its place in the JSON.
Installing torchao has a side effect: transformers imports it whenever it loads a model
(about 85 MiB, and warnings on stderr); the memory workers of the other contenders keep it
out, so that their peak RSS does not depend on whether the extra is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning (read when torch loads its OpenMP runtime, so
# here, before any import of torch; ONNX Runtime gets the same with allow_spinning=0). On a
# machine shared with other jobs, spinning made FP32 MiniLM's forward pass at batch 1 x 128
# tokens and 2 threads take 920 ms instead of 60 ms. OMP_WAIT_POLICY=ACTIVE measures with it,
# OMP_WAIT_POLICY=default with the runtime's default, what a process that sets nothing gets.
from _models import set_omp_wait_policy  # noqa: E402  (before torch loads)

set_omp_wait_policy()

MODELS = ("minilm-l6", "mpnet-base")
BATCHES = (1, 8, 32)
SEQS = (16, 128)
GOBO_CONFIGS = {
    "gobo-3b": ("GoboConfig", {"bits": 3}),
    "gobo-4b": ("GoboConfig", {"bits": 4}),
    "gobo-paper-3b": ("paper", {"bits": 3}),
}
# peer -> the modules it needs (checked before anything is loaded)
PEERS = {
    "torchao-int4": ("torchao",),
    "quanto-int4": ("optimum.quanto",),
    "ort-fp32": ("onnxruntime", "onnx", "onnxscript"),
    "ort-int4": ("onnxruntime", "onnx", "onnxscript"),
    "bnb-nf4": ("bitsandbytes",),
}
PEER_PACKAGES = ("torchao", "optimum-quanto", "onnx", "onnxscript", "onnxruntime", "bitsandbytes")
CONTENDERS = ("fp32", *GOBO_CONFIGS, "int8-dynamic", *PEERS)
ORT_FILES = {"ort-fp32": "fp32.onnx", "ort-int4": "int4.onnx"}


# ---------------------------------------------------------------------------- worker side


def _peak_rss_mib() -> float:
    """This process' peak resident set (VmHWM: unlike ru_maxrss it does not inherit the
    parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = str(exc).strip()
    line = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _resident_bytes(model) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared storage counted once), looking
    inside quantized tensors: a tensor subclass (torchao, quanto) counts the tensors it wraps,
    a bitsandbytes Params4bit adds its quantization state (absmax, code tables, nested state).
    Plain tensors count as ``gobo.nn.resident_weight_bytes`` counts them."""
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if t is None:
            return
        if hasattr(type(t), "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name, None))
            return
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
        state = getattr(t, "quant_state", None)
        while state is not None:
            for v in vars(state).values():
                if isinstance(v, torch.Tensor):
                    add(v)
            state = getattr(state, "state2", None)

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    return total


def _weight_bytes(model) -> int:
    import torch

    if hasattr(model, "weight_bytes"):  # a peer behind _Peer
        return model.weight_bytes()
    total = _resident_bytes(model)
    for mod in model.modules():  # dynamic int8 Linear keeps its weights outside parameters
        if hasattr(mod, "_weight_bias") and type(mod).__module__.startswith("torch.ao.nn.quantized"):
            w, b = mod._weight_bias()
            total += w.int_repr().numel()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += w.q_per_channel_scales().numel() * 8 + w.q_per_channel_zero_points().numel() * 8
            else:
                total += 16
            if b is not None:
                total += b.numel() * b.element_size()
    return total


class _Peer:
    """A peer behind what the workers use: ``config``, ``model(**inputs).last_hidden_state``
    (FP32) and ``weight_bytes()``."""

    def __init__(self, forward, config, weight_bytes):
        self._forward, self.config, self._weight_bytes = forward, config, weight_bytes

    def __call__(self, input_ids, attention_mask):
        return types.SimpleNamespace(last_hidden_state=self._forward(input_ids, attention_mask))

    def weight_bytes(self) -> int:
        return self._weight_bytes()


def _peer_missing(contender: str) -> str | None:
    """Why ``contender`` cannot run here (a module it needs is not installed), else None."""
    missing = []
    for mod in PEERS[contender]:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(mod)
    if missing:
        return f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
    return None


def _load_peer(contender: str, model_dir: str, prep_dir: str | None) -> _Peer:
    import torch

    from gobo.hf import load_source

    if contender.startswith("ort-"):
        import onnxruntime as ort
        from transformers import AutoConfig

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(Path(prep_dir) / ORT_FILES[contender]), opts, providers=["CPUExecutionProvider"])
        nbytes = json.loads((Path(prep_dir) / "weights.json").read_text())[contender]

        def forward(ids, mask):
            out = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            return torch.from_numpy(out)

        return _Peer(forward, AutoConfig.from_pretrained(model_dir), lambda: nbytes)

    if contender == "torchao-int4":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        model = load_source(model_dir).to(torch.bfloat16)
        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=128, set_inductor_config=False))

        def forward(ids, mask):
            return model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    elif contender == "quanto-int4":
        from optimum.quanto import freeze, qint4, quantize

        model = load_source(model_dir)
        quantize(model, weights=qint4)
        freeze(model)

        def forward(ids, mask):
            with torch.inference_mode(False), torch.no_grad():  # quanto fails under inference_mode
                return model(input_ids=ids.clone(), attention_mask=mask.clone()).last_hidden_state

    elif contender == "bnb-nf4":
        import bitsandbytes as bnb

        model = load_source(model_dir)

        def swap(parent: torch.nn.Module) -> None:
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    swap(child)
                    continue
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.float32, quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, new.to("cpu"))  # quantizes the weight

        swap(model)

        def forward(ids, mask):
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    else:
        raise ValueError(f"unknown peer {contender}")
    return _Peer(forward, model.config, lambda: _resident_bytes(model))


def _load(contender: str, model_dir: str, packed_dir: str | None):
    import torch

    if contender in PEERS:
        return _load_peer(contender, model_dir, packed_dir)
    if contender.startswith("gobo"):
        import gobo

        return gobo.load(packed_dir, packed=True)
    from gobo.hf import load_source

    model = load_source(model_dir)
    if contender == "int8-dynamic":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def _keep_torchao_out() -> None:
    """transformers imports torchao (about 85 MiB resident, warnings on stderr) whenever it
    loads a model and torchao is installed; this process does not need it."""
    try:
        import transformers.utils as tu
        import transformers.utils.import_utils as iu
    except ImportError:
        return
    for mod in (iu, tu):
        if hasattr(mod, "is_torchao_available"):
            mod.is_torchao_available = lambda *a, **k: False


def _gemm_isa() -> str | None:
    """The packed GEMM's inner kernel on this CPU (``avx512``, ``avx2``, or None: tiled path)."""
    from gobo import kernels

    return kernels.gemm_isa()


def _inputs(vocab: int, batch: int, seq: int):
    import torch

    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(1000, min(vocab, 20000), (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def worker_memory(args) -> None:
    """One contender alone: load time, resident weights, peak RSS after each shape."""
    import torch

    torch.set_num_threads(args.threads)
    rss_imports = _peak_rss_mib()
    if args.contender != "torchao-int4":
        _keep_torchao_out()
    try:
        t0 = time.perf_counter()
        model = _load(args.contender, args.model_dir, args.packed_dir)
        load_s = time.perf_counter() - t0
        rss_loaded = _peak_rss_mib()
        peaks = {}
        with torch.inference_mode():
            for batch, seq in sorted(args.shapes, key=lambda s: s[0] * s[1]):
                model(**_inputs(model.config.vocab_size, batch, seq))
                peaks[f"{batch}x{seq}"] = _peak_rss_mib()
        weight_bytes = _weight_bytes(model)
    except Exception as exc:  # noqa: BLE001 - reported, the driver decides
        print("RESULT " + json.dumps({"error": _one_line(exc)}))
        return
    out = {
        "load_s": load_s,
        "rss_after_imports_mib": rss_imports,
        "peak_rss_after_load_mib": rss_loaded,
        "peak_rss_mib": peaks,
        "weight_bytes": weight_bytes,
    }
    print("RESULT " + json.dumps(out))


def worker_timing(args) -> None:
    """All contenders in one process, run round-robin, so that they share whatever else the
    machine is doing: rep i of every contender runs within the same few seconds. A peer that
    fails to load or to run is dropped and reported under ``skipped``."""
    import torch

    torch.set_num_threads(args.threads)
    models, skipped = {}, {}
    for c, d in zip(args.contenders_list, args.packed_dirs):
        try:
            models[c] = _load(c, args.model_dir, d or None)
        except Exception as exc:  # noqa: BLE001
            if c not in PEERS:
                raise
            skipped[c] = _one_line(exc)

    def call(c, x):
        try:
            return models[c](**x)
        except Exception as exc:  # noqa: BLE001
            if c not in PEERS:
                raise
            skipped[c] = _one_line(exc)
            del models[c]
            return None

    vocab = next(iter(models.values())).config.vocab_size
    rows = []
    with torch.inference_mode():
        for batch, seq in args.shapes:
            x = _inputs(vocab, batch, seq)
            diffs, ref = {}, None
            for c in list(models):  # warm-up, and the difference from FP32 (first) on this input
                out = call(c, x)
                if out is None:
                    continue
                hidden = out.last_hidden_state.float()
                ref = hidden if ref is None else ref
                diffs[c] = (hidden - ref).abs().max().item()
            times: dict[str, list[float]] = {c: [] for c in models}
            start = time.perf_counter()
            while True:
                n = len(times["fp32"])
                if n >= args.max_reps or (n >= args.min_reps and time.perf_counter() - start > args.budget_s):
                    break
                for c in list(models):
                    t = time.perf_counter()
                    if call(c, x) is not None:
                        times[c].append(time.perf_counter() - t)
            times = {c: ts for c, ts in times.items() if c in models and ts}
            for c, ts in times.items():
                med = statistics.median(ts)
                rows.append({"contender": c, "batch": batch, "seq": seq, "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "reps": len(ts), "seq_per_s": batch / med, "max_abs_diff_vs_fp32": diffs.get(c)})
            print(f"  {batch}x{seq}: " + ", ".join(f"{c} {statistics.median(ts) * 1e3:.1f} ms" for c, ts in times.items()), file=sys.stderr, flush=True)
    from gobo import kernels

    print("RESULT " + json.dumps({"threads": torch.get_num_threads(), "simd": kernels.simd_enabled(), "rows": rows, "skipped": skipped}))


def worker_prepare(args) -> None:
    """ONNX Runtime's inputs, once per model: the encoder exported with torch.onnx (dynamo,
    dynamic batch and sequence) to ``fp32.onnx``, its weight MatMuls quantized by
    MatMulNBitsQuantizer to ``int4.onnx``, and their initializer bytes in ``weights.json``."""
    import logging

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.packed_dir)
    try:
        import onnx
        from onnx import numpy_helper
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        from gobo.hf import load_source

        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        out.mkdir(parents=True, exist_ok=True)
        model = load_source(args.model_dir)

        class Encoder(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        ids = torch.randint(1000, 2000, (2, 16))
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
        t = time.perf_counter()
        torch.onnx.export(
            Encoder(model).eval(), (ids, torch.ones_like(ids)), str(out / ORT_FILES["ort-fp32"]),
            input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
            dynamo=True, dynamic_shapes={"input_ids": dims, "attention_mask": dims}, verbose=False,
        )
        export_s = time.perf_counter() - t
        del model
        t = time.perf_counter()
        fp32 = onnx.load(str(out / ORT_FILES["ort-fp32"]))
        weights = {"ort-fp32": sum(numpy_helper.to_array(i).nbytes for i in fp32.graph.initializer)}
        quantizer = MatMulNBitsQuantizer(fp32, bits=4, block_size=128, is_symmetric=False)
        quantizer.process()
        q = quantizer.model.model
        onnx.save_model(q, str(out / ORT_FILES["ort-int4"]))
        quantize_s = time.perf_counter() - t
        weights["ort-int4"] = sum(numpy_helper.to_array(i).nbytes for i in q.graph.initializer)
        weights["matmul_nbits"] = sum(n.op_type == "MatMulNBits" for n in q.graph.node)
        if not weights["matmul_nbits"]:
            raise RuntimeError("MatMulNBitsQuantizer quantized no MatMul")
        weights.update(export_s=export_s, quantize_s=quantize_s)
        (out / "weights.json").write_text(json.dumps(weights))
    except Exception as exc:  # noqa: BLE001
        print("RESULT " + json.dumps({"error": _one_line(exc)}))
        return
    print("RESULT " + json.dumps(weights))


# ---------------------------------------------------------------------------- driver side


def _quantize(model: str, contender: str, workdir: Path) -> tuple[Path, float]:
    import gobo

    kind, kw = GOBO_CONFIGS[contender]
    cfg = gobo.GoboConfig.paper(**kw) if kind == "paper" else gobo.GoboConfig(**kw)
    out = workdir / f"{model}-{contender}"
    if (out / "gobo.safetensors").is_file():
        return out, 0.0
    t = time.perf_counter()
    cm = gobo.quantize(model, cfg)
    gobo.save(cm, out, overwrite=True)
    return out, time.perf_counter() - t


def _prepare_ort(args, model_dir: Path, out: Path) -> dict:
    """ONNX export and 4-bit quantization in a subprocess (reused when ``out`` has them)."""
    done = out / "weights.json"
    if done.is_file() and all((out / f).is_file() for f in ORT_FILES.values()):
        return {**json.loads(done.read_text()), "export_s": 0.0, "quantize_s": 0.0}
    cmd = _common(args, model_dir, []) + ["--worker", "prepare", "--packed-dir", str(out)]
    return _run(cmd)


def _peer_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PEER_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)  # progress passes through
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"worker exited with {proc.returncode}"}


def _common(args, model_dir: Path, shapes) -> list[str]:
    return [
        sys.executable, __file__, "--model-dir", str(model_dir), "--threads", str(args.threads),
        "--min-reps", str(args.min_reps), "--max-reps", str(args.max_reps), "--budget-s", str(args.budget_s),
        "--shapes", ",".join(f"{b}x{s}" for b, s in shapes),
    ]


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu.json"))
    ap.add_argument("--quick", action="store_true", help="minilm-l6 only, batch 1 and 8, seq 128")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--contenders", nargs="*", default=None, choices=CONTENDERS)
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help=f"run the installed peers ({', '.join(PEERS)}) with the default contenders (default: on)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=2.0, help="time per shape after the minimum reps")
    ap.add_argument("--workdir", default=None, help="keep the quantized models here (reused when present)")
    # worker modes (internal)
    ap.add_argument("--worker", choices=("memory", "timing", "prepare"), help=argparse.SUPPRESS)
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--contenders-list", type=lambda t: t.split(","), help=argparse.SUPPRESS)
    ap.add_argument("--packed-dirs", type=lambda t: t.split(","), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--packed-dir", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", type=_parse_shapes, help="BxS,BxS,... instead of every batch x sequence length, e.g. 1x128,32x128")
    args = ap.parse_args(argv)
    if args.worker == "memory":
        worker_memory(args)
        return 0
    if args.worker == "timing":
        worker_timing(args)
        return 0
    if args.worker == "prepare":
        worker_prepare(args)
        return 0

    from gobo.assets import resolve_model

    models = args.models or (["minilm-l6"] if args.quick else list(MODELS))
    shapes = args.shapes or ([(1, 128), (8, 128)] if args.quick else [(b, s) for b in BATCHES for s in SEQS])
    contenders = args.contenders or [c for c in CONTENDERS if args.peers or c not in PEERS]
    contenders = ["fp32"] + [c for c in contenders if c != "fp32"]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gobo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "torch": torch.__version__,
            "threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "gobo_gemm_kernel": _gemm_isa(),
            "peer_packages": _peer_versions(),
        },
        "shapes": shapes,
        "models": {},
    }
    try:
        for model in models:
            try:
                model_dir = resolve_model(model)
            except FileNotFoundError as exc:
                print(f"skipping {model}: {exc}")
                report["models"][model] = {"skipped": str(exc)}
                continue
            entry: dict = {"contenders": {c: {} for c in contenders}, "quantize_s": {}}
            dirs: dict[str, str] = {}
            running = list(contenders)

            def skip(c: str, reason: str) -> None:
                print(f"[{model}] skipping {c}: {reason}", flush=True)
                entry["contenders"][c] = {"skipped": reason}
                if c in running:
                    running.remove(c)

            for c in contenders:
                if c in PEERS and (reason := _peer_missing(c)):
                    skip(c, reason)
            for c in contenders:
                if c.startswith("gobo"):
                    print(f"[{model}] quantizing {c} ...", flush=True)
                    d, secs = _quantize(model, c, workdir)
                    dirs[c] = str(d)
                    entry["quantize_s"][c] = secs
            ort = [c for c in running if c.startswith("ort-")]
            if ort:
                print(f"[{model}] exporting to ONNX and quantizing MatMuls to 4 bits ...", flush=True)
                prep = _prepare_ort(args, model_dir, workdir / f"{model}-ort")
                for c in ort:
                    if "error" in prep:
                        skip(c, f"ONNX export or quantization failed: {prep['error']}")
                        continue
                    dirs[c] = str(workdir / f"{model}-ort")
                    entry["quantize_s"][c] = prep["export_s"] + (prep["quantize_s"] if c == "ort-int4" else 0.0)
            for c in list(running):
                print(f"[{model}] memory of {c} ...", flush=True)
                cmd = _common(args, model_dir, shapes) + ["--worker", "memory", "--contender", c]
                if c in dirs:
                    cmd += ["--packed-dir", dirs[c]]
                res = _run(cmd)
                if c in PEERS and "error" in res:
                    skip(c, res["error"])
                    continue
                entry["contenders"][c].update(res)
            print(f"[{model}] timing, round-robin over {', '.join(running)} ...", flush=True)
            cmd = _common(args, model_dir, shapes) + [
                "--worker", "timing", "--contenders-list", ",".join(running),
                "--packed-dirs", ",".join(dirs.get(c, "") for c in running),
            ]
            timing = _run(cmd)
            entry["threads"], entry["simd"] = timing.get("threads"), timing.get("simd")
            if "error" in timing:
                entry["error"] = timing["error"]
            for c, reason in timing.get("skipped", {}).items():
                skip(c, reason)
            for r in timing.get("rows", []):
                c = r.pop("contender")
                if "skipped" in entry["contenders"][c]:
                    continue
                r["peak_rss_mib"] = entry["contenders"][c].get("peak_rss_mib", {}).get(f"{r['batch']}x{r['seq']}")
                entry["contenders"][c].setdefault("rows", []).append(r)
            _add_ratios(entry)
            report["models"][model] = entry
            _print_table(model, entry)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def _add_ratios(entry: dict) -> None:
    base = entry["contenders"].get("fp32", {})
    if "rows" not in base:
        return
    by_shape = {(r["batch"], r["seq"]): r["median_ms"] for r in base["rows"]}
    for res in entry["contenders"].values():
        if "rows" not in res:
            continue
        if "weight_bytes" in res and "weight_bytes" in base:
            res["weight_bytes_vs_fp32"] = res["weight_bytes"] / base["weight_bytes"]
        for r in res["rows"]:
            ref = by_shape.get((r["batch"], r["seq"]))
            r["speedup_vs_fp32"] = ref / r["median_ms"] if ref else None


def _print_table(model: str, entry: dict) -> None:
    print(f"\n{model}")
    head = f"{'contender':<14} {'batch':>5} {'seq':>4} {'median ms':>10} {'seq/s':>8} {'vs fp32':>8} {'max|d|':>7} {'peak RSS MiB':>12} {'weights MiB':>11}"
    print(head)
    print("-" * len(head))
    for name, res in entry["contenders"].items():
        if "skipped" in res:
            print(f"{name:<14} skipped: {res['skipped']}")
            continue
        if "rows" not in res:
            print(f"{name:<14} error: {res.get('error', 'no timing')}")
            continue
        wmib = res.get("weight_bytes", float("nan")) / 2**20
        for r in res["rows"]:
            ratio, diff = r.get("speedup_vs_fp32"), r.get("max_abs_diff_vs_fp32")
            print(
                f"{name:<14} {r['batch']:>5} {r['seq']:>4} {r['median_ms']:>10.1f} {r['seq_per_s']:>8.1f} "
                f"{(f'{ratio:.2f}x' if ratio else '-'):>8} {(f'{diff:.3f}' if diff is not None else '-'):>7} "
                f"{(r['peak_rss_mib'] or float('nan')):>12.0f} {wmib:>11.1f}"
            )
    print()


if __name__ == "__main__":
    sys.exit(main())
