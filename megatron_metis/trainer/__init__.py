"""The training engine and the two phases of Metis-RISE that run on it.

    engine.py         TrainEngine: Megatron schedules + DDP + optimizer, one optimizer step
    optimizer.py      Megatron's optimizer on GPUs; CpuOptimizer (same grad norm/clipping) on CPU
    logprobs.py       chunked vocab-parallel per-token log-probs (padding columns excluded)
    batching.py       samples -> packed rows -> micro-batches (block-diagonal attention)
    state.py          TrainState, DataCursor, RNG states
    checkpointing.py  training checkpoints (model, optimizer, RNG, data position), resume, HF export
    metrics.py        JSONL + TensorBoard + progress bar
    setup.py          process groups, tokenizer/processor, model, resume
    rollout_io.py     requests, weight streaming into the rollout engine and its checks, eval
    loop.py           the phase loop: logging, eval and checkpoint intervals, HF export
    sft.py, sft_data.py   ``metis sft``: its phase (setup and step)
    rl.py, rl_steps.py    ``metis rl``: its phase (setup and step) and the step's named steps

Entry points: ``trainer.sft.run_sft(cfg)`` and ``trainer.rl.run_rl(cfg)`` (imported lazily:
this package's ``__init__`` imports nothing heavy).
"""
