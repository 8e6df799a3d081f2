"""A stand-in for vLLM on machines without it: the trainer side of the vLLM path, measured."""

from __future__ import annotations

import time

from .recorder import Recorder


class _SinkModel:
    """vLLM's model as the weight sync sees it: load_weights takes the tensors and does nothing with them while
    training (vLLM's copy into its own weights is not the trainer's cost); `compare_syncs` turns on a per-name sum
    (to check that two syncs hand over the same tensors) and a probe of the ZeRO-3 parameters held whole at each
    hand-off."""

    def __init__(self, torch):
        self.torch, self.sums, self.checking, self.model = torch, {}, False, None
        self.gathered_at_handoff = 0

    def load_weights(self, weights):
        if not self.checking:
            return
        for name, tensor in weights:
            self.sums[name] = float(tensor.sum())
        self.gathered_at_handoff = max(self.gathered_at_handoff, gathered_bytes(self.model))


def gathered_bytes(model) -> int:
    """Bytes of ZeRO-3-partitioned parameters held whole on this rank now (persistent ones excluded: always whole)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel * p.element_size() for p in model.parameters()
               if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE and not getattr(p, "ds_persist", False))


def install_vllm_stand_in(completion_length: int, rec: Recorder) -> None:
    """Make TRL's GRPOTrainer run its vLLM colocate path with the engine replaced: TRL's own VLLMGeneration.sync_weights
    (gather, LoRA merge, name mapping, unmerge) runs unchanged up to the hand-off, where a sink takes the tensors;
    generation returns random completions of exactly `completion_length` tokens (ids below the special tokens) with
    made-up sampling log-probs. Everything after generation (importance-sampling forward, loss, backward, optimizer)
    is TRL's and this recipe's code. For a GPU machine without vLLM (see BENCHMARKS.md)."""
    import types

    import torch
    import trl.trainer.grpo_trainer as grpo_trainer
    from trl.generation.vllm_generation import VLLMGeneration

    import vllm_colocate

    vllm_colocate.vllm_importable = lambda: True  # the script's up-front check: vLLM is replaced, not needed

    class StandIn:
        sync_weights = VLLMGeneration.sync_weights
        _fix_param_name_to_vllm = VLLMGeneration._fix_param_name_to_vllm

        def __init__(self, model, accelerator, is_fsdp_enabled, processing_class, mode="colocate", **kwargs):
            self.model, self.accelerator, self.is_fsdp_enabled, self.mode = model, accelerator, is_fsdp_enabled, mode
            self.enable_sleep_mode = kwargs.get("enable_sleep_mode", False)
            self.sink = _SinkModel(torch)
            runner = types.SimpleNamespace(model=self.sink)
            engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=runner)))
            self.llm = types.SimpleNamespace(llm_engine=engine, reset_prefix_cache=lambda: None)
            self.vocab = min(processing_class.tokenizer.all_special_ids)  # ordinary tokens only: none ends a completion
            self.generator = torch.Generator().manual_seed(accelerator.process_index)

        def generate(self, prompts, images=None, num_generations=None, profiler=None, **kwargs):
            ids = torch.randint(0, self.vocab, (len(prompts), completion_length), generator=self.generator).tolist()
            logprobs = [[[-2.0]] * completion_length for _ in prompts]
            return prompts, ids, logprobs, None

    StandIn.generate = rec.timed("vllm_generate", StandIn.generate)
    grpo_trainer.VLLMGeneration = StandIn


def compare_syncs(trainer) -> dict:
    """After training: fast_paths.py's layer-by-layer sync and TRL's whole-model sync of the same weights, one after
    the other in this process (layer by layer first, so nothing TRL's gather leaves behind is counted against it):
    time, peak GPU memory above what was allocated before, the ZeRO-3 parameters held whole at the hand-offs, and
    whether the sink received identical tensors."""
    import gc

    import torch

    gen = trainer.vllm_generation
    gen.sink.checking, gen.sink.model = True, trainer.model
    cuda = torch.cuda.is_available()
    out = {}
    for name, sync in (("layerwise", gen.sync_weights), ("trl", gen.sync_weights.upstream)):
        gen.sink.sums, gen.sink.gathered_at_handoff = {}, 0
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        sync()
        if cuda:
            torch.cuda.synchronize()
        out[name] = {"s": time.perf_counter() - t0, "tensors": len(gen.sink.sums), "sums": gen.sink.sums,
                     "allocated_before_gib": start / 2**30,
                     "peak_extra_gib": (torch.cuda.max_memory_allocated() - start) / 2**30 if cuda else None,
                     "gathered_at_handoff_gib": gen.sink.gathered_at_handoff / 2**30}
    same = out["trl"]["sums"] == out["layerwise"]["sums"]
    for v in out.values():
        del v["sums"]
    gen.sink.checking = False
    return {**out, "identical_tensors": same}
