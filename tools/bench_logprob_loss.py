"""Benchmark per-token logprob (output projection + log-softmax + gather), forward + backward.

Each implementation runs in a fresh subprocess so its peak memory is its own:
- CPU: peak = max RSS of the child (``getrusage``) minus its RSS once the inputs are built,
  i.e. the extra memory of forward + backward (outputs and gradients included);
- CUDA: peak = ``max_memory_allocated`` minus ``memory_allocated`` once the inputs are built.
Time is forward + backward of ``sum(logprobs * g)`` (the median of ``--repeat`` runs after one
warm-up on CUDA; one run on CPU). Every impl is compared with ``naive``:
``log_softmax((hidden @ W.T).float()) .gather(targets)`` through autograd.

Example:
    python tools/bench_logprob_loss.py --T 8192 --V 151936 --H 1024 --dtype fp32 \
        --impl naive chunked
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("naive", "chunked", "triton", "liger")


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _inputs(args: argparse.Namespace, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    hidden_TH = torch.randn(args.T, args.H, generator=gen, device=device).to(dtype)
    weight_VH = torch.randn(args.V, args.H, generator=gen, device=device)
    weight_VH = weight_VH.mul_(args.H**-0.5).to(dtype)
    targets_T = torch.randint(0, args.V, (args.T,), generator=gen, device=device)
    grad_T = torch.randn(args.T, generator=gen, device=device)
    return hidden_TH.requires_grad_(), weight_VH.requires_grad_(), targets_T, grad_T


def _logprob_fn(impl: str, chunk_size: int | None):
    if impl == "naive":

        def naive(hidden_TH, weight_VH, targets_T):
            logits_TV = (hidden_TH @ weight_VH.T).float()
            return torch.log_softmax(logits_TV, -1).gather(-1, targets_T[:, None]).squeeze(-1)

        return naive
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda hidden_TH, weight_VH, targets_T: -loss_fn(weight_VH, hidden_TH, targets_T)
    from megatron_metis.kernels.fused_logprob import fused_linear_logprob

    backend = {"chunked": "torch", "triton": "triton"}[impl]
    return lambda hidden_TH, weight_VH, targets_T: fused_linear_logprob(
        hidden_TH, weight_VH, targets_T, chunk_size=chunk_size, impl=backend
    )[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_worker(args: argparse.Namespace) -> None:
    """Child process: build inputs, run one impl, print a JSON line, save outputs."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    hidden_TH, weight_VH, targets_T, grad_T = _inputs(args, device)
    fn = _logprob_fn(args.impl, args.chunk_size)
    _sync(device)
    base_kib = _rss_kib()
    if device.type == "cuda":
        if args.repeat > 1:  # warm-up (compilation, cuBLAS handles)
            torch.autograd.backward(fn(hidden_TH, weight_VH, targets_T), grad_T)
            hidden_TH.grad = weight_VH.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeat):
        hidden_TH.grad = weight_VH.grad = None
        start = time.perf_counter()
        logprobs_T = fn(hidden_TH, weight_VH, targets_T)
        torch.autograd.backward(logprobs_T, grad_T)
        _sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base_bytes) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024
    if args.save:
        out = [logprobs_T.detach(), hidden_TH.grad, weight_VH.grad]
        torch.save([t.float().cpu() for t in out], args.save)
    times.sort()
    print(json.dumps({"impl": args.impl, "time_s": times[len(times) // 2], "peak_mib": peak_mib}))


def _run_child(args: argparse.Namespace, impl: str, save: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--save", save]
    for key in ("T", "V", "H", "dtype", "device", "repeat"):
        cmd += [f"--{key}", str(getattr(args, key))]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ)
    if args.device == "cpu" and impl in ("triton", "liger"):
        env["TRITON_INTERPRET"] = "1"  # Triton runs on the CPU only in its interpreter
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_diffs(path: str, ref_path: str) -> list[float]:
    got, ref = torch.load(path), torch.load(ref_path)
    return [(a - b).abs().max().item() for a, b in zip(got, ref, strict=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, default=8192)
    parser.add_argument("--V", type=int, default=151936)
    parser.add_argument("--H", type=int, default=1024)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=["naive", "chunked"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=None, help="default: 5 on CUDA, 1 on CPU")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 5 if args.device.startswith("cuda") else 1
    if args.worker:
        args.impl = args.impl[0]
        run_worker(args)
        return
    impls = ["naive"] + [impl for impl in args.impl if impl != "naive"]
    print(f"T={args.T} V={args.V} H={args.H} dtype={args.dtype} device={args.device}")
    print("| impl | fwd+bwd s | peak MiB | mem naive/impl | time impl/naive "
          "| max|d logp| | max|d grad_h| | max|d grad_W| |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        naive = None
        for impl in impls:
            save = str(Path(tmp) / f"{impl}.pt")
            res = _run_child(args, impl, save)
            naive = naive or res
            diffs = _max_diffs(save, str(Path(tmp) / "naive.pt"))
            if impl != "naive":
                os.remove(save)
            print(
                f"| {impl} | {res['time_s']:.3f} | {res['peak_mib']:.0f} "
                f"| {naive['peak_mib'] / max(res['peak_mib'], 1e-9):.1f}x "
                f"| {res['time_s'] / naive['time_s']:.2f} | "
                + " | ".join(f"{d:.2e}" for d in diffs)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
